"""The MONAI Deploy app (bundle/deploy) end to end on CPU: DICOM -> DICOM SEG, PNG/NIfTI -> PNG/NIfTI masks.

A tiny model is trained with medsmile.json (as in test_pipeline.py) and assembled into a bundle folder (configs,
scripts, models). The app runs in-process; every mask it writes is compared, pixel for pixel, with inference.json run
by ``monai.bundle.run`` on the same pixels with the same ``models/model.ts``:

* DICOM volume: inference.json on PNG files holding each slice as the app hands it to the pre-processing (the whole
  series windowed with ``scripts.image_io.scale_intensity``, 8-bit), compared with the SEG frame of that slice's SOP
  instance (``get_pixels_by_source_instance``);
* single-slice DICOM: inference.json on its raw pixels (saved as a 2-D NIfTI);
* PNG: inference.json directly on the PNG files (``<name>_seg.png`` against ``<name>_seg.png``);
* NIfTI volume (the CT's voxels): the app's file route must write the masks of its DICOM route, with the geometry,
  and inference.json's own volume route (slice by slice) the same NIfTI;
* a bare ``model.ts`` (``-m models/model.ts``) with the configs the export embeds: the SEG of the bundle folder; one
  without them is refused with the reason.

The tiny model predicts one class everywhere (1 epoch on 6 images), which cannot reveal a transposed or misordered
mask; so the same comparisons are also made with a contrast-sensitive TorchScript network put in the same bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, TINY_OVERRIDES
from monai.bundle import run
from PIL import Image

pytest.importorskip("monai.deploy", reason="MONAI Deploy App SDK not installed (pip install -e '.[deploy]')")
hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from deploy.app import MedSmileSegApp  # after the importorskip guards

CONFIGS = os.path.join(BUNDLE_ROOT, "configs")
SIZE = TINY_OVERRIDES["image_size"]


class ContrastProbe(torch.nn.Module):
    """(B, 3, H, W) in [0, 1] -> 2-class log-probabilities: class 1 where the (smoothed) grey level is above 0.5."""

    def forward(self, x):
        grey = torch.nn.functional.avg_pool2d(x.mean(dim=1, keepdim=True), 3, stride=1, padding=1)
        logit = 12.0 * (grey - 0.5)
        return torch.log_softmax(torch.cat([-logit, logit], dim=1), dim=1)


def make_bundle(folder, models_dir, model_ts=None):
    """Bundle folder for the app: configs, scripts, models (inference.json takes the trained size from network.json)."""
    shutil.copytree(CONFIGS, folder / "configs")
    shutil.copytree(
        os.path.join(BUNDLE_ROOT, "scripts"), folder / "scripts", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(models_dir, folder / "models")
    if model_ts is not None:
        shutil.copyfile(model_ts, folder / "models" / "model.ts")
    return folder


def write_series(folder, arrays, *, rescale=None):
    """Single-frame DICOM files of one series (one per 2-D array, stacked along z); returns the SOP instance UIDs."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    sop_class = CTImageStorage if rescale else MRImageStorage
    sops = []
    for k, pixels in enumerate(arrays):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, sop, "CT" if rescale else "MR"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Deploy^Test", "MEDSMILE-007", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.AccessionNumber = "1", 3, k + 1, ""
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName, ds.Manufacturer = "20260101", "120000", "", "test"
        ds.ImagePositionPatient = [-20.0, -10.0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.7], 2.5
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
        if rescale:
            ds.RescaleIntercept, ds.RescaleSlope = rescale
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.save_as(folder / f"im_{k}.dcm", enforce_file_format=True)
        sops.append(sop)
    return sops


def disc(rows, cols, cy, cx, r):
    yy, xx = np.mgrid[0:rows, 0:cols]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def run_app(bundle, inputs, out):
    app = MedSmileSegApp([sys.executable, "app.py", "-i", str(inputs), "-o", str(out), "-m", str(bundle)])
    app.run()
    return app


def run_inference_json(bundle, dataset_dir, out):
    """inference.json as shipped (LoadImaged ... SaveImaged), with the bundle's model.ts as the network."""
    run(
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        network=f"$torch.jit.load({str(bundle / 'models' / 'model.ts')!r})",
        handlers=[],  # no CheckpointLoader: the TorchScript model carries its weights
        dataset_dir=str(dataset_dir),
        output_dir=str(out),
        device="$torch.device('cpu')",
    )


