"""MONAI dictionary transforms that let the inference config see images exactly as the training pool did."""

from __future__ import annotations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Resized, SaveImaged

from .image_io import scale_intensity, to_rgb


class IntensityToRGBd(MapTransform):
    """Channel-first image of any dtype -> 3-channel float32 in [0, 1] with ``image_io``'s rule (8-bit / 255,
    otherwise the 0.5/99.5 percentile window; grey repeated). Load with ``LoadImaged(dtype=None)`` so the rule sees
    the stored dtype. A volume ``(C, X, Y, Z)`` is windowed as a whole and rounded to 8-bit levels, as the training
    pool reads volumes (and the Deploy app hands their slices over)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            if array.ndim == 4 and array.shape[-1] == 1:  # (C, X, Y, 1): a 2-D image stored as 3-D
                array = array[..., 0]
            if array.ndim not in (3, 4):
                raise ValueError(f"expected a channel-first 2-D image or 3-D volume, got shape {array.shape}")
            scaled, _ = scale_intensity(array)  # a volume: one window for the whole volume, as read_case
            rgb = to_rgb(scaled, str(getattr(image, "meta", {}).get("filename_or_obj", key)))
            if array.ndim == 4:  # the training pool stores volume slices as 8-bit (read_case, then pool.to_uint8)
                rgb = np.rint(rgb * np.float32(255.0)) / np.float32(255.0)
            rgb = torch.as_tensor(np.ascontiguousarray(rgb, dtype=np.float32))
            if isinstance(image, MetaTensor):
                meta = dict(image.meta)
                if "spatial_shape" in meta:  # keep the writer's idea of the image size in step with a squeeze
                    meta["spatial_shape"] = np.asarray(array.shape[1:])
                d[key] = MetaTensor(rgb, meta=meta)
            else:
                d[key] = rgb
        return d


class ResizePlanesd(Resized):
    """``Resized`` to ``size x size`` in the image plane: a 2-D image whole, a 3-D volume slice by slice (its
    ``slice_axis`` keeps its length), so one inference config serves both; ``Invertd`` undoes it as ``Resized``'s."""

    def __init__(self, keys: KeysCollection, size: int, slice_axis: int = 2, **kwargs):
        super().__init__(keys, spatial_size=(int(size), int(size)), **kwargs)
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
        self.size, self.slice_axis = int(size), slice_axis

    def __call__(self, data, lazy: bool | None = None):
        d = dict(data)
        for key in self.key_iterator(d):
            spatial = [self.size] * (d[key].ndim - 1)
            if len(spatial) == 3:
                spatial[self.slice_axis] = -1  # -1: keep that axis
            self.resizer.spatial_size = tuple(spatial)
            d.update(super().__call__({key: d[key]}, lazy=lazy))
        return d


class SaveImageByDimd(SaveImaged):
    """``SaveImaged`` that writes 2-D label maps with ``output_ext`` (``.png``) and 3-D ones with ``volume_ext``
    (``.nii.gz``, the input's affine): one inference config for images and volumes. Its name keeps "SaveImage", so
    MONAI Deploy drops it like the stock writer (MONAI Label drops it as a ``SaveImaged``)."""

    def __init__(self, keys: KeysCollection, volume_ext: str = ".nii.gz", **kwargs):
        super().__init__(keys, **kwargs)
        self.volume_writer = SaveImaged(keys, **{**kwargs, "output_ext": volume_ext})

    def __call__(self, data):
        """Channel-less label maps (after ``SqueezeDimd``): ``(X, Y)`` -> ``output_ext``, ``(X, Y, Z)`` -> volume."""
        if any(data[key].ndim == 3 for key in self.key_iterator(dict(data))):
            return self.volume_writer(data)
        return super().__call__(data)
