"""Tests for scripts.image_io: every input format read into slices and label maps written back with the geometry."""

from __future__ import annotations

import dataclasses
import json
import os

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from scripts.image_io import Case, label_slices, list_inputs, read_case, read_label, read_planes, write_label
from scripts.transforms import CASE_WINDOW, IntensityToRGBd

# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def asymmetric(height: int = 30, width: int = 50) -> np.ndarray:
    """uint8 (height, width) image with no symmetry: a ramp plus a bright block near the top-left corner."""
    rows, cols = np.mgrid[0:height, 0:width]
    img = (rows * 3 + cols * 2).astype(np.uint8)
    img[2:7, 3:15] = 250
    return img


def png_view(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def write_dicom(
    path,
    pixels: np.ndarray,
    position=(0.0, 0.0, 0.0),
    pixel_spacing=(0.5, 0.7),
    thickness=2.0,
    series_uid=None,
    instance=1,
    with_pixels=True,
):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "anon"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = float(thickness)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    if with_pixels:
        ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder, n_slices: int = 4, rows: int = 6, cols: int = 8) -> np.ndarray:
    """DICOM series in ``folder``; returns the stored pixels as (slices, rows, cols)."""
    from pydicom.uid import generate_uid

    os.makedirs(folder, exist_ok=True)
    uid = generate_uid()
    stack = []
    # written in reverse order on purpose: the reader must sort by position
    for k in reversed(range(n_slices)):
        pixels = (np.arange(rows * cols).reshape(rows, cols) * 10 + 100 * k).astype(np.int16)
        stack.append(pixels)
        write_dicom(
            os.path.join(folder, f"slice{n_slices - k:03d}.dcm"),
            pixels,
            position=(-10.0, 20.0, 5.0 + 2.0 * k),
            series_uid=uid,
            instance=k + 1,
        )
    return np.stack(stack[::-1])


