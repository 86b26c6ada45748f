"""The pool loader (scripts/pool.py): every kind of input loads, and its steps are medsmile.json's pool_transforms."""

from __future__ import annotations

import functools
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigParser
from monai.transforms import ShiftIntensityd
from PIL import Image

from scripts.pool import ImagePool

CONFIG = os.path.join(BUNDLE_ROOT, "configs", "medsmile.json")
AFFINE = np.diag([0.8, 0.7, 2.5, 1.0])


def write_mixed_pool(folder) -> list[str]:
    """One input of each kind the pool reads differently: 8-bit RGB, grey, grey + alpha and RGBA PNGs, a 16-bit PNG
    (percentile window), a float NIfTI volume (window over the whole case), an int16 2-D image stored as
    3-D (X, Y, 1), and a constant image; odd sizes so that every resize interpolates."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []

    def png(name, array, mode=None):
        path = folder / name
        Image.fromarray(array, mode).save(path)
        paths.append(str(path))

    png("a_rgb.png", rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    png("b_grey.png", rng.integers(0, 256, (61, 29), dtype=np.uint8))
    png("c_grey_alpha.png", rng.integers(0, 256, (33, 40, 2), dtype=np.uint8), "LA")
    png("d_rgba.png", rng.integers(0, 256, (45, 45, 4), dtype=np.uint8))
    png("e_16bit.png", rng.gamma(2.0, 3000.0, (50, 34)).clip(0, 65535).astype(np.uint16))
    png("h_constant.png", np.full((20, 24), 77, dtype=np.uint8))
    volume = rng.normal(100.0, 40.0, (31, 26, 9)).astype(np.float32)
    volume[3:9, 4:12, 2] = 900.0  # bright spots: the case's window, not the slice's, scales slice 2
    nib.save(nib.Nifti1Image(volume, AFFINE), folder / "f_volume.nii.gz")
    flat = rng.integers(-1000, 1500, (27, 39, 1)).astype(np.int16)
    nib.save(nib.Nifti1Image(flat, AFFINE), folder / "g_flat.nii.gz")
    return sorted(paths + [str(folder / "f_volume.nii.gz"), str(folder / "g_flat.nii.gz")])


@pytest.mark.parametrize("slice_axis", [2, 1])
def test_every_kind_of_input_loads_into_the_pool_arrays(tmp_path, slice_axis):
    sources = write_mixed_pool(tmp_path / "pool")
    pool = ImagePool.load(sources, 42, 28, slice_axis=slice_axis, dataset_root=str(tmp_path / "pool"))
    slices, plane = {2: (9, (31, 26)), 1: (26, (31, 9))}[slice_axis]
    assert [len(pool.cases), len(pool)] == [8, 7 + slices]
    assert {pool.items[i].native_shape for i in range(5, 5 + slices)} == {plane}  # the volume's slices
    assert pool.feature_images.dtype == torch.uint8 and tuple(pool.train_images.shape) == (7 + slices, 3, 28, 28)


def parsed_pool_transforms(**overrides) -> list:
    """medsmile.json's pool_transforms with ``overrides`` (``pool_transforms#1#mode``: ...), parsed by MONAI."""
    parser = ConfigParser()
    parser.read_config(CONFIG)
    parser.update(overrides)
    return parser.get_parsed_content("pool_transforms")


def test_pool_transforms_swapped_in_json_make_the_pool_arrays(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 30), dtype=np.uint8)  # (rows, columns): MONAI's (X, Y) is (30, 20)
    Image.fromarray(image).save(tmp_path / "grey.png")
    sources = [str(tmp_path / "grey.png")]
    nearest = parsed_pool_transforms(**{"pool_transforms#1#mode": "nearest", "pool_transforms#1#anti_aliasing": False})
    pool = ImagePool.load(sources, 14, 56, transforms=nearest)
    # nearest sampling: output pixel i reads input pixel floor(i * in / out), grey repeated into 3 channels
    x, y = np.floor(np.arange(56) * 30 / 56).astype(int), np.floor(np.arange(56) * 20 / 56).astype(int)
    expected = image.T[x][:, y]
    assert np.array_equal(pool.train_images[0].numpy(), np.stack([expected] * 3))
    assert np.array_equal(
        pool.feature_images[0, 0].numpy(), image.T[np.arange(14) * 30 // 14][:, np.arange(14) * 20 // 14]
    )
    # an extra intensity step between the default ones: every value + 0.25, clipped (8-bit: + 63.75 levels)
    shifted = parsed_pool_transforms()
    shifted.insert(1, functools.partial(ShiftIntensityd, keys="image", offset=0.25))
    default, plus = ImagePool.load(sources, 14, 28), ImagePool.load(sources, 14, 28, transforms=shifted)
    want = np.clip(np.round((default.train_images[:].double() / 255 + 0.25) * 255), 0, 255)
    assert np.abs(plus.train_images[:].double().numpy() - want.numpy()).max() <= 1  # rounding before and after
    assert (plus.train_images[:].int() - default.train_images[:].int()).max() == 64


def test_pool_transforms_that_cannot_be_recorded_or_give_another_shape_are_refused(tmp_path):
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "grey.png")
    steps = parsed_pool_transforms()
    with pytest.raises(
        ValueError, match=r'pool_transforms#0 is a IntensityToRGBd object: give it "_mode_": "callable"'
    ):
        ImagePool.load([str(tmp_path / "grey.png")], 14, 28, transforms=[steps[0](), steps[1]])
    with pytest.raises(
        ValueError, match=r"grey.png: pool_transforms gave a torch.float32 image of shape \(3, 30, 20\)"
    ):
        ImagePool.load([str(tmp_path / "grey.png")], 14, 28, transforms=steps[:1])  # no resize


def test_the_default_pool_steps_are_inference_jsons_preprocessing():
    """A model sees at inference what its pool saw: medsmile.json's pool_transforms are the steps of inference.json's
    preprocessing between loading and typing, with the same arguments (inference.json adds what volumes need)."""
    with open(CONFIG) as f:
        pool_steps = json.load(f)["pool_transforms"]
    with open(os.path.join(BUNDLE_ROOT, "configs", "inference.json")) as f:
        inference_steps = json.load(f)["preprocessing"]["transforms"][2:4]
    for pool_step, inference_step in zip(pool_steps, inference_steps, strict=True):
        assert pool_step["_target_"] == inference_step["_target_"]
        args = {k: v for k, v in pool_step.items() if not k.startswith("_") and k != "keys"}
        assert args == {k: inference_step[k] for k in args}
