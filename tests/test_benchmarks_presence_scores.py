"""benchmarks.presence_scores: image-level scores of a trained network and how well they separate empty images."""

from __future__ import annotations

import pytest
import torch

from benchmarks.presence_scores import image_scores, separation


def rows(empty_scores, other_scores, areas):
    return [
        {"empty_truth": True, "foreground_area": a, "max_foreground_probability": s, "best_query_score": s}
        for s, a in zip(empty_scores, areas[: len(empty_scores)])
    ] + [
        {"empty_truth": False, "foreground_area": a, "max_foreground_probability": s, "best_query_score": s}
        for s, a in zip(other_scores, areas[len(empty_scores) :])
    ]


def test_separation_counts_ordered_pairs_and_the_argmax_rule():
    # empty-truth scores 0.2, 0.6; others 0.5, 0.7, 0.9: of the 6 (other, empty) pairs, 5 are ordered (0.5 < 0.6)
    result = separation(rows([0.2, 0.6], [0.5, 0.7, 0.9], areas=[0.0, 0.1, 0.0, 0.3, 0.2]))
    assert result["auroc_max_foreground_probability"] == pytest.approx(5 / 6)
    # areas: empty 0.0, 0.1; others 0.0, 0.3, 0.2: pairs ordered 0.3>0.0, 0.3>0.1, 0.2>0.0, 0.2>0.1, and 0.0 = 0.0 a tie
    assert result["auroc_foreground_area"] == pytest.approx((4 + 0.5) / 6)
    assert result["argmax_specificity"] == pytest.approx(1 / 2)  # one of the two empty images predicted empty
    assert result["argmax_sensitivity"] == pytest.approx(2 / 3)
    assert (result["empty_images"], result["nonempty_images"]) == (2, 3)
    with pytest.raises(ValueError, match="needs images with and without the structure"):
        separation(rows([], [0.5, 0.7], areas=[0.1, 0.2]))


class TwoQueries(torch.nn.Module):
    """A network whose query 0 says lesion (class 0.8 after softmax) with a mask on the left half, query 1 nothing."""

    def forward(self, x, with_queries=False):
        masks = torch.full((1, 2, 2, 4), -10.0)
        masks[0, 0, :, :2] = 10.0
        classes = torch.log(torch.tensor([[[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]]))  # background, lesion, no object
        log_probs = torch.log(torch.tensor([[[[0.2, 0.2, 0.9, 0.9]] * 2, [[0.8, 0.8, 0.1, 0.1]] * 2]]))
        return log_probs, type("Out", (), {"class_queries_logits": classes, "masks_queries_logits": masks})


def test_image_scores_of_a_hand_built_output():
    scores = image_scores(TwoQueries(), torch.zeros(3, 2, 4))
    assert scores["foreground_area"] == pytest.approx(0.5)  # the left half: lesion 0.8 > background 0.2
    assert scores["max_foreground_probability"] == pytest.approx(0.8)
    # query 0: lesion probability 0.8 times its mask's mean probability inside the mask, sigmoid(10)
    assert scores["best_query_score"] == pytest.approx(0.8 * torch.sigmoid(torch.tensor(10.0)).item(), rel=1e-5)