AFFINE = np.array(
    [
        [0.0, -2.0, 0.0, 10.0],
        [1.5, 0.0, 0.0, -5.0],
        [0.0, 0.0, 3.0, 7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def threshold_label(slices, thr=0.5):
    return [(s[0] > thr).astype(np.int64) for s in slices]


# ----------------------------------------------------------------------------------------------------------------------
# 2-D image files
# ----------------------------------------------------------------------------------------------------------------------


def test_png_orientation_roundtrip(tmp_path):
    img = asymmetric(30, 50)  # 30 rows (height) x 50 columns (width)
    Image.fromarray(img).save(tmp_path / "img.png")
    case, slices = read_case(tmp_path / "img.png", dataset_root=tmp_path)
    assert case.name == "img" and not case.is_volume and case.num_slices() == 1
    assert case.spatial_shape == (50, 30)  # MONAI (X, Y) = (width, height)
    assert len(slices) == 1 and slices[0].shape == (3, 50, 30) and slices[0].dtype == np.float32
    np.testing.assert_array_equal(slices[0][0], img.T.astype(np.float32) / 255)  # 8-bit: exactly /255

    # label derived from the image in slice space, written and viewed with PIL like a user would
    label = (slices[0][0] > 200 / 255).astype(np.int64) + (slices[0][0] > 100 / 255)
    out = write_label(case, [label], tmp_path / "out")
    assert out == str(tmp_path / "out" / "img.png")
    written = Image.open(out)
    assert written.size == (50, 30) and written.mode == "L"
    expected = (img > 200).astype(np.uint8) + (img > 100)
    np.testing.assert_array_equal(png_view(out), expected)
    # the bright block is at the top-left in both the input and the written label
    assert png_view(out)[3, 5] == 2 and png_view(out)[25, 5] == 0
    # re-reading the written label gives the label back in slice space
    np.testing.assert_array_equal(read_label(out, case.spatial_shape), label)


def test_png_rgb_and_rgba(tmp_path):
    img = asymmetric(20, 40)
    rgb = np.stack([img, 255 - img, img // 2], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.concatenate([rgb, np.full(img.shape + (1,), 7, np.uint8)], -1)).save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        case, slices = read_case(tmp_path / name)
        assert slices[0].shape == (3, 40, 20)
        for c in range(3):
            np.testing.assert_array_equal(slices[0][c], rgb[..., c].T.astype(np.float32) / 255)
        out = write_label(case, threshold_label(slices), tmp_path / "out")
        np.testing.assert_array_equal(png_view(out), (img > 127.5).astype(np.uint8))


def test_grey_png_repeated_to_three_channels(tmp_path):
    Image.fromarray(asymmetric(10, 12)).save(tmp_path / "g.png")
    _, slices = read_case(tmp_path / "g.png")
    np.testing.assert_array_equal(slices[0][0], slices[0][1])
    np.testing.assert_array_equal(slices[0][0], slices[0][2])


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".bmp"])
def test_jpg_bmp_roundtrip(tmp_path, suffix):
    img = asymmetric(30, 50)
    path = tmp_path / f"im{suffix}"
    Image.fromarray(img).save(path)
    decoded = np.asarray(Image.open(path))  # JPEG is lossy: compare with what PIL decodes
    case, slices = read_case(path)
    assert case.meta["reader"] == "PILReader"
    np.testing.assert_array_equal(slices[0][0], decoded.T.astype(np.float32) / 255)
    out = write_label(case, threshold_label(slices), tmp_path / "out")
    assert out.endswith("im.png")
    np.testing.assert_array_equal(png_view(out), (decoded > 127.5).astype(np.uint8))


def _percentile_scaled(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x.astype(np.float32), [0.5, 99.5])
    return np.clip((x.astype(np.float32) - lo) / (hi - lo), 0, 1)


def test_tiff_16bit_percentile_scaling(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4000, size=(30, 50)).astype(np.uint16)
    img[0, 0] = 65535  # outlier beyond the 99.5 percentile is clipped
    tifffile.imwrite(tmp_path / "u16.tif", img)
    case, slices = read_case(tmp_path / "u16.tif")
    s = slices[0]
    assert s.shape == (3, 50, 30) and s.dtype == np.float32
    assert s.min() >= 0.0 and s.max() <= 1.0 and s.min() == 0.0 and s.max() == 1.0
    assert s[0, 0, 0] == 1.0
    np.testing.assert_allclose(s[0], _percentile_scaled(img).T, atol=1e-5)
    out = write_label(case, threshold_label(slices), tmp_path / "out")
    np.testing.assert_array_equal(png_view(out), (_percentile_scaled(img) > 0.5).astype(np.uint8))


def test_tiff_float_and_16bit_png(tmp_path):
    img = asymmetric(30, 50).astype(np.float32) / 7 - 3
    tifffile.imwrite(tmp_path / "f.tif", img)
    case, slices = read_case(tmp_path / "f.tif")
    np.testing.assert_allclose(slices[0][0], _percentile_scaled(img).T, atol=1e-5)
    out = write_label(case, threshold_label(slices), tmp_path / "out")
    np.testing.assert_array_equal(png_view(out), (_percentile_scaled(img) > 0.5).astype(np.uint8))

    Image.fromarray(asymmetric(30, 50).astype(np.uint16) * 200).save(tmp_path / "u16.png")
    _, slices = read_case(tmp_path / "u16.png")
    np.testing.assert_allclose(slices[0][0], _percentile_scaled(asymmetric(30, 50).astype(np.uint16) * 200).T, 1e-5)


def test_constant_images_give_zeros(tmp_path):
    tifffile.imwrite(tmp_path / "c16.tif", np.full((8, 9), 1234, np.uint16))
    tifffile.imwrite(tmp_path / "cf.tif", np.full((8, 9), -2.5, np.float32))
    for name in ("c16.tif", "cf.tif"):
        _, slices = read_case(tmp_path / name)
        assert np.isfinite(slices[0]).all()
        np.testing.assert_array_equal(slices[0], np.zeros((3, 9, 8), np.float32))
    Image.fromarray(np.full((8, 9), 51, np.uint8)).save(tmp_path / "c8.png")  # 8-bit keeps its /255 value
    _, slices = read_case(tmp_path / "c8.png")
    np.testing.assert_array_equal(slices[0], np.full((3, 9, 8), np.float32(51) / 255, np.float32))


# ----------------------------------------------------------------------------------------------------------------------
# NIfTI
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 9), (12, 9, 1)])
def test_nifti_2d_roundtrip(tmp_path, shape):
    rng = np.random.default_rng(1)
    data = rng.normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "two_d.nii.gz")
    case, slices = read_case(tmp_path / "two_d.nii.gz")
    assert not case.is_volume and case.spatial_shape == shape and case.num_slices() == 1
    assert slices[0].shape == (3, 12, 9)
    out = write_label(case, threshold_label(slices), tmp_path / "out")
    assert out.endswith("two_d.nii.gz")  # NIfTI in -> NIfTI out, with the geometry
    written = nib.load(out)
    assert written.shape == shape
    np.testing.assert_allclose(written.affine, AFFINE, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), (_percentile_scaled(data) > 0.5).astype(np.uint8))


