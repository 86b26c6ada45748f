"""IntensityToRGBd: inference sees images exactly as the training pool does."""

import numpy as np
import torch
from monai.data import MetaTensor

from scripts.image_io import read_case
from scripts.transforms import IntensityToRGBd


def test_matches_pool_reading_and_squeezes_geometry(tmp_path):
    from PIL import Image

    grey = (np.arange(30 * 50).reshape(30, 50) % 251).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    _, slices = read_case(str(tmp_path / "g.png"))
    # what LoadImaged(dtype=None) + EnsureChannelFirstd give for this PNG: (1, X=50, Y=30) uint8
    image = MetaTensor(torch.as_tensor(grey.T[None].copy()), meta={"spatial_shape": np.array([50, 30])})
    out = IntensityToRGBd(keys="image")({"image": image})["image"]
    assert out.shape == (3, 50, 30)
    np.testing.assert_allclose(out.numpy(), slices[0], atol=1e-6)
    # a 2-D image stored as (C, X, Y, 1), e.g. a single-frame DICOM: the singleton axis and its meta go together
    flat = MetaTensor(torch.as_tensor(grey.T[None, ..., None].copy()), meta={"spatial_shape": np.array([50, 30, 1])})
    out = IntensityToRGBd(keys="image")({"image": flat})["image"]
    assert out.shape == (3, 50, 30) and list(out.meta["spatial_shape"]) == [50, 30]
