"""Round 0's linear probe (``round0_classifier: linear_probe``): the fit, the cells it sees, the pool refit."""

import pytest
import torch
import torch.nn.functional as F

from scripts import prototypes
from scripts.prototypes import LinearProbe, fit_linear_probe, reference_cells, refit_on_pool, sample_cells


def test_reference_cells_follow_the_label_on_the_token_grid():
    feats = torch.arange(8.0).reshape(2, 2, 2)  # (D=2, h=2, w=2): cell (i, j) holds (2i + j, 4 + 2i + j)
    label = torch.tensor([[0, 0, 1, 1]] * 4)  # right half class 1 -> grid [[0, 1], [0, 1]]
    background, lesion = reference_cells(feats, label, 2)
    assert background.tolist() == [[0.0, 4.0], [2.0, 5.0 + 1.0]]
    assert lesion.tolist() == [[1.0, 5.0], [3.0, 7.0]]
    # a lesion of one pixel vanishes under nearest resizing: the cell holding it stands in
    tiny = torch.zeros(4, 4, dtype=torch.long)
    tiny[3, 0] = 1
    assert reference_cells(feats, tiny, 2)[1].tolist() == [[2.0, 6.0]]


def test_probe_logits_are_a_linear_map_of_the_scaled_features():
    weight, bias = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0.5, -0.5])
    feats = torch.tensor([[[0.6]], [[0.8]]])[None]  # (B=1, D=2, 1, 1): scaled by sqrt(2)
    logits = LinearProbe(weight, bias)(feats)[0, :, 0, 0]
    root2 = 2**0.5
    assert logits.tolist() == pytest.approx([0.6 * root2 + 0.5, 1.6 * root2 - 0.5])


def test_heavy_weight_decay_turns_the_probe_into_the_balanced_mean_difference():
    torch.manual_seed(0)
    background = F.normalize(torch.randn(300, 8) + torch.tensor([4.0, 0, 0, 0, 0, 0, 0, 0]), dim=1)
    lesion = F.normalize(torch.randn(12, 8) + torch.tensor([0, 4.0, 0, 0, 0, 0, 0, 0]), dim=1)
    probe = fit_linear_probe([background, lesion], weight_decay=100.0)
    direction = probe.weight[1] - probe.weight[0]
    expected = lesion.mean(0) - background.mean(0)  # each class weighs alike despite 300 vs 12 cells
    assert F.cosine_similarity(direction, expected, dim=0) > 0.999
    # a light decay separates the two training sets
    probe = fit_linear_probe([background, lesion], weight_decay=1e-3)
    cells = torch.cat([background, lesion]).T[None, :, :, None]
    assert (probe(cells)[0].argmax(0)[:, 0] == torch.tensor([0] * 300 + [1] * 12)).float().mean() == 1.0


def test_sample_cells_draws_distinct_cells_per_image():
    feats = torch.arange(2 * 3 * 16.0).reshape(2, 3, 4, 4)  # two images, every cell distinct
    picked = sample_cells(feats, 5, torch.Generator().manual_seed(0))
    assert picked.shape == (10, 3)
    first, second = picked[:5], picked[5:]
    assert len({tuple(r) for r in first.tolist()}) == 5 and (first[:, 0] < 16).all()  # image 0's cells
    assert (second[:, 0] >= 48).all()  # image 1's cells start at 3 * 16
    assert sample_cells(feats, None).shape == (32, 3) and sample_cells(feats, 99).shape == (32, 3)


def test_refit_uses_the_reference_and_the_pool_cells_each_class_wins_most_clearly(monkeypatch):
    probe = LinearProbe(torch.tensor([[-1.0], [1.0]]) / 2**0.5 / 2, torch.zeros(2))  # logit margin = feature
    pool = torch.tensor([[-4.0], [-3.0], [-2.0], [-1.0], [1.0], [2.0]])  # class 0 wins 4 cells, class 1 two
    reference = [torch.tensor([[-9.0]]), torch.tensor([[9.0]])]
    seen = {}
    monkeypatch.setattr(prototypes, "fit_linear_probe", lambda cells, decay: seen.setdefault("cells", cells))
    refit_on_pool(probe, reference, pool, keep=0.5)
    background, lesion = seen["cells"]
    assert background[:, 0].tolist() == [-4.0, -3.0, -9.0]  # the upper half of its margins, then the reference
    assert lesion[:, 0].tolist() == [2.0, 9.0]
