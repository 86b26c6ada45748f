"""MONAI dictionary transforms that let the inference config see images exactly as the training pool did."""

from __future__ import annotations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import (
    Compose,
    MapTransform,
    RepeatChannel,
    Resized,
    SaveImaged,
    ScaleIntensityRange,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import convert_to_tensor

# Above this many values the percentiles are estimated on a regular subsample (deterministic, much faster).
PERCENTILE_MAX_SAMPLES = 1 << 22
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5


def intensity_window(image: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """The stored intensities that map to 0 and 1: 8-bit 0..255, boolean 0..1, any other dtype its 0.5/99.5
    percentiles (of a regular subsample above ``PERCENTILE_MAX_SAMPLES`` values), or its min..max where those
    coincide (sparse bright spots on a flat background). Computed here, once, rather than by MONAI's
    ``ScaleIntensityRangePercentiles``: that one sorts every voxel of a volume twice and has no such fallback."""
    if image.dtype in (np.uint8, torch.uint8):
        return 0.0, 255.0
    if image.dtype in (np.bool_, torch.bool):
        return 0.0, 1.0
    flat = np.asarray(image.numpy() if isinstance(image, torch.Tensor) else image, dtype=np.float32).reshape(-1)
    if flat.size > PERCENTILE_MAX_SAMPLES:
        flat = flat[:: flat.size // PERCENTILE_MAX_SAMPLES + 1]
    lo, hi = (float(v) for v in percentile(flat, [LOW_PERCENTILE, HIGH_PERCENTILE]))
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    return lo, hi


# meta key of a volume slice's window: the pool reads a volume's slices one by one (image_io.read_planes) but
# scales them all with the window of the whole case, as inference.json scales the whole volume
CASE_WINDOW = "case_intensity_window"


class ScaleIntensityWindowd(MapTransform):
    """MONAI's ``ScaleIntensityRange`` from :func:`intensity_window` to [0, 1], clipped, float32 (a constant image
    -> 0); the window goes into the output's meta. Load with ``LoadImaged(dtype=None)`` so it sees the stored
    dtype. A 2-D slice whose meta holds its case's window (``CASE_WINDOW``) is scaled with that one."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            case_window = getattr(d[key], "meta", {}).get(CASE_WINDOW)
            lo, hi = intensity_window(d[key]) if case_window is None else case_window
            image = convert_to_tensor(d[key], dtype=torch.float32, track_meta=get_track_meta())
            if hi <= lo:
                image = image * 0  # flat: ScaleIntensityRange would divide by zero
            else:
                image = ScaleIntensityRange(lo, hi, 0.0, 1.0, clip=True, dtype=torch.float32)(image)
            if isinstance(image, MetaTensor):
                image.meta["intensity_window"] = (lo, hi)  # read_case records it in Case.meta
            d[key] = image
        return d


class ToRGBd(MapTransform):
    """(C, ...) -> (3, ...): grey repeated (MONAI ``RepeatChannel``), grey + alpha -> grey, RGB(A) -> RGB."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            channels = image.shape[0]
            if channels not in (1, 2, 3, 4):
                name = getattr(image, "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"{name}: unsupported number of channels {channels} (expected 1, 2, 3 or 4)")
            d[key] = RepeatChannel(3)(image[:1]) if channels <= 2 else image[:3]
        return d


def intensity_to_rgb(keys: KeysCollection, allow_missing_keys: bool = False) -> Compose:
    """The one intensity rule of the bundle, as a MONAI ``Compose``: channel-first image of any dtype -> 3-channel
    float32 in [0, 1]. The training pool (``image_io.read_case``) and ``configs/inference.json`` (through
    :class:`IntensityToRGBd`) both run it, so a model sees the same numbers in training and inference."""
    return Compose([ScaleIntensityWindowd(keys, allow_missing_keys), ToRGBd(keys, allow_missing_keys)])


class IntensityToRGBd(MapTransform):
    """:func:`intensity_to_rgb` as inference.json's step: a 2-D image stored as ``(C, X, Y, 1)`` loses its singleton
    axis first, and a volume ``(C, X, Y, Z)`` (windowed as a whole) is rounded to 8-bit levels, as the training pool
    stores volume slices (``pool.to_uint8``) and the Deploy app hands their slices over."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.intensity = intensity_to_rgb(keys, allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key] if isinstance(d[key], torch.Tensor) else torch.as_tensor(np.asarray(d[key]))
            if image.ndim == 4 and image.shape[-1] == 1:  # (C, X, Y, 1): a 2-D image stored as 3-D
                image = image[..., 0]
                if isinstance(image, MetaTensor) and "spatial_shape" in image.meta:  # the writer's idea of the size
                    image.meta["spatial_shape"] = np.asarray(image.shape[1:])
            if image.ndim not in (3, 4):
                raise ValueError(f"expected a channel-first 2-D image or 3-D volume, got shape {tuple(image.shape)}")
            rgb = self.intensity({key: image})[key]
            if image.ndim == 4:  # the training pool stores volume slices as 8-bit (read_case, then pool.to_uint8)
                rgb = torch.round(rgb * 255.0) / 255.0
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
