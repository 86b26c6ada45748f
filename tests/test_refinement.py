"""Entropy and KNN refinement against hand-worked examples, through the Ignite handlers too."""

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.utils import CommonKeys

from scripts.handlers import KNNRefinementHandler, PixelEntropyHandler, RoundPredictions
from scripts.refinement import mean_pixel_entropy, plan_refinement, refine_soft_label


def test_mean_pixel_entropy_matches_formula():
    p = torch.tensor([[[[0.5, 1.0]], [[0.5, 0.0]]]])  # (1, C=2, 1, 2): one maximal, one certain pixel
    assert mean_pixel_entropy(p).item() == pytest.approx(math.log(2) / 2)
    q = torch.tensor([0.2, 0.3, 0.5]).view(1, 3, 1, 1)
    assert mean_pixel_entropy(q).item() == pytest.approx(-sum(v * math.log(v) for v in (0.2, 0.3, 0.5)))


def _unit(angle_deg):
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def test_plan_refinement_hand_worked():
    # 6 images; uncertainty quantile 0.8 of [0.1, 0.2, 0.3, 0.4, 0.5, 0.9] = 0.5 (linear) -> images 4 and 5 uncertain
    u = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    feats = np.array([_unit(0), _unit(30), _unit(100), _unit(180), _unit(10), _unit(95)], dtype=np.float32)
    plan = plan_refinement(u, feats, quantile=0.8, k=2)
    assert plan.threshold == pytest.approx(0.5)
    assert plan.uncertain.tolist() == [4, 5]
    # image 4 at 10 deg: nearest certain are 0 (10 deg away, cos 0.985) and 1 (20 deg, cos 0.940)
    assert plan.neighbours[0].tolist() == [0, 1]
    assert plan.weights[0] == pytest.approx([math.cos(math.radians(10)), math.cos(math.radians(20))], abs=1e-6)
    # image 5 at 95 deg: nearest are 2 (5 deg) and 1 (65 deg)
    assert plan.neighbours[1].tolist() == [2, 1]
    assert plan.weights[1] == pytest.approx([math.cos(math.radians(5)), math.cos(math.radians(65))], abs=1e-6)


def test_negative_cosines_get_zero_weight_and_keep_raw_label():
    u = np.array([0.0, 1.0])
    feats = np.array([_unit(0), _unit(180)], dtype=np.float32)
    plan = plan_refinement(u, feats, quantile=0.5, k=5)
    assert plan.uncertain.tolist() == [1]
    assert plan.neighbours[0].tolist() == [0, -1, -1, -1, -1]  # only one certain image exists
    assert plan.weights[0].tolist() == [0.0] * 5
    assert refine_soft_label(torch.zeros(1, 2, 2), torch.tensor([0.0]), 2) is None


def test_refine_soft_label_is_weighted_one_hot_mean():
    labels = torch.tensor([[[1, 0]], [[1, 1]], [[0, 0]]])  # K=3 neighbours, 1x2 images
    soft = refine_soft_label(labels, torch.tensor([0.5, 0.3, 0.2]), num_classes=2)
    assert torch.allclose(soft[1], torch.tensor([[0.8, 0.3]]))
    assert torch.allclose(soft[0], torch.tensor([[0.2, 0.7]]))
    assert soft.argmax(0).tolist() == [[1, 0]]


def test_handlers_on_an_engine():
    """Two batches of log-probabilities through PixelEntropyHandler, then KNNRefinementHandler at epoch end."""
    n, size = 4, 2
    probs = torch.zeros(n, 2, size, size)
    probs[:, 1] = torch.tensor([0.99, 0.9, 0.8, 0.5]).view(n, 1, 1)  # image 3 is the most uncertain
    probs[:, 0] = 1 - probs[:, 1]
    batches = [{"index": torch.tensor([0, 1]), "p": probs[:2]}, {"index": torch.tensor([2, 3]), "p": probs[2:]}]
    engine = Engine(lambda e, b: {CommonKeys.PRED: b["p"].log()})
    preds = RoundPredictions.empty(n, 2, size)
    feats = np.array([_unit(0), _unit(60), _unit(90), _unit(80)], dtype=np.float32)
    PixelEntropyHandler(preds).attach(engine)
    KNNRefinementHandler(preds, feats, quantile=0.75, k=2).attach(engine)
    probs[0, :, 0, 0] = torch.tensor([0.9, 0.1])  # image 0 has one background pixel
    engine.run(batches, max_epochs=1)

    def h(p):
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    expected_u = [(3 * h(0.99) + h(0.9)) / 4, h(0.9), h(0.8), h(0.5)]
    assert preds.uncertainty == pytest.approx(expected_u, rel=1e-3)  # probabilities are stored as float16
    assert preds.plan.uncertain.tolist() == [3]
    # image 3 (80 deg): neighbours 2 (90 deg, cos 10) and 1 (60 deg, cos 20); both raw labels are all-1
    assert preds.plan.neighbours[0].tolist() == [2, 1]
    assert set(preds.refined) == {3}
    assert preds.hard_labels()[3].tolist() == [[1, 1], [1, 1]]
    assert preds.hard_labels()[0].tolist() == [[0, 1], [1, 1]]  # certain image keeps its raw label


def test_all_tied_uncertainties_still_leave_certain_images():
    # U >= quantile selects every image when all are equal; the intended 10 % (ceil) is kept instead, by index
    plan = plan_refinement(np.full(12, 0.7), np.eye(12, dtype=np.float32), quantile=0.9, k=2)
    assert plan.uncertain.tolist() == [0, 1]


def test_most_certain_keeps_the_lowest_entropy_fraction_with_index_ties():
    from scripts.refinement import most_certain

    u = np.array([0.5, 0.1, 0.3, 0.1, 0.9])
    # ceil(0.5 * 5) = 3 lowest: 0.1 (index 1), 0.1 (index 3, tie after 1), 0.3 (index 2); returned ascending
    assert most_certain(u, 0.5).tolist() == [1, 2, 3]
    assert most_certain(u, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert most_certain(u, 0.01).tolist() == [1]  # never empty


def test_round_uncertainty_is_read_back_in_pool_order(tmp_path):
    from scripts.round_store import read_round_uncertainty

    folder = tmp_path / "round_1"
    folder.mkdir()
    (folder / "uncertainty.csv").write_text("image,mean_pixel_entropy,refined\nb.png,0.25,0\na.png,0.125,1\n")
    assert read_round_uncertainty(str(tmp_path), 1, 2).tolist() == [0.25, 0.125]
    with pytest.raises(ValueError, match=r"uncertainty.csv: 2 rows for a pool of 3 images"):
        read_round_uncertainty(str(tmp_path), 1, 3)
