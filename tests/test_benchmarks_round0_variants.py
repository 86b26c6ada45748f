"""Round-0 variant helpers of the benchmark, checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.round0_variants import (
    fill_holes,
    largest_component,
    otsu_scores,
    pool_em_prototypes,
    spectral_scores,
)


def test_pool_em_keeps_the_confident_half_of_each_class_and_the_reference_cells():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    # one pool image of 4 cells: two clear class-0 cells, one clear class-1 cell, one class-0 cell of margin 0.2
    pool = [torch.tensor([e1, e1, e2, [0.8, 0.6]]).T.reshape(2, 1, 4)]
    reference = [torch.tensor([e1]), torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]])]
    protos = pool_em_prototypes(pool, torch.tensor([e1, e2]), reference, steps=1)
    # class 0: margins 1, 1, 0.2 -> the upper half (>= median 1) keeps the two e1 cells; with the reference: e1
    assert protos[0].tolist() == pytest.approx(e1)
    # class 1: the e2 cell and the reference's 45-degree cell average to the 22.5-degree direction
    angle = math.radians(22.5)
    assert protos[1].tolist() == pytest.approx([math.sin(angle), math.cos(angle)], abs=1e-6)


def test_largest_component_counts_diagonal_neighbours_and_keeps_the_biggest():
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = 1  # one diagonal component of 3
    mask[4:6, 3:6] = 1  # a block of 6
    kept = largest_component(mask)
    assert kept.sum() == 6 and kept[4:6, 3:6].all() and kept.dtype == mask.dtype
    mask[4:6, 3:6] = 0
    mask[5, 5] = 1  # now the diagonal line (3) beats the single pixel
    assert largest_component(mask)[[0, 1, 2], [0, 1, 2]].all() and largest_component(mask).sum() == 3


def test_fill_holes_fills_only_enclosed_background():
    ring = np.zeros((5, 7), dtype=np.uint8)
    ring[0:3, 0:3] = 1
    ring[1, 1] = 0  # enclosed hole
    ring[3:5, 5:7] = 1
    filled = fill_holes(ring)
    assert filled[1, 1] == 1 and filled.sum() == ring.sum() + 1


def _two_clusters() -> torch.Tensor:
    """(1, 2, 2, 4) features: the left half of a 2x4 grid near e1, the right half near e2, weakly linked (cells differ
    slightly, as real patches do: k-means needs distinct points)."""
    grid = torch.zeros(2, 2, 4)
    for row in range(2):
        for col in range(4):
            jitter = 0.1 + 0.02 * (row * 4 + col)
            grid[:, row, col] = torch.tensor([1.0, jitter] if col < 2 else [jitter, 1.0])
    return torch.nn.functional.normalize(grid, dim=0)[None]


def _scores_from_margin(margin: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.zeros_like(margin), margin])[None]


def test_otsu_raises_the_bar_only_when_the_margins_split_above_zero():
    # margins -1 (8 cells), 0.1 (4), 0.9 (4): the Otsu split falls below zero, so the argmax stays
    low = torch.tensor([-1.0] * 8 + [0.1] * 4 + [0.9] * 4).reshape(4, 4)
    kept = otsu_scores(_scores_from_margin(low)).argmax(1)[0]
    assert torch.equal(kept, (low > 0).long())
    # margins -0.1 (4), 0.1 (8), 0.9 (4): between-class variance 0.141 at the split after 0.1 (0.041 after -0.1),
    # so the threshold is 0.1 and only the 0.9 cells stay foreground
    high = torch.tensor([-0.1] * 4 + [0.1] * 8 + [0.9] * 4).reshape(4, 4)
    kept = otsu_scores(_scores_from_margin(high)).argmax(1)[0]
    assert torch.equal(kept, (high > 0.5).long())


def test_propagation_with_alpha_zero_keeps_the_margins():
    margin = torch.tensor([[0.3, -0.2, 0.1, -0.4], [0.0, 0.5, -0.1, 0.2]])
    out = spectral_scores(_two_clusters(), _scores_from_margin(margin), "propagate", 0.0)
    assert torch.allclose(out[0, 1] - out[0, 0], margin, atol=1e-6)


def test_spectral_regions_take_the_vote_of_their_cells():
    # right cluster: margins mostly positive (one negative cell); left cluster: mostly negative (one positive cell)
    margin = torch.tensor([[-0.5, -0.4, 0.3, -0.1], [0.2, -0.6, 0.4, 0.5]])
    right = torch.zeros(2, 4, dtype=torch.long)
    right[:, 2:] = 1
    for mode, param in (("segments", 2), ("bipartition", "side")):
        out = spectral_scores(_two_clusters(), _scores_from_margin(margin), mode, param)
        assert torch.equal(out.argmax(1)[0], right), mode
    # "and": the object side (right) keeps only its cells the prototypes call foreground
    out = spectral_scores(_two_clusters(), _scores_from_margin(margin), "bipartition", "and")
    assert torch.equal(out.argmax(1)[0], right * (margin > 0).long())


def test_presence_thresholds_by_hand():
    from benchmarks.round0_variants import presence_threshold

    background = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])
    foreground = torch.tensor([0.5, 0.7, 0.9])
    assert float(presence_threshold("ref_bg", 0.5, background, foreground, None)) == pytest.approx(0.2)
    assert float(presence_threshold("ref_bg", 1.0, background, foreground, None)) == pytest.approx(0.4)
    assert float(presence_threshold("ref_fg", 0.5, background, foreground, None)) == pytest.approx(0.7)
    assert float(presence_threshold("ref_mid", None, background, foreground, None)) == pytest.approx((0.2 + 0.7) / 2)
    # Otsu of two tight groups: the split falls at the top of the lower group
    pool = torch.tensor([0.0, 0.01, 0.02, 0.5, 0.51, 0.52])
    assert float(presence_threshold("pool_otsu", None, background, foreground, pool)) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="unknown presence rule 'nope'"):
        presence_threshold("nope", None, background, foreground, pool)


def test_reference_size_table_bins_by_foreground_fraction():
    from benchmarks.round0_variants import size_table

    rows = [
        {"fraction": 0.003, "nonempty_dice": 0.1},
        {"fraction": 0.05, "nonempty_dice": 0.4},
        {"fraction": 0.06, "nonempty_dice": 0.6},
    ]
    lines = size_table(rows, "x")  # median of 0.1, 0.4, 0.6 = 0.4
    assert lines[0] == "| x | 0-0.5 % | 1 | 0.100 (0.25) |"
    assert lines[4] == "| x | 4-8 % | 2 | 0.500 (1.25) |"
    assert lines[1] == "| x | 0.5-1 % | 0 | - |"
