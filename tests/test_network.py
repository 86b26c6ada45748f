"""The pyramid's normalisation is a one-group GroupNorm (over C, H, W), and checkpoints keep their keys."""

from __future__ import annotations

import math

import torch

from scripts.network import GroupNorm1, Mask2FormerDinov2


def test_group_norm1_normalises_over_channels_and_pixels_together():
    norm = GroupNorm1(2)
    x = torch.tensor([[[[1.0, 3.0]], [[5.0, 7.0]]]])  # (1, C=2, 1, 2): mean 4, variance (9 + 1 + 1 + 9) / 4 = 5
    expected = (x - 4.0) / math.sqrt(5.0 + norm.eps)
    torch.testing.assert_close(norm(x), expected)
    # a channel LayerNorm would normalise each pixel's (1, 5) and (3, 7) to (-1, 1): not what this module does
    assert not torch.allclose(norm(x)[0, :, 0, 0], torch.tensor([-1.0, 1.0]), atol=1e-3)


def test_pyramid_state_dict_keys_are_unchanged(tiny_encoder):
    """Checkpoints written while the class was called LayerNorm2d load: keys are by Sequential index."""
    net = Mask2FormerDinov2(2, tiny_encoder, hidden_dim=32, num_queries=4, decoder_layers=1, pixel_decoder_layers=1)
    keys = [k.split("encoder.", 1)[1] for k in net.state_dict() if ".encoder.up4." in k]
    assert keys == ["up4.0.weight", "up4.0.bias", "up4.1.weight", "up4.1.bias", "up4.3.weight", "up4.3.bias"]
    norm = net.mask2former.model.pixel_level_module.encoder.up4[1]
    assert isinstance(norm, GroupNorm1) and norm.num_groups == 1 and norm.weight.shape == (32,)


def test_imagenet_normalize_by_hand_and_the_network_uses_it(tiny_encoder):
    from scripts.network import imagenet_normalize

    x = torch.tensor([0.485, 0.456, 0.406, 1.0, 0.0, 0.5], dtype=torch.float64).view(2, 3, 1, 1)
    expected = [0.0, 0.0, 0.0, (1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]
    out = imagenet_normalize(x)
    assert out.dtype == torch.float64  # statistics follow the images' dtype, as features.py had them
    torch.testing.assert_close(out.flatten(), torch.tensor(expected, dtype=torch.float64))
    net = Mask2FormerDinov2(2, tiny_encoder, hidden_dim=32, num_queries=4, decoder_layers=1, pixel_decoder_layers=1)
    images = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(net.backbone_tokens(images), net.pyramid.tokens(imagenet_normalize(images)))
    assert not torch.allclose(net.backbone_tokens(images), net.pyramid.tokens(images))  # it does normalise


def test_backbone_bf16_runs_only_gradient_free_untraced_forwards(tiny_encoder, tmp_path):
    """inference.json's ``backbone_bf16``: network_from_file sets it; a no-grad forward then runs the backbone in bf16
    (close to float32) and the head in float32, while training and tracing (model.ts) stay float32, bit for bit."""
    import json

    from scripts.network import bf16_supported, network_from_file

    spec = {"num_classes": 2, "encoder_config": tiny_encoder, "hidden_dim": 32, "num_queries": 4}
    spec.update(decoder_layers=1, pixel_decoder_layers=1)
    (tmp_path / "network.json").write_text(json.dumps(spec))
    torch.manual_seed(0)
    plain = network_from_file(tmp_path / "network.json").eval()
    fast = network_from_file(tmp_path / "network.json", backbone_bf16=True).eval()
    fast.load_state_dict(plain.state_dict())
    assert (plain.backbone_bf16, fast.backbone_bf16) == (False, True)
    images = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = plain(images), fast(images)
    assert got.dtype == torch.float32 and got.shape == expected.shape == (2, 2, 28, 28)
    assert (got.exp() - expected.exp()).abs().max() < 2e-2
    assert torch.equal(got, expected) != bf16_supported("cpu")  # bf16 ran exactly where the CPU has it
    torch.testing.assert_close(fast(images), plain(images), rtol=0, atol=0)  # with gradients: float32
    with torch.no_grad():
        traced = torch.jit.trace(fast, images)
        torch.testing.assert_close(traced(images), expected, rtol=0, atol=0)  # model.ts is traced in float32
