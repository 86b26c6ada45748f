"""MONAI dictionary transforms that let the inference config see images exactly as the training pool did."""

from __future__ import annotations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .image_io import scale_intensity, to_rgb


class IntensityToRGBd(MapTransform):
    """Channel-first image of any dtype -> 3-channel float32 in [0, 1] with ``image_io``'s rule (8-bit / 255,
    otherwise the 0.5/99.5 percentile window; grey repeated). Load with ``LoadImaged(dtype=None)`` so the rule sees
    the stored dtype."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            if array.ndim == 4 and array.shape[-1] == 1:  # (C, X, Y, 1): a 2-D image stored as 3-D
                array = array[..., 0]
            if array.ndim != 3:
                raise ValueError(f"expected a 2-D channel-first image, got shape {array.shape}")
            scaled, _ = scale_intensity(array)
            rgb = torch.as_tensor(
                np.ascontiguousarray(to_rgb(scaled, str(getattr(image, "meta", {}).get("filename_or_obj", key))))
            )
            if isinstance(image, MetaTensor):
                meta = dict(image.meta)
                if "spatial_shape" in meta:  # keep the writer's idea of the image size in step with a squeeze
                    meta["spatial_shape"] = np.asarray(array.shape[1:])
                d[key] = MetaTensor(rgb, meta=meta)
            else:
                d[key] = rgb
        return d