def read_seg(out_dir, series_sops):
    files = sorted(out_dir.glob("*.dcm"))
    assert len(files) == 1, f"expected one DICOM SEG in {out_dir}, got {files}"
    seg = hd.seg.segread(files[0])
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    return seg, seg.get_pixels_by_source_instance(source_sop_instance_uids=series_sops, combine_segments=True)


def png_mask(path):
    return np.asarray(Image.open(path))


@pytest.mark.slow
def test_deploy_app_dicom_seg_and_png_masks_equal_bundle_inference(tiny_encoder, png_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the app puts the bundle folders on sys.path
    # 1. a tiny model, as test_pipeline trains it (one round), in a bundle folder; and the probe network's bundle
    run(
        config_file=os.path.join(CONFIGS, "medsmile.json"),
        bundle_root=BUNDLE_ROOT,
        output_dir=str(tmp_path / "run"),
        model_path=str(tmp_path / "models" / "model.pt"),
        encoder_weights=tiny_encoder,
        dataset_dir=png_dataset["dataset_dir"],
        reference_image=png_dataset["reference_image"],
        reference_label=png_dataset["reference_label"],
        **{**TINY_OVERRIDES, "num_rounds": 1},
    )
    trained = make_bundle(tmp_path / "bundle_trained", tmp_path / "models")
    probe_ts, probe_bare_ts = tmp_path / "probe.ts", tmp_path / "probe_bare" / "model.ts"
    traced_probe = torch.jit.trace(ContrastProbe().eval(), torch.rand(1, 3, SIZE, SIZE))
    torch.jit.save(traced_probe, str(probe_ts))  # no bundle configs embedded
    probe = make_bundle(tmp_path / "bundle_probe", tmp_path / "models", model_ts=probe_ts)
    # the probe as a bare model.ts carrying the configs the export embedded in the trained model.ts
    extra = {"inference.json": "", "metadata.json": ""}
    torch.jit.load(str(tmp_path / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["inference.json"])["image_size"] == SIZE
    probe_bare_ts.parent.mkdir()
    torch.jit.save(traced_probe, str(probe_bare_ts), _extra_files=extra)

    # 2. DICOM inputs: a 3-slice CT-like series (48 x 60, stored HU + 1024, intercept -1024), a 1-slice MR-like image
    rng = np.random.default_rng(3)
    rows, cols = 48, 60  # not square: a transposed mask would not even fit
    discs = [disc(rows, cols, 18 + 4 * k, 22 + 6 * k, 11) for k in range(3)]
    stored = [np.rint(np.where(d, 1084.0, 174.0) + rng.normal(0, 40, d.shape)).astype(np.int16) for d in discs]
    ct_sops = write_series(tmp_path / "ct", stored, rescale=(-1024, 1))
    hu = np.stack(stored).astype(np.float32) - 1024  # (slices, rows, cols), what the SDK's series-to-volume gives
    mr = (np.where(disc(50, 64, 30, 20, 13), 900, 250) + rng.normal(0, 60, (50, 64))).clip(0, 4000).astype(np.uint16)
    mr_sops = write_series(tmp_path / "mr", [mr])

    # 3. inference.json's inputs: each CT slice as the app hands it over (series window, 8 bit) and the MR pixels
    from scripts.image_io import scale_intensity

    window, _ = scale_intensity(hu)
    ref_in = tmp_path / "ref_inputs"
    ref_in.mkdir()
    for k, plane in enumerate(window):
        Image.fromarray(np.rint(np.clip(plane, 0, 1) * 255).astype(np.uint8)).save(ref_in / f"ct_{k}.png")
    # the MR pixels as a 2-D NIfTI in MONAI (X, Y) = (columns, rows) order; inference.json on the .dcm file itself
    # writes a wrongly shaped mask (LoadImaged reads it as (X, Y, 1) and SaveImaged keeps that spatial_shape)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(mr.T), np.eye(4)), ref_in / "mr_0.nii.gz")
    # the CT volume as NIfTI (X, Y, Z): the file route of the app must give the same masks as the DICOM route
    nifti_in = tmp_path / "nifti_in"
    nifti_in.mkdir()
    nib.save(
        nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.int16), np.eye(4)), nifti_in / "ct.nii.gz"
    )

    ct_masks = {}
    for name, bundle in (("trained", trained), ("probe", probe)):
        ref_out = tmp_path / f"ref_{name}"
        run_inference_json(bundle, ref_in, ref_out)

        # DICOM volume -> DICOM SEG: references the source series, patient and study; frame k == inference.json
        out = tmp_path / f"seg_ct_{name}"
        assert run_app(bundle, tmp_path / "ct", out).mode == "dicom"
        seg, frames = read_seg(out, ct_sops)
        source = pydicom.dcmread(tmp_path / "ct" / "im_0.dcm")
        referenced = seg.ReferencedSeriesSequence[0]
        assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
        assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == set(ct_sops)
        assert (seg.StudyInstanceUID, seg.PatientID, str(seg.PatientName)) == (
            source.StudyInstanceUID,
            "MEDSMILE-007",
            "Deploy^Test",
        )
        assert seg.SeriesInstanceUID != source.SeriesInstanceUID
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion"]  # metadata.json channel_def "1"
        assert int(seg.NumberOfFrames) == 3 and frames.shape == (3, rows, cols)
        for k in range(3):
            np.testing.assert_array_equal(frames[k], png_mask(ref_out / f"ct_{k}_seg.png"), err_msg=f"{name}: CT {k}")
        ct_masks[name] = frames

        # the same series with a bare TorchScript model (-m model.ts): its embedded inference.json and metadata.json
        # give the same SEG as the bundle folder
        bare = tmp_path / "models" / "model.ts" if name == "trained" else probe_bare_ts
        out = tmp_path / f"seg_ct_{name}_bare_ts"
        assert run_app(bare, tmp_path / "ct", out).mode == "dicom"
        bare_seg, bare_frames = read_seg(out, ct_sops)
        assert [s.SegmentLabel for s in bare_seg.SegmentSequence] == ["lesion"]
        np.testing.assert_array_equal(bare_frames, frames, err_msg=f"{name}: bare model.ts")

        # single-slice DICOM -> DICOM SEG; reference: inference.json on the raw pixels (no windowing by the app)
        out = tmp_path / f"seg_mr_{name}"
        run_app(bundle, tmp_path / "mr", out)
        _, mr_frames = read_seg(out, mr_sops)
        np.testing.assert_array_equal(mr_frames[0], png_mask(ref_out / "mr_0_seg.png"), err_msg=f"{name}: MR")

        # PNG files -> PNG masks named as inference.json names them
        png_ref, png_out = tmp_path / f"ref_png_{name}", tmp_path / f"png_{name}"
        run_inference_json(bundle, png_dataset["dataset_dir"], png_ref)
        assert run_app(bundle, png_dataset["dataset_dir"], png_out).mode == "files"
        for image_name, (h, w) in png_dataset["sizes"].items():
            mask = png_mask(png_out / f"{image_name}_seg.png")
            assert mask.shape == (h, w)
            np.testing.assert_array_equal(mask, png_mask(png_ref / f"{image_name}_seg.png"), err_msg=image_name)

    # NIfTI volume -> NIfTI mask with the input's geometry, equal to the DICOM route's masks (probe network), and
    # to inference.json's own volume route (slice by slice, NIfTI out)
    run_app(probe, nifti_in, tmp_path / "nifti_out")
    written = nib.load(tmp_path / "nifti_out" / "ct_seg.nii.gz")
    assert written.shape == (cols, rows, 3)
    np.testing.assert_array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), ct_masks["probe"])
    run_inference_json(probe, nifti_in, tmp_path / "nifti_ref")
    by_config = nib.load(tmp_path / "nifti_ref" / "ct_seg.nii.gz")
    np.testing.assert_allclose(by_config.affine, written.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(by_config.dataobj), np.asarray(written.dataobj))

    # a bundle folder with models/model.pt + network.json and no model.ts: the weights loaded into network_def give
    # the masks of the traced model
    pt_only = make_bundle(tmp_path / "bundle_pt", tmp_path / "models")
    (pt_only / "models" / "model.ts").unlink()
    run_app(pt_only, png_dataset["dataset_dir"], tmp_path / "png_pt")
    for image_name in png_dataset["sizes"]:
        expected = png_mask(tmp_path / "png_trained" / f"{image_name}_seg.png")
        np.testing.assert_array_equal(png_mask(tmp_path / "png_pt" / f"{image_name}_seg.png"), expected)

    # a TorchScript model without the bundle's configs embedded is refused with the reason
    with pytest.raises(ValueError, match=r"probe\.ts: no metadata\.json embedded in this TorchScript model"):
        run_app(probe_ts, tmp_path / "ct", tmp_path / "seg_refused")

    # the probe's masks are not trivial (the trained tiny model's are one class), so the comparisons above did check
    # placement, orientation and slice order
    assert all(0 < f.mean() < 1 for f in ct_masks["probe"]) and 0 < mr_frames[0].mean() < 1
    assert all((ct_masks["probe"][k] == discs[k]).mean() > 0.9 for k in range(3))
