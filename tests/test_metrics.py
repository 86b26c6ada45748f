"""Dice / IoU against hand computations, the folder evaluation on PNG files, and configs/evaluate.json."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.image_io import label_classes
from scripts.metrics import evaluate_folders, evaluate_rounds, segmentation_scores

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")

# 2x3 binary masks used throughout:
#   pred  1 1 0     truth 1 0 0
#         0 1 0           1 1 0
# |P| = 3, |T| = 3, |P ∩ T| = 2 (positions (0,0) and (1,1)), |P ∪ T| = 3 + 3 - 2 = 4
# Dice = 2*2 / (3+3) = 2/3, IoU = 2/4 = 1/2
PRED = np.array([[1, 1, 0], [0, 1, 0]], dtype=np.uint8)
TRUTH = np.array([[1, 0, 0], [1, 1, 0]], dtype=np.uint8)


def test_binary_dice_iou_by_hand():
    s = segmentation_scores(PRED, TRUTH, num_classes=2)
    assert s["dice"] == pytest.approx([2 / 3])
    assert s["iou"] == pytest.approx([1 / 2])
    # torch input gives the same numbers
    t = segmentation_scores(torch.as_tensor(PRED), torch.as_tensor(TRUTH).long(), num_classes=2)
    assert t.keys() == s.keys()
    for key in s:
        assert t[key] == pytest.approx(s[key])


def test_three_classes_per_class_by_hand():
    pred = np.array([[1, 1, 2], [0, 0, 2]])
    truth = np.array([[1, 2, 2], [0, 0, 2]])
    # class 1: P = {(0,0),(0,1)}, T = {(0,0)}; ∩ = 1, ∪ = 2 -> Dice 2*1/(2+1) = 2/3, IoU 1/2
    # class 2: P = {(0,2),(1,2)}, T = {(0,1),(0,2),(1,2)}; ∩ = 2, ∪ = 3 -> Dice 2*2/(2+3) = 4/5, IoU 2/3
    s = segmentation_scores(pred, truth, num_classes=3)
    assert s["dice"] == pytest.approx([2 / 3, 4 / 5])
    assert s["iou"] == pytest.approx([1 / 2, 2 / 3])


def test_empty_conventions():
    truth = np.array([[1, 1, 0], [0, 0, 0]])
    # class 2 absent from both -> 1 (Dice and IoU); class 1 identical -> 1
    s = segmentation_scores(truth, truth, num_classes=3)
    assert s == {"dice": [1.0, 1.0], "iou": [1.0, 1.0]}
    # truth empty, prediction non-empty -> 0
    empty = np.zeros((2, 3), dtype=np.int64)
    s = segmentation_scores(PRED, empty, num_classes=2)
    assert s == {"dice": [0.0], "iou": [0.0]}
    # both completely empty -> 1
    assert segmentation_scores(empty, empty, num_classes=2) == {"dice": [1.0], "iou": [1.0]}
    # truth non-empty, prediction empty -> 0
    assert segmentation_scores(empty, TRUTH, num_classes=2) == {"dice": [0.0], "iou": [0.0]}


def test_bad_inputs():
    with pytest.raises(ValueError, match="0..1"):
        segmentation_scores(PRED * 2, TRUTH, num_classes=2)
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(PRED[:, :2], TRUTH, num_classes=2)


def test_truth_value_mapping():
    mask = TRUTH.astype(np.int64) * 255
    assert np.array_equal(label_classes(mask, 2, "t.png"), TRUTH)  # {0, 255} -> {0, 1}
    assert np.array_equal(label_classes(TRUTH * 7, 2, "t.png"), TRUTH)  # any {0, k}, k >= C
    assert np.array_equal(label_classes(np.full((2, 2), 255), 2, "t.png"), np.ones((2, 2)))
    assert np.array_equal(label_classes(TRUTH * 2, 3, "t.png"), TRUTH * 2)  # C = 3: {0, 2} stays class 2
    assert np.array_equal(label_classes(TRUTH * 255, 3, "t.png"), TRUTH)  # C = 3: {0, 255} -> {0, 1}
    jpeg = np.array([[0, 3, 126], [128, 250, 255]])  # lossy edges: foreground where > 127
    assert np.array_equal(label_classes(jpeg, 2, "t.JPG"), [[0, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="t.png"):
        label_classes(jpeg, 2, "t.png")


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    _png(truth / "a.png", TRUTH * 255)  # 0/255 mask
    _png(truth / "sub" / "b.png", np.zeros((2, 3)))  # empty truth
    _png(pred / "a_seg.png", PRED)  # Dice 2/3, IoU 1/2
    _png(pred / "sub" / "b_seg.png", np.zeros((2, 3)))  # both empty: Dice 1, IoU 1
    _png(pred / "extra_seg.png", PRED)  # no truth: ignored
    _png(pred / "a.png", np.ones((2, 3)))  # no "_seg": not a prediction
    return pred, truth


def test_evaluate_folders_writes_metrics_and_csv(folders, tmp_path):
    pred, truth = folders
    out = tmp_path / "eval"
    result = evaluate_folders(str(pred), str(truth), num_classes=2, output_dir=str(out), pred_suffix="_seg")
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics == result
    assert metrics["num_images"] == 2
    assert metrics["mean_dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["mean_iou"] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics["per_class"] == {"1": pytest.approx({"dice": 5 / 6, "iou": 3 / 4})}
    assert metrics["pred_dir"] == str(pred) and metrics["truth_dir"] == str(truth)
    assert metrics["missing"] == [] and metrics["num_predictions_without_truth"] == 1
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["a", "sub/b"]
    assert list(rows[0]) == ["image", "dice_c1", "iou_c1", "mean_dice", "mean_iou", "truth_empty", "pred_empty"]
    assert [(r["truth_empty"], r["pred_empty"]) for r in rows] == [("0", "0"), ("1", "1")]
    assert float(rows[0]["dice_c1"]) == pytest.approx(2 / 3) and float(rows[0]["iou_c1"]) == pytest.approx(0.5)
    assert float(rows[1]["mean_dice"]) == 1.0 and float(rows[1]["mean_iou"]) == 1.0


def test_empty_truth_is_reported_apart(folders, tmp_path):
    """a: Dice 2/3 (truth and prediction non-empty); sub/b: both empty; c: empty truth, foreground predicted (Dice 0);
    d: non-empty truth, nothing predicted (Dice 0)."""
    pred, truth = folders
    _png(truth / "c.png", np.zeros((2, 3)))
    _png(pred / "c_seg.png", PRED)
    _png(truth / "d.png", TRUTH * 255)
    _png(pred / "d_seg.png", np.zeros((2, 3)))
    m = evaluate_folders(str(pred), str(truth), pred_suffix="_seg")
    assert m["mean_dice"] == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)  # the empty-empty pair counts 1 here
    assert m["nonempty_dice"] == pytest.approx((2 / 3 + 0) / 2)  # a and d only
    assert m["num_empty_truth"] == 2 and m["num_nonempty_truth"] == 2
    assert m["specificity"] == pytest.approx(1 / 2)  # b predicted empty, c not
    assert m["sensitivity"] == pytest.approx(1 / 2)  # a found, d missed
    assert "true negative" in m["empty_pair_rule"] and "left out of nonempty_dice" in m["empty_pair_rule"]
    assert "num_volumes" not in m


def test_presence_rates_without_empty_truth_are_none():
    from scripts.metrics import presence_summary

    s = presence_summary([{"dice": [0.5]}, {"dice": [1.0]}], [(True, True), (True, False)])
    assert s["specificity"] is None and s["sensitivity"] == pytest.approx(0.5)
    assert s["nonempty_dice"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="2 score entries but 1 presence"):
        presence_summary([{"dice": [0.5]}, {"dice": [1.0]}], [(True, True)])


def test_volumes_get_volume_dice_and_slice_presence(tmp_path):
    import nibabel as nib

    truth = np.zeros((4, 4, 5), dtype=np.uint8)  # 5 slices along the last axis; the structure on slices 1 and 2
    truth[1:3, 1:3, 1:3] = 1  # 8 voxels
    pred = np.zeros_like(truth)
    pred[1:3, 1:3, 2] = 1  # 4 voxels, all inside: Dice 2 * 4 / (8 + 4) = 2/3
    pred[0, 0, 4] = 1  # one voxel on slice 4, which holds no structure: Dice 2 * 4 / (8 + 5) = 8/13
    for folder, array in (("t", truth), ("p", pred)):
        os.makedirs(tmp_path / folder)
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp_path / folder / "case.nii.gz"))
    m = evaluate_folders(str(tmp_path / "p"), str(tmp_path / "t"))
    assert m["num_volumes"] == 1 and m["mean_volume_dice"] == pytest.approx(8 / 13) == m["mean_dice"]
    # slices: truth present on 1, 2; predicted on 2, 4 -> empty truth (0, 3, 4): 0 and 3 predicted empty
    assert m["slice_count"] == 5 and m["slice_nonempty_count"] == 2
    assert m["slice_specificity"] == pytest.approx(2 / 3) and m["slice_sensitivity"] == pytest.approx(1 / 2)


def test_evaluate_folders_three_classes_no_suffix(tmp_path):
    _png(tmp_path / "t" / "x.png", [[1, 2, 2], [0, 0, 2]])
    _png(tmp_path / "p" / "x.png", [[1, 1, 2], [0, 0, 2]])
    m = evaluate_folders(str(tmp_path / "p"), str(tmp_path / "t"), num_classes=3)
    assert m["per_class"]["1"] == pytest.approx({"dice": 2 / 3, "iou": 1 / 2})
    assert m["per_class"]["2"] == pytest.approx({"dice": 4 / 5, "iou": 2 / 3})
    assert m["mean_dice"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_flat_predictions_pair_with_truth_in_subfolders(folders, tmp_path):
    pred, truth = folders
    os.replace(pred / "sub" / "b_seg.png", pred / "b_seg.png")
    m = evaluate_folders(str(pred), str(truth), pred_suffix="_seg")
    assert m["num_images"] == 2 and m["mean_dice"] == pytest.approx(5 / 6)


def test_nifti_prediction_against_png_truth(folders):
    import nibabel as nib

    pred, truth = folders
    os.remove(pred / "a_seg.png")
    # MONAI spatial order of a PNG is (width, height): the NIfTI holds PRED transposed, with a trailing singleton axis
    nib.save(nib.Nifti1Image(PRED.T[..., None].astype(np.uint8), np.eye(4)), str(pred / "a_seg.nii.gz"))
    m = evaluate_folders(str(pred), str(truth), pred_suffix="_seg")
    assert m["num_images"] == 2 and m["mean_dice"] == pytest.approx((2 / 3 + 1) / 2)


def test_missing_prediction(folders):
    pred, truth = folders
    os.remove(pred / "sub" / "b_seg.png")
    with pytest.raises(ValueError, match="sub/b"):
        evaluate_folders(str(pred), str(truth), pred_suffix="_seg")
    m = evaluate_folders(str(pred), str(truth), pred_suffix="_seg", allow_missing=True)
    assert m["missing"] == ["sub/b"] and m["num_images"] == 1 and m["mean_dice"] == pytest.approx(2 / 3)


def test_shape_mismatch_names_both_files(folders):
    pred, truth = folders
    _png(pred / "a_seg.png", np.zeros((3, 3)))
    with pytest.raises(ValueError, match="shape") as err:
        evaluate_folders(str(pred), str(truth), pred_suffix="_seg")
    assert str(pred / "a_seg.png") in str(err.value) and str(truth / "a.png") in str(err.value)


def test_evaluate_rounds(tmp_path):
    truth = tmp_path / "truth"
    _png(truth / "a.png", TRUTH * 255)
    _png(truth / "test_only.png", TRUTH * 255)  # truth without pseudo-label: skipped
    run = tmp_path / "run"
    for name, label in (("round_0", PRED), ("round_1", TRUTH), ("round_2.partial", PRED), ("round_3", PRED)):
        _png(run / name / "labels" / "a.png", label)
        _png(run / name / "labels" / "no_truth.png", label)  # pseudo-label without truth: skipped
        if name in ("round_0", "round_1"):  # round_2 is unfinished, round_3 has no round.json
            (run / name / "round.json").write_text("{}")
    quality = evaluate_rounds(str(run), str(truth))
    assert [q["round"] for q in quality] == [0, 1]
    assert quality[0]["mean_dice"] == pytest.approx(2 / 3) and quality[1]["mean_dice"] == 1.0
    assert quality[0]["num_missing"] == 1 and quality[0]["num_predictions_without_truth"] == 1
    assert quality[0]["nonempty_dice"] == pytest.approx(2 / 3) and quality[0]["sensitivity"] == 1.0
    assert quality[0]["specificity"] is None and quality[0]["num_empty_truth"] == 0  # no empty truth to count
    with open(run / "label_quality.json") as f:
        assert json.load(f) == quality


def test_evaluate_config(folders, tmp_path):
    from monai.bundle import run

    pred, truth = folders
    out = tmp_path / "cfg_eval"
    run(
        config_file=os.path.join(BUNDLE, "configs", "evaluate.json"),
        pred_dir=str(pred),
        truth_dir=str(truth),
        output_dir=str(out),
        bundle_root=BUNDLE,
    )
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["num_images"] == 2 and metrics["mean_dice"] == pytest.approx(5 / 6)
    assert metrics["nonempty_dice"] == pytest.approx(2 / 3)  # the empty-empty pair sub/b is left out
    assert metrics["specificity"] == 1.0 and metrics["sensitivity"] == 1.0
    assert (out / "per_image.csv").is_file()
