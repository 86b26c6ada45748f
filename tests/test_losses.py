"""The Mask2Former set loss on semantic label maps: label conversion by hand, and it trains a tiny network (also with
ignored pixels)."""

import math

import pytest
import torch
from conftest import fit_steps

from scripts.losses import IGNORE_LABEL, Mask2FormerSemanticLoss, semantic_to_instances
from scripts.network import Mask2FormerDinov2


def test_semantic_to_instances_lists_the_classes_present():
    label = torch.tensor([[[[0, 2], [2, 2]]], [[[0, 0], [0, 0]]]])  # (B=2, 1, 2, 2), C = 3
    masks, classes = semantic_to_instances(label, 3)
    assert classes[0].tolist() == [0, 2] and classes[1].tolist() == [0]
    assert masks[0].tolist() == [[[1, 0], [0, 0]], [[0, 1], [1, 1]]]
    assert masks[1].shape == (1, 2, 2)


@pytest.mark.parametrize("ignore_band, bootstrap", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_set_loss_needs_the_query_outputs_and_decreases(tiny_encoder, ignore_band, bootstrap):
    torch.manual_seed(0)
    net = Mask2FormerDinov2(2, tiny_encoder, hidden_dim=32, num_queries=4, decoder_layers=1, pixel_decoder_layers=1)
    loss_fn = Mask2FormerSemanticLoss(net, bootstrap=bootstrap)
    x = torch.rand(2, 3, 56, 56)
    label = torch.zeros(2, 1, 56, 56, dtype=torch.long)
    label[:, :, 10:30, 10:30] = 1
    x[:, :, 10:30, 10:30] = 0  # the object is dark: learnable
    if ignore_band:
        label[:, :, 8:12, :] = IGNORE_LABEL  # a band across the object's edge, left out of the loss
    with pytest.raises(TypeError, match=r"needs \(log_probs, query outputs\)"):
        loss_fn(net(x), label)  # log-probabilities alone: no per-query outputs to match
    losses = fit_steps(net, loss_fn, x, label, 30)
    assert all(math.isfinite(v) for v in losses) and min(losses[-5:]) < 0.6 * losses[0]


def test_round_epochs_guarantees_a_minimum_of_iterations():
    from scripts.training import round_epochs

    assert round_epochs(num_items=25, batch_size=4, epochs=10, min_iterations=200) == 34  # 6 steps/epoch
    assert round_epochs(num_items=1000, batch_size=4, epochs=10, min_iterations=200) == 10
    assert round_epochs(num_items=3, batch_size=4, epochs=2, min_iterations=5) == 5  # one (short) step per epoch


def test_frozen_backbone_stays_pretrained_while_the_decoder_trains(tiny_encoder, tmp_path):
    from scripts.training import train_round

    torch.manual_seed(0)
    net = Mask2FormerDinov2(2, tiny_encoder, tiny_encoder, hidden_dim=32, num_queries=4, decoder_layers=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = (torch.rand(4, 3, 56, 56) * 255).to(torch.uint8)
    labels = torch.zeros(4, 1, 56, 56, dtype=torch.uint8)
    labels[:, :, 14:42, 14:42] = 1
    items = [{"image": images[i], "label": labels[i], "index": i} for i in range(4)]
    info = train_round(net, items, 2, 2, 1e-3, 0.01, 1.0, torch.device("cpu"), str(tmp_path), freeze_backbone=True)
    assert info["iterations"] == 4
    after = net.state_dict()
    backbone = [k for k in after if ".encoder.backbone." in k]
    assert backbone and all(torch.equal(after[k], before[k]) for k in backbone)
    decoder = [k for k in after if "transformer_module" in k and after[k].is_floating_point()]
    assert any(not torch.equal(after[k], before[k]) for k in decoder)


@pytest.mark.parametrize("freeze_backbone", [True, False])
def test_optimizer_gives_backbone_and_head_their_own_learning_rates(tiny_encoder, freeze_backbone):
    from scripts.training import build_optimizer

    net = Mask2FormerDinov2(2, tiny_encoder, hidden_dim=32, num_queries=4, decoder_layers=1, pixel_decoder_layers=1)
    optimizer = build_optimizer(net, 5e-5, 5e-4, 0.01, freeze_backbone)
    backbone = {id(p) for p in net.backbone.parameters()}
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    head = {id(p) for p in net.parameters()} - backbone
    assert by_lr[5e-4] == head
    if freeze_backbone:
        assert set(by_lr) == {5e-4} and not any(p.requires_grad for p in net.backbone.parameters())
    else:
        assert by_lr[5e-5] == backbone
    assert all(g["weight_decay"] == 0.01 for g in optimizer.param_groups)


def test_optimizer_without_a_head_learning_rate_uses_one_rate(tiny_encoder):
    from scripts.training import build_optimizer

    net = Mask2FormerDinov2(2, tiny_encoder, hidden_dim=32, num_queries=4, decoder_layers=1, pixel_decoder_layers=1)
    optimizer = build_optimizer(net, 5e-5, None, 0.0, False)
    assert {g["lr"] for g in optimizer.param_groups} == {5e-5}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))


@pytest.mark.parametrize("bootstrap", [0.0, 0.5])
def test_semantic_loss_bootstrap_matches_a_hand_computation(bootstrap):
    from scripts.losses import SemanticDiceCELoss

    # two pixels, both predicted (0.8, 0.2); labels: pixel 0 foreground, pixel 1 background
    pred = torch.log(torch.tensor([0.8, 0.2])).view(1, 2, 1, 1).repeat(1, 1, 1, 2)
    label = torch.tensor([[[[1, 0]]]])
    p, b = torch.tensor([0.8, 0.2]), bootstrap
    targets = [(1 - b) * torch.tensor([0.0, 1.0]) + b * p, (1 - b) * torch.tensor([1.0, 0.0]) + b * p]
    ce = sum(-(t * p.log()).sum() for t in targets) / 2
    dice = 0.0
    for c in range(2):  # MONAI's soft Dice per channel (smooth 1e-5), averaged over channels
        inter = sum(p[c] * t[c] for t in targets)
        dice += 1 - (2 * inter + 1e-5) / (2 * p[c] + sum(t[c] for t in targets) + 1e-5)
    expected = ce + dice / 2
    assert SemanticDiceCELoss(2, bootstrap)(pred, label).item() == pytest.approx(expected.item(), abs=1e-5)


def test_bootstrap_mixes_the_prediction_into_the_query_mask_targets():
    label = torch.tensor([[[[0, 1, IGNORE_LABEL]]]])
    fill = torch.tensor([[0.7, 0.4, 0.9], [0.3, 0.6, 0.1]]).view(1, 2, 1, 3)
    masks, classes = semantic_to_instances(label, 2, fill, bootstrap=0.5)
    assert classes[0].tolist() == [0, 1]
    # valid pixels: 0.5 x binary + 0.5 x fill; the ignored pixel takes the fill itself
    assert torch.allclose(masks[0], torch.tensor([[[0.85, 0.2, 0.9]], [[0.15, 0.8, 0.1]]]))


@pytest.mark.parametrize("value", [1.0, -0.1, True, "0.2"])
def test_bootstrap_targets_must_be_in_zero_one(value, tmp_path):
    from scripts.pipeline import MedSMILEPipeline

    with pytest.raises(ValueError, match=r"bootstrap_targets=.* must be a number in \[0, 1\)"):
        MedSMILEPipeline(output_dir=str(tmp_path), model_path=str(tmp_path / "m.pt"), bootstrap_targets=value)
