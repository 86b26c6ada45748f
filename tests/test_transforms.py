"""IntensityToRGBd: inference sees images exactly as the training pool does."""

import os

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


def _inference_intensity():
    """inference.json's preprocessing up to its intensity step (loading, channel first, intensity to RGB)."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(os.path.join(os.path.dirname(__file__), "..", "bundle", "configs", "inference.json"))
    parser["image_size"] = 28  # no trained model here: its network.json would give the size
    steps = parser.get_parsed_content("preprocessing").transforms
    names = [type(t).__name__ for t in steps]
    return Compose(steps[: names.index("ResizePlanesd")])


def _old_rule(stored: np.ndarray) -> np.ndarray:
    """The pool's intensity rule written out with numpy (what IntensityToRGBd computed before it became MONAI
    transforms): 8-bit /255; else the 0.5/99.5 percentile window clipped to [0, 1]; grey repeated, RGBA -> RGB."""
    if stored.dtype == np.uint8:
        scaled = stored.astype(np.float32) / np.float32(255)
    else:
        values = stored.astype(np.float32)
        lo, hi = np.percentile(values, [0.5, 99.5])
        scaled = np.clip((values - np.float32(lo)) / np.float32(hi - lo), 0, 1)
    return np.repeat(scaled, 3, 0) if scaled.shape[0] == 1 else scaled[:3]


def test_pool_and_inference_give_the_old_intensities(tmp_path):
    """Grey 8-bit, RGB(A) 8-bit and 16-bit grey images: read_case (the pool) and inference.json's preprocessing
    both give the old rule's floats (within float32 rounding), and the pool's uint8 copy the same bytes."""
    from PIL import Image

    from scripts.pool import to_uint8

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (30, 50), dtype=np.uint8)
    rgba = rng.integers(0, 256, (30, 50, 4), dtype=np.uint8)
    deep = (rng.normal(3000, 800, (30, 50)).clip(0, 65535)).astype(np.uint16)
    deep[0, :5] = 65535  # bright outliers the percentile window clips
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.png")
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(deep).save(tmp_path / "deep.png")
    # stored channel-first (C, X, Y), as MONAI lays out a PIL image
    stored = {
        "grey": grey.T[None],
        "rgb": rgba[..., :3].transpose(2, 1, 0),
        "rgba": rgba.transpose(2, 1, 0),
        "deep": deep.T[None],
    }
    # hand numbers for the 16-bit window: 0.5/99.5 percentiles with numpy's linear interpolation
    lo, hi = np.percentile(deep.astype(np.float32), [0.5, 99.5])
    assert lo < 3000 - 2 * 800 < 3000 + 2 * 800 < hi < 65535
    inference = _inference_intensity()
    for name, array in stored.items():
        expected = _old_rule(array)
        assert expected.shape == (3, 50, 30) and expected.dtype == np.float32
        _, slices = read_case(str(tmp_path / f"{name}.png"))
        np.testing.assert_allclose(slices[0], expected, atol=1e-6, err_msg=name)
        assert torch.equal(to_uint8(torch.as_tensor(slices[0])), to_uint8(torch.as_tensor(expected)))
        out = inference({"image": str(tmp_path / f"{name}.png")})["image"]
        assert out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-6, err_msg=name)
    assert np.array_equal(_old_rule(stored["grey"])[1] * 255, grey.T)  # 8-bit: exactly /255


def test_sparse_bright_spots_use_the_min_max_window(tmp_path):
    """Percentiles that coincide (a flat background with a few spots) fall back to min..max; a flat image is 0."""
    from PIL import Image

    sparse = np.zeros((30, 50), np.uint16)
    sparse[3, 4], sparse[10, 20], sparse[20, 40] = 1000, 2000, 4000
    Image.fromarray(sparse).save(tmp_path / "sparse.png")
    Image.fromarray(np.full((30, 50), 7, np.uint16)).save(tmp_path / "flat.png")
    expected = np.repeat(sparse.T[None].astype(np.float32) / 4000, 3, 0)
    inference = _inference_intensity()
    _, slices = read_case(str(tmp_path / "sparse.png"))
    np.testing.assert_allclose(slices[0], expected, atol=1e-6)
    np.testing.assert_allclose(inference({"image": str(tmp_path / "sparse.png")})["image"].numpy(), expected, atol=1e-6)
    _, slices = read_case(str(tmp_path / "flat.png"))
    assert not slices[0].any() and not inference({"image": str(tmp_path / "flat.png")})["image"].numpy().any()


def test_intensity_to_rgb_is_one_monai_compose():
    import pytest
    from monai.transforms import Compose

    from scripts.transforms import intensity_to_rgb

    compose = intensity_to_rgb("image")
    assert isinstance(compose, Compose)
    grey_alpha = np.stack([np.array([[0, 51], [102, 255]], np.uint8), np.full((2, 2), 9, np.uint8)])
    out = compose({"image": grey_alpha})["image"]
    np.testing.assert_allclose(np.asarray(out), np.repeat([[[0, 0.2], [0.4, 1.0]]], 3, 0), atol=1e-7)  # alpha dropped
    assert out.meta["intensity_window"] == (0.0, 255.0)
    five = MetaTensor(torch.zeros(5, 2, 2), meta={"filename_or_obj": "five.tif"})
    with pytest.raises(RuntimeError, match="ToRGBd") as err:  # MONAI's Compose wraps the step's error
        compose({"image": five})
    assert "five.tif: unsupported number of channels 5" in str(err.value.__cause__)
