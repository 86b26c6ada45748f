"""The frozen-backbone token cache gives the outputs of the image path (within float16 rounding of the tokens)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, augmentation_preset
from monai.utils import set_determinism

from scripts.inferers import FlipAveragingInferer
from scripts.network import Mask2FormerDinov2, network_from_file
from scripts.pipeline import MedSMILEPipeline
from scripts.token_cache import TOKEN_VIEWS, TokenHead, fill_token_views, token_training_transform
from scripts.training import training_transform


def tiny_network(encoder: str, feature_pyramid: str = "project_first") -> Mask2FormerDinov2:
    torch.manual_seed(0)
    return Mask2FormerDinov2(
        2, encoder, encoder, num_queries=4, decoder_layers=1, hidden_dim=32, feature_pyramid=feature_pyramid
    ).eval()


@pytest.mark.parametrize("layout", ["project_first", "upsample_first"])
def test_forward_tokens_of_backbone_tokens_is_forward(tiny_encoder, layout):
    network = tiny_network(tiny_encoder, layout)
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        grid = network.backbone_tokens(x)
        assert grid.shape == (2, 32, 4, 4)
        torch.testing.assert_close(network.forward_tokens(grid), network(x), rtol=0, atol=0)


def test_pyramid_layouts_differ_in_width_and_old_layout_keeps_its_keys(tiny_encoder):
    old, new = tiny_network(tiny_encoder, "upsample_first"), tiny_network(tiny_encoder, "project_first")
    assert old.pyramid.up2.in_channels == 32 and new.pyramid.up2.in_channels == 32  # tiny: D == hidden_dim
    assert not any(".project." in k for k in old.state_dict())  # pre-0.4.0 checkpoints load unchanged
    assert any(".project.0.weight" in k for k in new.state_dict())
    assert isinstance(Mask2FormerDinov2(2, tiny_encoder, hidden_dim=32).pyramid.project, torch.nn.Sequential)


def test_network_json_without_a_pyramid_key_rebuilds_the_old_layout(tiny_encoder, tmp_path):
    spec = {"num_classes": 2, "encoder_config": tiny_encoder, "num_queries": 4, "decoder_layers": 1, "hidden_dim": 64}
    (tmp_path / "old.json").write_text(json.dumps(spec))
    (tmp_path / "new.json").write_text(json.dumps({**spec, "feature_pyramid": "project_first"}))
    old, new = network_from_file(tmp_path / "old.json"), network_from_file(tmp_path / "new.json")
    assert old.pyramid.up2.in_channels == 32 and new.pyramid.up2.in_channels == 64
    with pytest.raises(ValueError, match="feature_pyramid must be one of"):
        tiny_network(tiny_encoder, "upsample_later")


def test_token_views_are_the_mirrored_images_tokens(tiny_encoder):
    network = tiny_network(tiny_encoder)
    images = (torch.rand(3, 3, 56, 56) * 255).to(torch.uint8)
    out = torch.zeros(3, 4, 32, 4, 4, dtype=torch.float16)
    fill_token_views(network, images, out, batch_size=2)
    x = images.float() / 255
    for v, dims in enumerate(TOKEN_VIEWS):
        expected = network.backbone_tokens(x.flip(dims) if dims else x)
        torch.testing.assert_close(out[:, v].float(), expected, rtol=1e-3, atol=1e-2)
    assert not torch.equal(out[:, 0], out[:, 1].flip(-1))  # mirrored tokens are not the mirrored image's tokens


def test_token_flips_draw_as_the_image_flips_and_mirror_the_label():
    label = torch.arange(16, dtype=torch.uint8).view(1, 4, 4)
    views = torch.arange(4, dtype=torch.float16).view(4, 1, 1, 1).expand(4, 2, 2, 2)
    flips = augmentation_preset("flips")
    image_path, token_path = training_transform(flips), token_training_transform(flips)
    seen = set()
    for seed in range(12):
        image_path.set_random_state(seed=seed)
        token_path.set_random_state(seed=seed)
        image = torch.arange(48, dtype=torch.uint8).view(3, 4, 4)
        a = image_path({"image": image, "label": label})
        b = token_path({"image": views, "label": label})
        torch.testing.assert_close(b["label"], a["label"])  # same draws, the label mirrored alike
        mirrored = [
            dims for dims in TOKEN_VIEWS if torch.equal(a["image"], (image.flip(dims) if dims else image) / 255)
        ]
        view = int(b["image"][0, 0, 0])
        assert [TOKEN_VIEWS[view]] == mirrored  # the view of the mirroring the image path drew
        assert b["image"].dtype == torch.float32 and "token_view" not in b
        seen.add(view)
    assert seen == {0, 1, 2, 3}


def test_token_head_averages_views_as_the_flip_inferer(tiny_encoder):
    network = tiny_network(tiny_encoder)
    images = (torch.rand(2, 3, 56, 56) * 255).to(torch.uint8)
    views = torch.zeros(2, 4, 32, 4, 4, dtype=torch.float16)
    fill_token_views(network, images, views)
    with torch.no_grad():
        expected = FlipAveragingInferer()(images.float() / 255, network)
        torch.testing.assert_close(TokenHead(network)(views.float()), expected, rtol=0, atol=2e-2)
        torch.testing.assert_close(
            TokenHead(network)(views[:, 0].float()), network(images.float() / 255), atol=2e-2, rtol=0
        )
    with pytest.raises(ValueError, match="expected 4 token views"):
        TokenHead(network)(views[:, :3].float())


def _round1_probabilities(png_dataset, tiny_encoder, tmp_path, cached: bool) -> np.ndarray:
    set_determinism(seed=0)
    pipeline = MedSMILEPipeline(
        output_dir=str(tmp_path / f"cached_{cached}"),
        model_path=str(tmp_path / f"cached_{cached}" / "model.pt"),
        encoder_weights=tiny_encoder,
        **png_dataset["inputs"],
        **{**TINY_OVERRIDES, "num_rounds": 1, "min_iterations": 12, "head_learning_rate": 5e-3},
        cache_backbone_tokens=cached,
        round_training="pseudo_labels",  # the round that also runs without the cache
        backbone_bf16=False,
        export_torchscript=False,
        pool_store="memory",
    )
    captured = {}
    import scripts.pipeline as pipeline_module

    original = pipeline_module.predict_and_refine

    def keep(*args, **kwargs):
        predictions = original(*args, **kwargs)
        captured["probs"] = predictions.probs.float().numpy().copy()
        return predictions

    pipeline_module.predict_and_refine = keep
    try:
        pipeline.run()
    finally:
        pipeline_module.predict_and_refine = original
    assert pipeline.summary["rounds"][-1]["training"]["iterations"] >= 12
    return captured["probs"]


@pytest.mark.slow
def test_cached_round_predicts_what_the_image_round_predicts(png_dataset, tiny_encoder, tmp_path):
    """A whole round (training on flipped views, then prediction) from cached tokens ends at the image path's
    probabilities, within what float16 tokens change over a few AdamW steps."""
    cached = _round1_probabilities(png_dataset, tiny_encoder, tmp_path, cached=True)
    plain = _round1_probabilities(png_dataset, tiny_encoder, tmp_path, cached=False)
    assert cached.shape == plain.shape == (6, 2, 56, 56)
    assert plain[:, 1].max() - plain[:, 1].min() > 0.1  # the trained network's map varies: the check means something
    assert np.abs(cached - plain).max() < 2e-2
    assert (cached.argmax(1) == plain.argmax(1)).mean() > 0.99


def test_bf16_backbone_features_stay_close_to_float32(tiny_encoder):
    from scripts.encoder import load_dinov2
    from scripts.features import dinov2_features
    from scripts.network import backbone_autocast, bf16_supported

    encoder = load_dinov2(tiny_encoder)
    images = torch.rand(2, 3, 56, 56)
    patch32, global32 = dinov2_features(encoder, images, [-3, -1], flip_average=True)
    patch16, global16 = dinov2_features(encoder, images, [-3, -1], flip_average=True, bf16=True)
    assert patch16.dtype == torch.float32 and patch16.shape == patch32.shape
    cosine = (patch16 * patch32).sum(1)  # both L2-normalised per cell
    assert cosine.min() > 0.99 and (global16 * global32).sum(1).min() > 0.99
    if bf16_supported("cpu"):
        assert not torch.equal(patch16, patch32)  # bf16 did run
    with backbone_autocast("cpu", enabled=False):
        assert not torch.is_autocast_enabled("cpu")