def test_nifti_3d_roundtrip_non_identity_affine(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(10, 11, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "vol.nii.gz")
    case, slices = read_case(tmp_path / "vol.nii.gz", dataset_root=tmp_path)
    assert case.is_volume and case.slice_axis == 2 and case.num_slices() == 4
    assert case.spatial_shape == (10, 11, 4) and case.meta["reader"] == "NibabelReader"
    json.dumps(dataclasses.asdict(case))  # meta stays small and serialisable (no arrays, no pixel data)
    np.testing.assert_allclose(case.meta["spacing"], [1.5, 2.0, 3.0])
    assert all(s.shape == (3, 10, 11) for s in slices)
    expected = (_percentile_scaled(data) > 0.5).astype(np.uint8)
    np.testing.assert_allclose(np.stack([s[0] for s in slices], -1), _percentile_scaled(data), atol=1e-5)
    out = write_label(case, threshold_label(slices), tmp_path / "out")
    assert out == str(tmp_path / "out" / "vol.nii.gz")
    written = nib.load(out)
    assert written.shape == (10, 11, 4) and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, AFFINE, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    # read_label + label_slices reproduce the written slices
    label = read_label(out, case.spatial_shape)
    np.testing.assert_array_equal(label, expected)
    for a, b in zip(label_slices(case, label), threshold_label(slices)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slicing_along_each_axis(tmp_path, axis):
    shape = (5, 6, 7)
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "v.nii")
    case, slices = read_case(tmp_path / "v.nii", slice_axis=axis)
    rest = tuple(s for i, s in enumerate(shape) if i != axis)
    assert case.slice_axis == axis and case.num_slices() == shape[axis] == len(slices)
    assert case.slice_shape == rest and all(s.shape == (3,) + rest for s in slices)
    scaled = _percentile_scaled(data)
    for i, s in enumerate(slices):
        np.testing.assert_allclose(s[0], np.take(scaled, i, axis=axis), atol=1e-5)
    # labels stacked back along the same axis; a different value per slice checks the order
    labels = [np.full(rest, i % 3, np.int64) for i in range(shape[axis])]
    written = nib.load(write_label(case, labels, tmp_path / "out"))
    assert written.shape == shape
    expected = np.stack(labels, axis=axis)
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)


def test_read_planes_keeps_the_stored_values_and_the_window_of_the_whole_volume(tmp_path):
    data = np.zeros((6, 5, 3), np.int16)
    data[..., 0] = 10  # a flat first slice: on its own, its window would be empty
    data[..., 1] = np.arange(30).reshape(6, 5)
    data[..., 2] = 400
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "v.nii.gz")
    case, planes = read_planes(tmp_path / "v.nii.gz")
    lo, hi = case.meta["intensity_window"]
    assert [p.dtype for p in planes] == [torch.int16] * 3 and all(p.meta[CASE_WINDOW] == (lo, hi) for p in planes)
    np.testing.assert_array_equal(planes[1].numpy()[0], data[..., 1])
    # the pool's first step scales slice 0 with the volume's window, as read_case and inference.json do
    scaled = IntensityToRGBd("image")({"image": planes[0]})["image"]
    np.testing.assert_allclose(scaled.numpy(), np.full((3, 6, 5), (10 - lo) / (hi - lo)), atol=1e-6)
    np.testing.assert_array_equal(scaled.numpy(), read_case(tmp_path / "v.nii.gz")[1][0])


def test_slice_axis_validated(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), AFFINE), tmp_path / "v.nii.gz")
    with pytest.raises(ValueError, match="slice_axis"):
        read_case(tmp_path / "v.nii.gz", slice_axis=3)


# ----------------------------------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------------------------------


