"""Absence is a valid answer (issue 36): the presence rule of round 0, volume smoothing, empty pseudo-labels in
training, metrics with empty images, and the demo's images without a blob."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import fit_steps

from scripts.losses import Mask2FormerSemanticLoss
from scripts.network import Mask2FormerDinov2
from scripts.prototypes import (
    foreground_margin,
    presence_scores,
    reference_presence_threshold,
    smooth_presence,
    soft_labels,
    suppress_foreground,
)


def test_presence_score_is_the_best_cells_foreground_margin():
    scores = torch.zeros(2, 3, 2, 2)  # C = 3: background, two foreground classes
    scores[0, 0] = torch.tensor([[0.5, 0.2], [0.1, 0.3]])
    scores[0, 1] = torch.tensor([[0.1, 0.3], [0.0, 0.1]])  # margins -0.4, 0.1, -0.1, -0.2
    scores[0, 2] = torch.tensor([[0.0, 0.0], [0.4, 0.0]])  # margins -0.5, -0.2, 0.3, -0.3
    scores[1, 0] = 1.0  # background wins everywhere by 1
    assert foreground_margin(scores)[0].flatten().tolist() == pytest.approx([-0.4, 0.1, 0.3, -0.2])
    assert presence_scores(scores).tolist() == pytest.approx([0.3, -1.0])


def test_reference_threshold_is_a_quantile_of_the_reference_background_margins():
    scores = torch.zeros(2, 2, 4)  # (C, h, w) of one reference view: margin = scores[1] - scores[0]
    scores[1] = torch.tensor([[0.0, 0.1, 0.2, 0.9], [0.3, 0.4, 0.8, 0.7]])
    label = torch.zeros(4, 8, dtype=torch.long)  # 2x upsampled grid; the last column of cells is foreground
    label[:, 6:] = 1
    # background cells' margins: 0, 0.1, 0.2, 0.3, 0.4, 0.8; quantile 0.5 (linear) = (0.2 + 0.3) / 2
    assert reference_presence_threshold([scores], [label], 0.5) == pytest.approx(0.25)
    assert reference_presence_threshold([scores], [label], 1.0) == pytest.approx(0.8)


def test_volume_smoothing_drops_a_lone_slice_and_keeps_2d_images():
    presence = torch.tensor([0.0, 0.9, 0.0, 0.0, 0.5, 0.6, 0.7, 0.1, 0.8])
    cases = [0, 0, 0, 0, 1, 1, 1, 2, 3]  # case 0: a lone bright slice; case 1: a run; 2, 3: single 2-D images
    out = smooth_presence(presence, cases)
    # case 0 medians of (0,0,0.9), (0,0.9,0), (0.9,0,0), (0,0,0) (edges repeated): the lone 0.9 is gone
    assert out[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    # case 1 medians of (0.5,0.5,0.6), (0.5,0.6,0.7), (0.6,0.7,0.7): a monotone run is kept
    assert out[4:7].tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert out[7:].tolist() == pytest.approx([0.1, 0.8])


def test_an_absent_image_loses_every_pixel_to_the_background_after_upsampling():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 4, 4)
    scores[:, 1] += 1.0  # foreground wins many cells of both images
    out = suppress_foreground(scores, torch.tensor([True, False]))
    labels = soft_labels(out, (17, 23)).argmax(1)
    assert (labels[0] == 0).all()
    assert torch.equal(out[1], scores[1]) and (soft_labels(scores[1:], (17, 23)).argmax(1) == labels[1]).all()
    assert (labels[1] > 0).any()


def test_mask2former_loss_learns_an_all_background_label(tiny_encoder):
    """An image whose pseudo-label holds only background trains the network towards predicting nothing there."""
    torch.manual_seed(0)
    net = Mask2FormerDinov2(2, tiny_encoder, hidden_dim=32, num_queries=4, decoder_layers=1, pixel_decoder_layers=1)
    loss_fn = Mask2FormerSemanticLoss(net)
    x = torch.rand(2, 3, 56, 56) * 0.2 + 0.8
    label = torch.zeros(2, 1, 56, 56, dtype=torch.long)
    label[0, :, 10:30, 10:30] = 1
    x[0, :, 10:30, 10:30] = 0  # image 0 shows a dark object; image 1 shows none and is labelled all background
    losses = fit_steps(net, loss_fn, x, label, 40)
    assert all(math.isfinite(v) for v in losses) and min(losses[-5:]) < 0.6 * losses[0]
    net.eval()
    with torch.no_grad():
        pred = net(x).argmax(1)
    assert (pred[1] == 0).float().mean() > 0.99  # absence learnt
    assert (pred[0, 10:30, 10:30] == 1).float().mean() > 0.5  # and the object still found


def test_demo_data_has_images_without_the_blob(tmp_path):
    from PIL import Image

    from scripts.demo_data import EMPTY_EVERY, make_demo_data

    info = make_demo_data(str(tmp_path / "demo"), num_images=8, size=64)
    for i in range(1, 9):
        mask = np.asarray(Image.open(tmp_path / "demo" / "masks" / f"demo_{i:03d}.png"))
        assert mask.any() == (i % EMPTY_EVERY != 0), i
    assert np.asarray(Image.open(info["reference_label"])).any()


def disc_volume(rng: np.random.Generator, size: int, slices: int, present: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, slices) int16 volume: bright noisy tissue with a dark disc (radius size/4) on the ``present``
    slices and a smaller dark spot (radius size/5, not the structure: the mask leaves it out) on the others; and
    the mask."""
    yy, xx = np.mgrid[0:size, 0:size]
    volume = 800 + rng.normal(0, 40, (size, size, slices))
    mask = np.zeros((size, size, slices), dtype=np.uint8)
    for k in range(slices):
        radius = size / 4 if k in present else size / 5
        disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < radius**2
        volume[..., k][disc] = 100 + rng.normal(0, 20, disc.sum())
        mask[..., k] = disc * (k in present)
    return volume.astype(np.int16), mask


