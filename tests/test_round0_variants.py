"""Round-0 variant helpers of the benchmark, checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.round0_variants import fill_holes, largest_component, pool_em_prototypes


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
