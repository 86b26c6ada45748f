"""Issue 37: hostile inputs and operator errors. Tiny and huge images are refused at reading time (named, skippable),
every option is checked before any compute, the bundle's own errors end the command's output with one clear line,
a retry may add --skip_bad_inputs, empty inputs are errors, and a failing attempt never touches a finished run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, CONFIGS, TINY_OVERRIDES, chain, run_medsmile
from monai.bundle import run
from PIL import Image
from test_image_io import write_dicom

from scripts import image_io
from scripts.image_io import read_case
from scripts.pipeline import MedSMILEPipeline
from scripts.pool import ImagePool, pool_sources

REPO = os.path.dirname(BUNDLE_ROOT)


def write_png(path, height, width):
    Image.fromarray(np.full((height, width, 3), 120, dtype=np.uint8)).save(path)
    return str(path)


def folder_digest(*folders) -> dict[str, str]:
    """sha256 of every file under the folders, by path: equal digests mean byte-identical folders."""
    out = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------------- 1. tiny images
@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 100), (100, 1), (7, 50)])
def test_tiny_images_are_refused_with_their_name_or_skipped(tmp_path, height, width):
    good = write_png(tmp_path / "good.png", 30, 40)
    tiny = write_png(tmp_path / "tiny.png", height, width)
    with pytest.raises(ValueError, match=r"tiny\.png: its 2-D images are .* below the minimum of 8 pixels a side"):
        ImagePool.load([good, tiny], 28, 28)
    pool = ImagePool.load([good, tiny], 28, 28, skip_bad_inputs=True)
    assert len(pool) == 1 and [s["source"] for s in pool.skipped] == ["tiny.png"]
    assert "--skip_bad_inputs true" not in pool.skipped[0]["reason"]  # the hint is for the run that stops


def test_eight_pixel_side_is_accepted(tmp_path):
    pool = ImagePool.load([write_png(tmp_path / "thin.png", 8, 400)], 28, 28)
    assert len(pool) == 1 and pool.items[0].native_shape == (400, 8)


@pytest.mark.slow
def test_tiny_images_in_the_pool_are_skipped_by_the_whole_run(tiny_encoder, png_dataset, tmp_path):
    write_png(png_dataset["root"] / "images" / "one.png", 1, 1)
    write_png(png_dataset["root"] / "images" / "strip.png", 1, 100)  # width 100, height 1
    run_medsmile(tiny_encoder, tmp_path, **png_dataset["inputs"], num_rounds=0, skip_bad_inputs=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted(s["source"] for s in summary["pool"]["skipped"]) == ["one.png", "strip.png"]
    assert summary["pool"]["images"] == 6


# ---------------------------------------------------------------------------------------------------- 2. huge images
@pytest.fixture
def no_decoding(monkeypatch):
    """Any decoding attempt fails the test: the size must be refused from the header alone."""

    def fail(*args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(image_io, "_loader", lambda: fail)


def test_huge_png_is_refused_from_its_header(tmp_path, no_decoding):
    path = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(path)  # 100 million pixels, a few KB on disk
    assert path.stat().st_size < 200_000
    with pytest.raises(ValueError, match=r"huge\.png: 10000 x 10000 is 100,000,000 pixels per image, above the limit"):
        read_case(path)


def test_huge_inputs_are_skippable(tmp_path):
    Image.new("1", (10_000, 10_000)).save(tmp_path / "huge.png")
    good = write_png(tmp_path / "good.png", 30, 40)
    pool = ImagePool.load([good, str(tmp_path / "huge.png")], 28, 28, skip_bad_inputs=True)
    assert len(pool) == 1 and pool.skipped[0]["source"] == "huge.png"
    assert "above the limit of 25,000,000" in pool.skipped[0]["reason"]


def test_volume_and_dicom_sizes_come_from_their_headers(tmp_path, monkeypatch, no_decoding):
    nib.save(nib.Nifti1Image(np.zeros((20, 30, 40), np.int16), np.eye(4)), tmp_path / "vol.nii.gz")
    write_dicom(tmp_path / "x.dcm", np.zeros((40, 30), np.int16))
    monkeypatch.setattr(image_io, "MAX_VOLUME_VOXELS", 20 * 30 * 40 - 1)
    with pytest.raises(ValueError, match=r"vol\.nii\.gz: 20 x 30 x 40 is 24,000 voxels, above the limit of 23,999"):
        read_case(tmp_path / "vol.nii.gz")
    monkeypatch.setattr(image_io, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"x\.dcm: 30 x 40 is 1,200 pixels per image, above the limit of 1,000"):
        read_case(tmp_path / "x.dcm")


# ----------------------------------------------------------------------------- 3. one clear line on the command line
def bundle_command(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/medsmile.json", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=300, env=env, check=False)


def tiny_args(encoder: str, out, **extra) -> list[str]:
    options = {**TINY_OVERRIDES, "encoder_weights": encoder, "output_dir": str(out / "run"), **extra}
    options["model_path"] = str(out / "models" / "model.pt")
    return [x for k, v in options.items() for x in (f"--{k}", str(v))]


@pytest.mark.slow
def test_bad_option_ends_the_output_with_one_line_after_the_debug_traceback(tiny_encoder, tmp_path):
    debug = bundle_command(*tiny_args(tiny_encoder, tmp_path, batch_size=0, log_level="DEBUG"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "Failed to instantiate" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1] == "ERROR: batch_size=0 must be a whole number >= 1"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bad_input_ends_the_output_with_its_name_and_the_fix(tiny_encoder, png_dataset, tmp_path):
    (png_dataset["root"] / "images" / "empty.png").write_bytes(b"")
    inputs = {k: png_dataset[k] for k in ("dataset_dir", "reference_image", "reference_label")}
    done = bundle_command(*tiny_args(tiny_encoder, tmp_path, num_rounds=0, **inputs))
    assert done.returncode == 1
    last = done.stderr.rstrip().splitlines()[-1]
    assert last.startswith("ERROR: Cannot read ") and "empty.png: file is empty (0 bytes)" in last
    assert last.endswith("pass --skip_bad_inputs true) [--log_level DEBUG shows the traceback]")
    assert "Traceback" not in done.stderr and "ConfigExpression" not in done.stderr


def test_a_bug_keeps_its_traceback():
    from scripts.errors import bundle_error

    try:
        try:
            {}["missing"]
        except KeyError as err:
            raise RuntimeError("Failed to evaluate ConfigExpression") from err
    except RuntimeError as err:
        assert bundle_error(err) is None  # neither raised by scripts/ on purpose: full traceback
    try:
        MedSMILEPipeline(output_dir="x", model_path="m", knn_k=0)
    except ValueError as err:
        assert bundle_error(RuntimeError("wrapper")) is None and bundle_error(err) is err


# ------------------------------------------------------------------------------------- 4. options checked up front
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("loss", "foo", "loss='foo' must be one of ('mask2former', 'dicece')"),
        ("batch_size", 0, "batch_size=0 must be a whole number >= 1"),
        ("uncertainty_quantile", 1.5, "uncertainty_quantile=1.5 must be a number in (0, 1)"),
        ("num_rounds", -1, "num_rounds=-1 must be a whole number >= 0"),
        ("epochs", 0, "epochs=0 must be a whole number >= 1"),
        ("knn_k", 2.5, "knn_k=2.5 must be a whole number >= 1"),
        ("learning_rate", 0, "learning_rate=0 must be a number > 0"),
        ("head_learning_rate", -1, "head_learning_rate=-1.0 must be null or a number > 0"),
        ("hidden_dim", 30, "hidden_dim=30 must be a positive multiple of the attention head count 4"),
        ("image_size", 100, "image_size=100 must be a positive multiple of the DINOv2 patch size 14"),
        ("slice_axis", 3, "slice_axis=3 must be one of (0, 1, 2)"),
        ("pool_store", "ram", "pool_store='ram' must be one of ('disk', 'memory')"),
        ("num_classes", 1, "num_classes=1 must be a whole number >= 2"),
        ("batch_size", "4x", "batch_size='4x' must be a whole number >= 1"),
        ("feature_layers", [], "feature_layers=[] must be a non-empty list"),
    ],
)
def test_every_option_is_checked_before_any_compute(tmp_path, option, value, message):
    with pytest.raises(ValueError) as err:
        MedSMILEPipeline(output_dir=str(tmp_path / "run"), model_path=str(tmp_path / "m.pt"), **{option: value})
    assert message in str(err.value)
    assert not os.listdir(tmp_path)


def test_a_bad_option_fails_before_the_encoder_is_read(png_dataset, tmp_path):
    with pytest.raises(RuntimeError) as err:  # the encoder folder does not exist: the option is checked first
        run_medsmile(str(tmp_path / "no_encoder"), tmp_path, **png_dataset["inputs"], uncertainty_quantile=1.5)
    assert "uncertainty_quantile=1.5 must be a number in (0, 1)" in chain(err.value)
    assert not (tmp_path / "run").exists()


def test_cuda_without_a_gpu_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda': no GPU is available .* use --device cpu"):
        MedSMILEPipeline(output_dir=str(tmp_path), model_path="m.pt", device="cuda")
    with pytest.raises(ValueError, match=r"device='gpu' must be 'cpu', 'cuda' or 'cuda:N'"):
        MedSMILEPipeline(output_dir=str(tmp_path), model_path="m.pt", device="gpu")


@pytest.mark.slow
def test_an_unfinished_run_does_not_refuse_the_corrected_command(tiny_encoder, png_dataset, tmp_path, monkeypatch):
    def fail(self, *args):
        raise RuntimeError("stopped in round 0")

    monkeypatch.setattr(MedSMILEPipeline, "_round0", fail)
    with pytest.raises(RuntimeError):
        run_medsmile(tiny_encoder, tmp_path, **png_dataset["inputs"], num_rounds=0, knn_k=9)
    assert (tmp_path / "run" / "run_config.json").is_file()  # recorded, but no round finished
    monkeypatch.undo()
    run_medsmile(tiny_encoder, tmp_path, **png_dataset["inputs"], num_rounds=0, knn_k=3)
    record = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert record["config"]["knn_k"] == 3 and (tmp_path / "run" / "round_0" / "round.json").is_file()


# ------------------------------------------------------------------------------- 5. retry with --skip_bad_inputs
@pytest.mark.slow
def test_skip_bad_inputs_may_be_added_on_retry(tiny_encoder, png_dataset, tmp_path):
    inputs = png_dataset["inputs"]
    run_medsmile(tiny_encoder, tmp_path, **inputs, num_rounds=1)
    label = tmp_path / "run" / "round_1" / "labels" / "img_0.png"
    before = (label.read_bytes(), os.stat(label).st_mtime_ns)
    (png_dataset["root"] / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(RuntimeError) as err:
        run_medsmile(tiny_encoder, tmp_path, **inputs, num_rounds=1)
    assert "broken.png" in chain(err.value)
    run_medsmile(tiny_encoder, tmp_path, **inputs, num_rounds=1, skip_bad_inputs="true")
    assert (label.read_bytes(), os.stat(label).st_mtime_ns) == before  # resumed, nothing recomputed
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["source"] for s in summary["pool"]["skipped"]] == ["broken.png"]


# ------------------------------------------------------------------------------------- 8. empty inputs are errors
def test_inference_on_a_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    with pytest.raises(RuntimeError) as err:
        run(
            config_file=os.path.join(CONFIGS, "inference.json"),
            bundle_root=BUNDLE_ROOT,
            dataset_dir=str(tmp_path / "empty"),
            output_dir=str(tmp_path / "out"),
            ckpt_path=str(tmp_path / "missing.pt"),
        )
    assert f"dataset_dir {tmp_path / 'empty'} holds no input: searched for *.png, *.jpg" in chain(err.value)
    assert not (tmp_path / "out").exists()


def test_evaluate_with_an_empty_prediction_folder_is_an_error(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "truth" / "a.png")
    with pytest.raises(RuntimeError) as err:
        run(
            config_file=os.path.join(CONFIGS, "evaluate.json"),
            bundle_root=BUNDLE_ROOT,
            pred_dir=str(tmp_path / "pred"),
            truth_dir=str(tmp_path / "truth"),
            output_dir=str(tmp_path / "eval"),
        )
    assert f"pred_dir {tmp_path / 'pred'} holds no input: searched recursively for *_seg.nii.gz" in chain(err.value)


# ----------------------------------------------------------------------------------------------- 10. smaller points
def test_empty_pool_folder_is_named(tmp_path):
    (tmp_path / "pool").mkdir()
    with pytest.raises(
        ValueError, match=rf"no images found in {tmp_path / 'pool'} \(dataset_dir\): searched recursively"
    ):
        pool_sources(str(tmp_path / "pool"), None, exclude=[])


def test_symbolic_link_loop_is_named(tmp_path):
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    with pytest.raises(ValueError, match=r"loop\.png: symbolic link loop"):
        read_case(tmp_path / "loop.png")
    with pytest.raises(ValueError, match=r"dangling\.png: broken symbolic link \(its target .*gone\.png' is missing"):
        read_case(tmp_path / "dangling.png")


def test_a_copied_reference_leaves_the_pool(png_dataset, caplog):
    copy = os.path.join(png_dataset["dataset_dir"], "copy_of_ref.png")
    shutil.copyfile(png_dataset["reference_image"], copy)
    with caplog.at_level(logging.WARNING):
        sources = pool_sources(png_dataset["dataset_dir"], None, exclude=[png_dataset["reference_image"]])
    assert copy not in sources and len(sources) == 6
    assert f"{copy} has the same content as the reference {png_dataset['reference_image']}" in caplog.text


@pytest.mark.slow
def test_wall_time_counts_an_invocation_that_stopped(tiny_encoder, png_dataset, tmp_path, monkeypatch):
    original = MedSMILEPipeline._round

    def stop_in_round_2(self, r, *args):
        if r == 2:
            raise KeyboardInterrupt
        return original(self, r, *args)

    monkeypatch.setattr(MedSMILEPipeline, "_round", stop_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_medsmile(tiny_encoder, tmp_path, **png_dataset["inputs"], num_rounds=2)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    first = summary["wall_time_s"]
    assert first >= summary["rounds"][1]["timings_s"]["total"] > 0  # round 1's work is counted
    monkeypatch.undo()
    run_medsmile(tiny_encoder, tmp_path, **png_dataset["inputs"], num_rounds=2)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["wall_time_s"] >= first + summary["rounds"][2]["timings_s"]["total"]


# ------------------------------------------------------------------- a failing attempt never touches a finished run
@pytest.mark.slow
def test_failing_attempts_leave_a_finished_run_byte_identical(tiny_encoder, png_dataset, tmp_path, monkeypatch):
    inputs = png_dataset["inputs"]
    run_medsmile(tiny_encoder, tmp_path, **inputs, num_rounds=1)
    before = folder_digest(tmp_path / "run", tmp_path / "models")
    assert len(before) > 10
    images = png_dataset["root"] / "images"
    attempts = [
        {"batch_size": 0},
        {"uncertainty_quantile": 1.5},
        {"knn_k": 3},  # a changed configuration
        {"dataset_dir": str(png_dataset["root"] / "reference" / "nothing")},
    ]
    for overrides in attempts:
        with pytest.raises(RuntimeError):
            run_medsmile(tiny_encoder, tmp_path, **{**inputs, "num_rounds": 1, **overrides})
    (images / "empty.png").write_bytes(b"")
    with pytest.raises(RuntimeError):
        run_medsmile(tiny_encoder, tmp_path, **inputs, num_rounds=1)
    os.remove(images / "empty.png")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError):
        run_medsmile(tiny_encoder, tmp_path, **inputs, num_rounds=1, device="cuda")
    assert folder_digest(tmp_path / "run", tmp_path / "models") == before


# ------------------------------------------------------------------------------ 7. check scripts need no pytest
@pytest.mark.slow
def test_monailabel_check_runs_without_pytest_or_the_tests(tmp_path):
    code = (
        "import sys; sys.modules['pytest'] = None; sys.path.insert(0, 'benchmarks'); import monailabel_check as m; "
        f"m.write_test_images({str(tmp_path / 'images')!r}); "
        f"m._tiny().make_tiny_encoder({str(tmp_path / 'encoder')!r}); "
        "assert 'conftest' not in sys.modules, 'the check imported the tests'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "images")) == ["grey16.png", "grey8.png", "photo.jpg", "rgb_a.png", "rgb_b.png"]
    assert (tmp_path / "encoder" / "config.json").is_file()


def test_the_hook_prints_one_line_and_the_traceback_only_when_asked(capsys, monkeypatch):
    from scripts import errors

    with pytest.raises(ValueError) as own:
        MedSMILEPipeline(output_dir="x", model_path="m", epochs=0)
    wrapped = RuntimeError("Failed to evaluate ConfigExpression")
    wrapped.__cause__ = own.value
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    errors.install_hook()  # as inference.json does: no log_level there
    errors._hook(RuntimeError, wrapped, None)
    assert (
        capsys.readouterr().err
        == "ERROR: epochs=0 must be a whole number >= 1 [MEDSMILE_TRACEBACK=1 shows the traceback]\n"
    )
    monkeypatch.setenv(errors.TRACEBACK_ENV, "1")
    errors._hook(RuntimeError, wrapped, own.tb)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("\nERROR: epochs=0 must be a whole number >= 1\n")
