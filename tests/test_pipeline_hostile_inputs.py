"""Hostile and broken inputs through the whole pipeline: skipped and listed on request, refused with the file's
name otherwise, and no DICOM patient identifier in anything the bundle writes."""

from __future__ import annotations

import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest
import tifffile
from conftest import chain, run_medsmile
from PIL import Image
from test_image_io import write_dicom

BAD = {"zero.png", "truncated.jpg", "nan.nii.gz", "fourd.nii.gz", "nopixels.dcm"}


def add_hostile_files(folder) -> None:
    rng = np.random.default_rng(3)
    (folder / "zero.png").write_bytes(b"")
    buf = folder / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf)
    (folder / "truncated.jpg").write_bytes(buf.read_bytes()[:200])
    buf.unlink()
    nib.save(nib.Nifti1Image(np.full((20, 20, 3), np.nan, dtype=np.float32), np.eye(4)), folder / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 3, 2), dtype=np.float32), np.eye(4)), folder / "fourd.nii.gz")
    write_dicom(folder / "nopixels.dcm", np.zeros((8, 8), dtype=np.int16), with_pixels=False)
    # readable but unusual: constant, extreme aspect ratio, 16-bit, float
    Image.fromarray(np.full((30, 30), 128, dtype=np.uint8)).save(folder / "constant.png")
    Image.fromarray(rng.integers(0, 255, (8, 400, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 65535, (32, 24), dtype=np.uint16)).save(folder / "deep16.png")
    tifffile.imwrite(folder / "float.tif", rng.normal(size=(36, 28)).astype(np.float32))


@pytest.mark.slow
def test_skip_bad_inputs_lists_them_and_keeps_going(tiny_encoder, png_dataset, tmp_path):
    folder = png_dataset["root"] / "images"
    add_hostile_files(folder)
    run_medsmile(
        tiny_encoder,
        tmp_path,
        **{**png_dataset["inputs"], "dataset_dir": str(folder)},
        num_rounds=1,
        skip_bad_inputs=True,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    skipped = {s["source"]: s["reason"] for s in summary["pool"]["skipped"]}
    assert set(skipped) == BAD
    for name, reason in skipped.items():
        assert name in reason  # every reason names its file
    labels = tmp_path / "run" / "round_1" / "labels"
    for name, shape in {"constant": (30, 30), "wide": (8, 400), "deep16": (32, 24), "float": (36, 28)}.items():
        assert np.asarray(Image.open(labels / f"{name}.png")).shape == shape


@pytest.mark.parametrize("bad", sorted(BAD))
def test_each_bad_file_stops_the_run_with_its_name(tiny_encoder, png_dataset, tmp_path, bad):
    folder = png_dataset["root"] / "images"
    add_hostile_files(folder)
    for other in BAD - {bad}:
        os.remove(folder / other)
    with pytest.raises(RuntimeError) as err:
        run_medsmile(
            tiny_encoder,
            tmp_path,
            dataset_dir=str(folder),
            reference_image=png_dataset["reference_image"],
            reference_label=png_dataset["reference_label"],
            num_rounds=1,
        )
    assert "ValueError" in chain(err.value) and bad in chain(err.value)
    assert not (tmp_path / "run" / "round_0").exists()


def test_datalist_entry_outside_the_dataset_is_refused(tiny_encoder, png_dataset, tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"unlabeled": [{"image": "img_0.png"}, {"image": "../reference/ref.png"}]}))
    with pytest.raises(RuntimeError) as err:
        run_medsmile(
            tiny_encoder,
            tmp_path,
            dataset_dir=png_dataset["dataset_dir"],
            datalist=str(datalist),
            reference_image=png_dataset["reference_image"],
            reference_label=png_dataset["reference_label"],
        )
    assert "points outside the dataset folder" in chain(err.value) and "ref.png" in chain(err.value)


@pytest.mark.slow
def test_same_file_name_in_two_folders_gives_two_outputs(tiny_encoder, png_dataset, tmp_path):
    folder = png_dataset["root"] / "images"
    for sub in ("a", "b"):
        (folder / sub).mkdir()
        Image.open(folder / "img_0.png").save(folder / sub / "same.png")
    run_medsmile(
        tiny_encoder,
        tmp_path,
        **{**png_dataset["inputs"], "dataset_dir": str(folder)},
        num_rounds=0,
    )
    labels = tmp_path / "run" / "round_0" / "labels"
    assert (labels / "a" / "same.png").is_file() and (labels / "b" / "same.png").is_file()


@pytest.mark.slow
def test_dicom_patient_identifiers_never_leave_the_input(tiny_encoder, png_dataset, tmp_path, caplog):
    import pydicom

    series = png_dataset["root"] / "images" / "series_a"
    series.mkdir()
    rng = np.random.default_rng(5)
    uid = "1.2.826.0.1.3680043.8.498.77"
    for i in range(3):
        path = series / f"s{i}.dcm"
        write_dicom(path, rng.integers(0, 1000, (40, 36)).astype(np.int16), (0, 0, 2.0 * i), series_uid=uid, instance=i)
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PHI-98765", "19700101"
        ds.save_as(path)
    with caplog.at_level(logging.DEBUG):
        run_medsmile(
            tiny_encoder,
            tmp_path,
            dataset_dir=png_dataset["dataset_dir"],
            reference_image=png_dataset["reference_image"],
            reference_label=png_dataset["reference_label"],
            num_rounds=1,
        )
    assert (tmp_path / "run" / "round_1" / "labels" / "series_a.nii.gz").is_file()
    secrets = [b"Doe", b"Jane", b"PHI-98765", b"19700101"]
    for root, _, files in os.walk(tmp_path / "run"):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = f.read()
            for secret in secrets:
                assert secret not in path.encode() and secret not in data, f"{secret!r} leaked into {path}"
    for secret in secrets:
        assert secret.decode() not in caplog.text
