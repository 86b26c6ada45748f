"""FlipAveragingInferer: the mean class probability over mirrored views, checked by hand; its use in the pool
predictions (``flip_average_predictions``) and in inference.json."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, TINY_OVERRIDES


class PositionBias(torch.nn.Module):
    """Class-0 logit = the input plus a bias that grows to the right, class-1 logit = 0: not flip-equivariant."""

    def forward(self, x):
        bias = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x[:, :1])
        return torch.cat([x[:, :1] + bias, torch.zeros_like(x[:, :1])], dim=1)


def test_flip_averaging_matches_the_hand_computed_mean_of_four_views():
    from scripts.inferers import FlipAveragingInferer

    a, b = 0.3, -1.2
    x = torch.tensor([[[[a, b]]]])  # (1, 1, H=1, W=2)
    probs = FlipAveragingInferer()(x, PositionBias()).exp()
    # class-0 logits per view, mapped back: identity [a, b+1], horizontal [a+1, b], vertical (H=1) [a, b+1],
    # both [a+1, b]; with the class-1 logit 0 the class-0 probability is the sigmoid
    s = torch.sigmoid(torch.tensor([a, a + 1, b, b + 1]))
    expected0 = torch.stack([(s[0] + s[1]) / 2, (s[2] + s[3]) / 2])
    torch.testing.assert_close(probs[0, 0, 0], expected0)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 1, 2))


def test_flip_averaging_leaves_a_flip_equivariant_network_unchanged():
    from scripts.inferers import FlipAveragingInferer

    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 2, kernel_size=1)  # pointwise: commutes with every flip
    x = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(FlipAveragingInferer()(x, net), net(x).log_softmax(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flips", [[(-3,)], [()], [(0, -1)]])
def test_flip_averaging_refuses_non_spatial_flips(flips):
    from scripts.inferers import FlipAveragingInferer

    with pytest.raises(ValueError, match=r"must be spatial dims of a 2-D image"):
        FlipAveragingInferer(flips)


def test_pool_predictions_are_flip_averaged_when_asked():
    from scripts.training import predict_and_refine

    images = torch.randint(0, 256, (3, 3, 6, 6), dtype=torch.uint8)  # pool images are square
    args = {"global_features": np.zeros((3, 8), np.float32), "num_classes": 2, "batch_size": 2}
    args.update(device=torch.device("cpu"), quantile=0.9, k=1, refine=False)
    plain = predict_and_refine(PositionBias(), images, **args)
    flipped = predict_and_refine(PositionBias(), images, **args, flip_average=True)
    x, net = images.float() / 255, PositionBias()
    views = [net(x)] + [net(x.flip(dims)).flip(dims) for dims in [(-1,), (-2,), (-2, -1)]]
    mean = sum(v.softmax(1) for v in views) / 4
    torch.testing.assert_close(flipped.probs.float(), mean, atol=1e-3, rtol=0)
    torch.testing.assert_close(plain.probs.float(), PositionBias()(x).softmax(1), atol=1e-3, rtol=0)
    assert not torch.allclose(plain.probs.float(), flipped.probs.float(), atol=1e-2)


@pytest.mark.slow
def test_pipeline_records_flip_average_predictions(tiny_encoder, png_dataset, tmp_path):
    from scripts.pipeline import MedSMILEPipeline

    args = {**TINY_OVERRIDES, "num_rounds": 1, "flip_average_predictions": "true", "export_torchscript": False}
    MedSMILEPipeline(
        output_dir=str(tmp_path / "run"), model_path=str(tmp_path / "model.pt"), encoder_weights=tiny_encoder,
        **png_dataset["inputs"], **args,
    ).run()  # fmt: skip
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert recorded["config"]["flip_average_predictions"] is True  # the command line's "true" read as a switch
    assert os.path.isfile(tmp_path / "run" / "round_1" / "round.json")


@pytest.mark.parametrize("flip, expected", [(True, "FlipAveragingInferer"), (False, "SimpleInferer")])
def test_inference_config_switches_the_inferer(flip, expected):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE_ROOT, "configs", "inference.json"))
    parser.update({"flip_average_predictions": flip, "image_size": 28})
    assert "flip_average" not in parser.config  # one name per meaning: medsmile.json's flip_average is round 0's
    inferer = parser.get_parsed_content("inferer")
    assert type(inferer).__name__ == "PlaneInferer" and type(inferer.inner).__name__ == expected


class PerPixelNet(torch.nn.Module):
    """2-D only (refuses 5-D input): class-1 logit = 3 * (channel mean - 0.5) + a column-dependent bias."""

    def forward(self, x):
        assert x.ndim == 4, x.shape
        grey = x.mean(1, keepdim=True)
        bias = torch.linspace(-0.2, 0.2, x.shape[-1]).expand_as(grey)
        return torch.cat([torch.zeros_like(grey), 3 * (grey - 0.5) + bias], 1)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
@pytest.mark.parametrize("flip", [False, True])
def test_plane_inferer_runs_the_2d_network_slice_by_slice(slice_axis, flip):
    from scripts.inferers import FlipAveragingInferer, PlaneInferer

    torch.manual_seed(0)
    volume = torch.rand(2, 3, 6, 6, 6)
    inner = FlipAveragingInferer() if flip else None
    out = PlaneInferer(roi_size=(6, 6), slice_axis=slice_axis, inner=inner, sw_batch_size=4)(volume, PerPixelNet())
    assert out.shape == (2, 2, 6, 6, 6)
    single = inner or (lambda x, net: net(x))
    for k in range(6):
        plane = volume.select(slice_axis + 2, k)
        torch.testing.assert_close(out.select(slice_axis + 2, k), single(plane, PerPixelNet()), atol=1e-5, rtol=0)
    images = volume[:, :, :, :, 0]  # 2-D batches go straight to the (inner) inferer
    torch.testing.assert_close(PlaneInferer((6, 6), inner=inner)(images, PerPixelNet()), single(images, PerPixelNet()))
    with pytest.raises(ValueError, match=r"expected a batch of 2-D images .* got \(6, 6\)"):
        PlaneInferer((6, 6))(torch.zeros(6, 6), PerPixelNet())
