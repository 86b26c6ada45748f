"""Three classes (two structures + background) end to end: the generated 3-class demo through the pipeline, the
export (network.json, metadata.json, model.ts), inference.json, the Deploy app's DICOM SEG (one segment per label)
and MONAI Label's label names."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, TINY_OVERRIDES
from PIL import Image

NAMES = ["background", "red structure", "blue structure"]
SIZE = TINY_OVERRIDES["image_size"]


class GreyLevelProbe(torch.nn.Module):
    """(B, 3, H, W) in [0, 1] -> 3-class log-probabilities by grey level: dark 0, bright 1, middle 2."""

    def forward(self, x):
        grey = x.mean(dim=1, keepdim=True)
        centres = torch.tensor([0.0, 1.0, 0.5]).view(1, 3, 1, 1)
        return torch.log_softmax(-40.0 * (grey - centres) ** 2, dim=1)


def monailabel_constants(monkeypatch):
    """``TrainedModelConstants`` of bundle/docs/monailabel/app/main.py, imported with stand-ins for the monailabel
    modules it imports (MONAI Label lives in its own venv, not in the project's python)."""
    stubs = {
        "monailabel": {"__version__": "stub"},
        "monailabel.interfaces.app": {"MONAILabelApp": object},
        "monailabel.tasks.activelearning.first": {"First": object},
        "monailabel.tasks.activelearning.random": {"Random": object},
        "monailabel.tasks.infer.bundle": {
            "BundleInferTask": object,
            "BundleConstants": type("BundleConstants", (), {"metadata_json": lambda self: "metadata.json"}),
        },
    }
    for name, attrs in stubs.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    path = os.path.join(BUNDLE_ROOT, "docs", "monailabel", "app", "main.py")
    spec = importlib.util.spec_from_file_location("medsmile_monailabel_main", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TrainedModelConstants


@pytest.mark.slow
def test_three_classes_end_to_end(tiny_encoder, tmp_path, monkeypatch):
    pytest.importorskip("monai.deploy", reason="MONAI Deploy App SDK not installed (pip install -e '.[deploy]')")
    pytest.importorskip("highdicom")
    from conftest import run_medsmile
    from test_deploy_app import disc, make_bundle, read_seg, run_app, write_series
    from test_model_files import run_inference

    from scripts.demo_data import make_demo_data

    monkeypatch.setattr(sys, "path", list(sys.path))  # the app puts the bundle folders on sys.path
    demo = make_demo_data(str(tmp_path / "demo"), num_images=6, size=SIZE, num_classes=3)
    reference = np.asarray(Image.open(demo["reference_label"]))
    assert set(np.unique(reference)) == {0, 1, 2}

    # the pipeline and the export
    run_medsmile(
        tiny_encoder,
        tmp_path,
        dataset_dir=demo["dataset_dir"],
        reference_image=demo["reference_image"],
        reference_label=demo["reference_label"],
        num_classes=3,
        label_names=NAMES,
        num_rounds=1,
    )
    for r in (0, 1):
        labels = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "run" / f"round_{r}" / "labels").glob("*.png"))]
        assert len(labels) == 6 and set(np.unique(labels)) <= {0, 1, 2}
    round0 = np.stack([np.asarray(Image.open(p)) for p in (tmp_path / "run" / "round_0" / "labels").glob("*.png")])
    assert set(np.unique(round0)) == {0, 1, 2}  # both structures found in the pool
    network = json.loads((tmp_path / "models" / "network.json").read_text())
    assert network["num_classes"] == 3 and network["label_names"] == NAMES
    channel_def = {"0": NAMES[0], "1": NAMES[1], "2": NAMES[2]}
    extra = {"metadata.json": "", "inference.json": ""}
    traced = torch.jit.load(str(tmp_path / "models" / "model.ts"), _extra_files=extra)
    for metadata in (
        json.loads((tmp_path / "models" / "metadata.json").read_text()),
        json.loads(extra["metadata.json"]),
    ):
        pred = metadata["network_data_format"]["outputs"]["pred"]
        assert (pred["num_channels"], pred["channel_def"], pred["spatial_shape"]) == (3, channel_def, [SIZE, SIZE])
    assert traced(torch.rand(1, 3, SIZE, SIZE)).shape == (1, 3, SIZE, SIZE)

    # inference.json (its image_size from network.json)
    run_inference(tmp_path / "models", demo["dataset_dir"], tmp_path / "pred")
    masks = [np.asarray(Image.open(tmp_path / "pred" / f"demo_{i:03d}_seg.png")) for i in range(1, 7)]
    assert all(m.shape == (SIZE, SIZE) for m in masks) and set(np.unique(masks)) <= {0, 1, 2}

    # MONAI Label's labels: channel_def minus background, from the metadata file main.py points it to
    bundle = make_bundle(tmp_path / "bundle", tmp_path / "models")
    constants = monailabel_constants(monkeypatch)(str(bundle))
    with open(os.path.join(bundle, "configs", constants.metadata_json())) as f:
        served = json.load(f)["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert {v.lower(): int(k) for k, v in served.items() if v.lower() != "background"} == {
        "red structure": 1,
        "blue structure": 2,
    }

    # the Deploy app: a DICOM series -> a DICOM SEG with one segment per label, by a bundle folder and by a bare
    # model.ts (a network that separates the two structures, with the run's embedded configs)
    probe_bundle = tmp_path / "bundle_probe"
    make_bundle(probe_bundle, tmp_path / "models")
    torch.jit.save(
        torch.jit.trace(GreyLevelProbe().eval(), torch.rand(1, 3, SIZE, SIZE)),
        str(probe_bundle / "models" / "model.ts"),
        _extra_files=extra,
    )
    rows, cols = 40, 52
    bright, middle = disc(rows, cols, 14, 14, 8), disc(rows, cols, 26, 38, 9)
    truth = np.where(bright, 1, np.where(middle, 2, 0)).astype(np.uint8)
    pixels = [np.where(bright, 2000, np.where(middle, 1000, 0)).astype(np.uint16)] * 2
    sops = write_series(tmp_path / "dicom", pixels)
    for model in (probe_bundle, probe_bundle / "models" / "model.ts"):
        out = tmp_path / f"seg_{model.name}"
        assert run_app(model, tmp_path / "dicom", out).mode == "dicom"
        seg, frames = read_seg(out, sops)
        assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, NAMES[1]), (2, NAMES[2])]
        assert frames.shape == (2, rows, cols)
        np.testing.assert_array_equal(frames[0], frames[1])
        for c in (1, 2):  # resizing blurs the bright disc's rim into the middle grey level: a few rim pixels differ
            dice = 2 * ((frames[0] == c) & (truth == c)).sum() / ((frames[0] == c).sum() + (truth == c).sum())
            assert dice > 0.85, (model, c, dice)