def test_dicom_single_file(tmp_path):
    rows, cols = 6, 8
    pixels = np.arange(rows * cols).reshape(rows, cols).astype(np.int16) * 10
    pixels[0, :2] = 900  # asymmetric
    write_dicom(tmp_path / "xray.dcm", pixels)
    case, slices = read_case(tmp_path / "xray.dcm", dataset_root=tmp_path)
    assert case.name == "xray" and not case.is_volume and case.spatial_shape == (cols, rows)
    np.testing.assert_allclose(slices[0][0], _percentile_scaled(pixels - 1024.0).T, atol=1e-5)
    out = write_label(case, threshold_label(slices), tmp_path / "out")
    assert out.endswith("xray.png")
    # PNG shown like a DICOM viewer shows the image: rows down, columns across
    np.testing.assert_array_equal(png_view(out), (_percentile_scaled(pixels - 1024.0) > 0.5).astype(np.uint8))


def test_dicom_series_folder(tmp_path):
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    stack = write_series(tmp_path / "series_a", n_slices=4)  # (slices, rows, cols)
    case, slices = read_case(tmp_path / "series_a", dataset_root=tmp_path)
    assert case.name == "series_a" and case.is_volume and case.num_slices() == 4 and len(slices) == 4
    monai_img = LoadImage(image_only=True)(str(tmp_path / "series_a"), reader=PydicomReader())
    assert case.spatial_shape == tuple(monai_img.shape) == (8, 6, 4)
    np.testing.assert_allclose(case.meta["affine"], monai_img.affine.numpy(), atol=1e-6)
    np.testing.assert_allclose(case.meta["spacing"], [0.7, 0.5, 2.0], atol=1e-6)
    # slices sorted by position: slice k is stack[k] seen as (cols, rows)
    volume = stack.astype(np.float32) - 1024
    for k, s in enumerate(slices):
        np.testing.assert_allclose(s[0], _percentile_scaled(volume)[k].T, atol=1e-5)

    out = write_label(case, threshold_label(slices), tmp_path / "out")
    assert out == str(tmp_path / "out" / "series_a.nii.gz")
    written = nib.load(out)
    assert written.shape == tuple(monai_img.shape)
    np.testing.assert_allclose(written.header.get_zooms(), monai_img.pixdim.numpy(), atol=1e-5)
    np.testing.assert_allclose(written.affine, monai_img.affine.numpy(), atol=1e-5)
    expected = np.stack([(_percentile_scaled(volume)[k].T > 0.5) for k in range(4)], axis=-1)
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected.astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------------


def test_zero_byte_png(tmp_path):
    (tmp_path / "empty_file.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty_file\.png.*empty"):
        read_case(tmp_path / "empty_file.png")


def test_truncated_png(tmp_path):
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut_short.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut_short\.png.*truncated"):
        read_case(tmp_path / "cut_short.png")


def test_4d_nifti(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), AFFINE), tmp_path / "four_d.nii.gz")
    with pytest.raises(ValueError, match=r"four_d\.nii\.gz.*4-D"):
        read_case(tmp_path / "four_d.nii.gz")
    # a singleton 4th dimension is just a 3-D volume
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.float32), AFFINE), tmp_path / "single_t.nii.gz")
    case, slices = read_case(tmp_path / "single_t.nii.gz")
    assert case.spatial_shape == (4, 5, 6) and len(slices) == 6


def test_nan_nifti(tmp_path):
    data = np.ones((4, 5, 3), np.float32)
    data[1, 2, 0] = np.nan
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "has_nan.nii.gz")
    with pytest.raises(ValueError, match=r"has_nan\.nii\.gz.*NaN"):
        read_case(tmp_path / "has_nan.nii.gz")


def test_label_shape_mismatch(tmp_path):
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(tmp_path / "small_mask.png")
    with pytest.raises(ValueError, match=r"small_mask\.png.*\(20, 10\).*\(50, 30\)"):
        read_label(tmp_path / "small_mask.png", spatial_shape=(50, 30))


def test_dicom_without_pixel_data(tmp_path):
    write_dicom(tmp_path / "no_pixels.dcm", np.zeros((4, 4), np.int16), with_pixels=False)
    with pytest.raises(ValueError, match=r"no_pixels\.dcm"):
        read_case(tmp_path / "no_pixels.dcm")


def test_unsupported_and_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt.*unsupported"):
        read_case(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"missing\.png.*no such file"):
        read_case(tmp_path / "missing.png")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(ValueError, match=r"junk\.nii\.gz.*NibabelReader"):
        read_case(tmp_path / "junk.nii.gz")