@pytest.mark.slow
def test_a_volume_comes_back_empty_on_the_slices_without_the_structure(tiny_encoder, tmp_path):
    """NIfTI in, NIfTI out: round 0 with ``presence_threshold`` labels every slice without the disc all background
    and keeps foreground on the slices that show it; the written labels keep the volume's geometry. The plain
    argmax (off) labels the smaller look-alike spot of the other slices foreground."""
    import nibabel as nib
    from conftest import run_medsmile

    rng = np.random.default_rng(0)
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    present = {3, 4, 5}
    volume, _ = disc_volume(rng, 56, 9, present)
    (tmp_path / "data").mkdir()
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "data" / "case.nii.gz"))
    ref, ref_mask = disc_volume(rng, 56, 1, {0})
    (tmp_path / "ref").mkdir()
    nib.save(nib.Nifti1Image(ref, affine), str(tmp_path / "ref" / "ref.nii.gz"))
    nib.save(nib.Nifti1Image(ref_mask, affine), str(tmp_path / "ref" / "ref_label.nii.gz"))
    common = {
        "dataset_dir": str(tmp_path / "data"),
        "reference_image": str(tmp_path / "ref" / "ref.nii.gz"),
        "reference_label": str(tmp_path / "ref" / "ref_label.nii.gz"),
        "round_training": "pseudo_labels",  # trained_on counts the references among the items
    }
    found = {}
    for name, threshold, rounds in (("argmax", "null", 0), ("absence", 0.99, 1)):
        run_medsmile(tiny_encoder, tmp_path / name, presence_threshold=threshold, num_rounds=rounds, **common)
        written = nib.load(tmp_path / name / "run" / "round_0" / "labels" / "case.nii.gz")
        assert written.shape == (56, 56, 9)
        np.testing.assert_allclose(written.affine, affine, atol=1e-5)
        labels = np.asarray(written.dataobj)
        found[name] = {k for k in range(9) if labels[..., k].any()}
        summary = json.loads((tmp_path / name / "run" / "summary.json").read_text())
        found[name + "_absent"] = summary["rounds"][0].get("absent_images")
    assert found["argmax"] - present  # the plain argmax puts foreground on slices without the disc
    assert found["absence"] == present and found["absence_absent"] == 6
    assert found["argmax_absent"] is None
    # round 1 trains on every slice, the 6 all-background ones included, plus the reference
    assert summary["rounds"][1]["trained_on"] == 9 + 1


@pytest.mark.parametrize("value", [0, 1.5, -0.1])
def test_presence_threshold_must_be_a_quantile(value, tmp_path):
    from scripts.pipeline import MedSMILEPipeline

    with pytest.raises(ValueError, match=rf"presence_threshold={float(value)} must be null or a number in \(0, 1\]"):
        MedSMILEPipeline(output_dir=str(tmp_path), model_path=str(tmp_path / "m.pt"), presence_threshold=value)
    assert MedSMILEPipeline(str(tmp_path), str(tmp_path / "m.pt"), presence_threshold="null").presence_threshold is None


def test_small_reference_warning_names_the_fraction_and_k_shot():
    from scripts.prototypes import SMALL_REFERENCE_FRACTION, small_reference_warning

    small = torch.zeros(20, 20, dtype=torch.long)
    small[0, :3] = 1  # 3 of 400 pixels: 0.75 %
    message = small_reference_warning([small], 2)
    assert message is not None and "class 1 covers 0.75%" in message
    assert f"below {SMALL_REFERENCE_FRACTION:.0%}" in message and "K-shot" in message
    large = torch.zeros(20, 20, dtype=torch.long)
    large[:5, :5] = 1  # 6.25 %
    assert small_reference_warning([large], 2) is None
    assert small_reference_warning([small, large], 2) is None  # K-shot: one large reference is enough
    three = large.clone()
    three[10, 10] = 2  # class 2: 1 pixel, 0.25 %
    assert "class 2 covers 0.25%" in small_reference_warning([three], 3)


@pytest.mark.slow
def test_pipeline_warns_about_a_small_reference(tiny_encoder, png_dataset, tmp_path, caplog):
    from conftest import run_medsmile
    from PIL import Image

    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[20:22, 30:32] = 255  # 4 of 3072 pixels
    Image.fromarray(mask).save(tmp_path / "small.png")
    inputs = {**png_dataset["inputs"], "reference_label": str(tmp_path / "small.png")}
    with caplog.at_level("WARNING", logger="scripts.pipeline"):
        run_medsmile(tiny_encoder, tmp_path / "out", num_rounds=0, **inputs)
    assert any("class 1 covers 0.13%" in r.getMessage() and "K-shot" in r.getMessage() for r in caplog.records)