def test_write_label_validates_slices(tmp_path):
    Image.fromarray(asymmetric(10, 12)).save(tmp_path / "a.png")
    case, _ = read_case(tmp_path / "a.png")
    with pytest.raises(ValueError, match="shape"):
        write_label(case, [np.zeros((10, 12), np.int64)], tmp_path / "out")  # (H, W) instead of (X, Y)
    with pytest.raises(ValueError, match="expected 1 label slices"):
        write_label(case, [np.zeros((12, 10), np.int64)] * 2, tmp_path / "out")
    with pytest.raises(ValueError, match="uint8"):
        write_label(case, [np.full((12, 10), 300, np.int64)], tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------------------------------------


def test_read_label_value_mapping(tmp_path):
    mask = np.zeros((10, 16), np.uint8)
    mask[2:5, 3:9] = 255
    Image.fromarray(mask).save(tmp_path / "m255.png")
    label = read_label(tmp_path / "m255.png", num_classes=2)
    assert label.dtype == np.int64 and label.shape == (16, 10)
    np.testing.assert_array_equal(label, (mask > 0).T.astype(np.int64))

    Image.fromarray((mask > 0).astype(np.uint8) * 3).save(tmp_path / "m3.png")
    np.testing.assert_array_equal(read_label(tmp_path / "m3.png", num_classes=2), (mask > 0).T)
    np.testing.assert_array_equal(read_label(tmp_path / "m3.png"), (mask > 0).T * 3)

    multi = (mask > 0).astype(np.uint8)
    multi[7:9, 10:12] = 2  # three classes stay as they are
    Image.fromarray(multi).save(tmp_path / "multi.png")
    np.testing.assert_array_equal(read_label(tmp_path / "multi.png", num_classes=3), multi.T)

    rgb = np.stack([mask, np.zeros_like(mask), np.full_like(mask, 9)], -1)
    Image.fromarray(rgb).save(tmp_path / "rgb_mask.png")
    np.testing.assert_array_equal(read_label(tmp_path / "rgb_mask.png", num_classes=2), (mask > 0).T)

    pal = Image.fromarray(multi, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_label(tmp_path / "palette.png", num_classes=3), multi.T)  # indices, not colours

    Image.fromarray(mask > 0).save(tmp_path / "bilevel.png")  # mode "1"
    np.testing.assert_array_equal(read_label(tmp_path / "bilevel.png", num_classes=2), (mask > 0).T)


def test_read_label_nifti_and_singleton_shapes(tmp_path):
    lab = np.zeros((6, 7, 1), np.float32)
    lab[1:3, 2:5, 0] = 1
    nib.save(nib.Nifti1Image(lab, AFFINE), tmp_path / "lab.nii.gz")
    out = read_label(tmp_path / "lab.nii.gz")
    assert out.dtype == np.int64 and out.shape == (6, 7, 1)
    assert read_label(tmp_path / "lab.nii.gz", spatial_shape=(6, 7)).shape == (6, 7)
    with pytest.raises(ValueError, match=r"lab\.nii\.gz"):
        read_label(tmp_path / "lab.nii.gz", spatial_shape=(7, 6))


# ----------------------------------------------------------------------------------------------------------------------
# listing and naming
# ----------------------------------------------------------------------------------------------------------------------


def test_list_inputs_and_case_names(tmp_path):
    img = asymmetric(8, 10)
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / ".cache").mkdir()
    Image.fromarray(img).save(tmp_path / "a" / "img01.png")
    Image.fromarray(img).save(tmp_path / "b" / "img01.png")  # same name, other folder
    Image.fromarray(img).save(tmp_path / "a" / "deep" / "x.jpg")
    Image.fromarray(img).save(tmp_path / "a" / ".hidden.png")
    Image.fromarray(img).save(tmp_path / ".cache" / "skipped.png")
    (tmp_path / "a" / "readme.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), AFFINE), tmp_path / "vol.nii.gz")
    write_series(tmp_path / "series_a", n_slices=3)
    write_dicom(tmp_path / "b" / "single.dcm", np.zeros((4, 4), np.int16))
    Image.fromarray(img).save(tmp_path / "b" / "twin.png")  # same stem, two formats in one folder
    Image.fromarray(img).save(tmp_path / "b" / "twin.bmp")

    found = list_inputs(tmp_path)
    rel = [os.path.relpath(p, tmp_path) for p in found]
    assert rel == sorted(rel)
    assert rel == sorted(
        [
            "a/deep/x.jpg",
            "a/img01.png",
            "b/img01.png",
            "b/single.dcm",
            "b/twin.bmp",
            "b/twin.png",
            "series_a",
            "vol.nii.gz",
        ]
    )
    cases = [read_case(p, dataset_root=tmp_path)[0] for p in found]
    names = {os.path.relpath(c.source, tmp_path): c.name for c in cases}
    assert names["a/img01.png"] == "a/img01" and names["b/img01.png"] == "b/img01"
    assert names["series_a"] == "series_a" and names["vol.nii.gz"] == "vol" and names["a/deep/x.jpg"] == "a/deep/x"
    assert names["b/twin.png"] != names["b/twin.bmp"]
    assert len(set(names.values())) == len(names)

    outputs = {write_label(c, [np.zeros(c.slice_shape, np.int64)] * c.num_slices(), tmp_path / "out") for c in cases}
    assert len(outputs) == len(cases)
    assert str(tmp_path / "out" / "a" / "img01.png") in outputs and str(tmp_path / "out" / "series_a.nii.gz") in outputs


def test_folder_of_unrelated_dicoms_is_listed_per_file(tmp_path):
    for i in range(3):  # every file is its own series (e.g. one radiograph each)
        write_dicom(tmp_path / f"xr{i}.dcm", np.full((4, 5), i, np.int16))
    assert [os.path.basename(p) for p in list_inputs(tmp_path)] == ["xr0.dcm", "xr1.dcm", "xr2.dcm"]


def test_write_is_atomic_and_creates_folders(tmp_path):
    Image.fromarray(asymmetric(10, 12)).save(tmp_path / "a.png")
    case, _ = read_case(tmp_path / "a.png")
    case.name = "deep/er/a"
    out_dir = tmp_path / "o"
    path = write_label(case, [np.ones((12, 10), np.int64)], out_dir)
    assert path == str(out_dir / "deep" / "er" / "a.png")
    assert sorted(os.listdir(out_dir / "deep" / "er")) == ["a.png"]  # no temporary left behind
    path = write_label(case, [np.zeros((12, 10), np.int64)], out_dir)  # overwrite in place
    assert png_view(path).max() == 0 and sorted(os.listdir(out_dir / "deep" / "er")) == ["a.png"]


def test_case_is_plain_dataclass():
    case = Case(source="x", name="x", is_volume=True, slice_axis=1, spatial_shape=(4, 5, 6), meta={})
    assert case.num_slices() == 5 and case.slice_shape == (4, 6)


def test_one_label_rule_for_every_reader(tmp_path):
    """0/255, 0/1 and multi-class maps mean the same through read_label and the metrics (which call it); a grey
    {0, 128, 255} map is refused, naming the file."""
    from scripts.metrics import evaluate_folders

    mask = np.zeros((10, 16), np.uint8)
    mask[2:5, 3:9] = 1
    multi = mask.copy()
    multi[7:9, 10:12] = 2
    for folder, binary in (("m255", mask * 255), ("m01", mask)):
        (tmp_path / folder).mkdir()
        Image.fromarray(binary).save(tmp_path / folder / "a.png")
        Image.fromarray(multi).save(tmp_path / folder / "multi.png")
    for folder in ("m255", "m01"):
        np.testing.assert_array_equal(read_label(tmp_path / folder / "a.png", num_classes=2), mask.T)
        np.testing.assert_array_equal(read_label(tmp_path / folder / "multi.png", num_classes=3), multi.T)
    # the metrics read both folders with the same rule: identical maps, Dice 1 for every class of every image
    scores = evaluate_folders(str(tmp_path / "m255"), str(tmp_path / "m01"), num_classes=3)
    assert scores["num_images"] == 2 and scores["mean_dice"] == 1.0

    grey = mask * 128
    grey[0, 0] = 255
    Image.fromarray(grey).save(tmp_path / "m255" / "grey.png")
    with pytest.raises(ValueError, match=r"grey\.png: label values \{0, 128, 255\}"):
        read_label(tmp_path / "m255" / "grey.png", num_classes=2)
    Image.fromarray(grey).save(tmp_path / "m01" / "grey.png")
    with pytest.raises(ValueError, match=r"grey\.png: label values"):
        evaluate_folders(str(tmp_path / "m255"), str(tmp_path / "m01"), num_classes=2)
