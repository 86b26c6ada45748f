"""Round 0 (prototypes, cosine maps, softmax) against hand computations on a 2x2 feature grid."""

import math

import pytest
import torch
import torch.nn.functional as F

from scripts.prototypes import (
    check_reference_label,
    class_prototypes,
    foreground_contrast_scores,
    prototype_scores,
    rotated_views,
    soft_labels,
)


def test_prototypes_and_scores_match_hand_computation():
    # D=2 features on a 2x2 grid, already unit length: left column points along x, right column along y.
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # (D=2, h=2, w=2)
    # label at 4x4 resolution: right half is class 1 -> nearest resize to 2x2 gives [[0, 1], [0, 1]]
    label = torch.tensor([[0, 0, 1, 1]] * 4)
    protos = class_prototypes([feats], [label], num_classes=2)
    # class 0 cells are the left column: features (1, 0) -> p0 = (1, 0); class 1: right column -> p1 = (0, 1)
    assert torch.allclose(protos, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))

    query = torch.tensor([[[0.6, 0.0], [1.0, 0.0]], [[0.8, 1.0], [0.0, 1.0]]])[None]  # (1, 2, 2, 2)
    scores = prototype_scores(query, protos)
    # S_0 = F . p0 = x component, S_1 = y component
    assert torch.allclose(scores[0, 0], torch.tensor([[0.6, 0.0], [1.0, 0.0]]))
    assert torch.allclose(scores[0, 1], torch.tensor([[0.8, 1.0], [0.0, 1.0]]))

    soft = soft_labels(scores, (2, 2))  # same size: bilinear is the identity, only the softmax acts
    p1 = math.exp(0.8) / (math.exp(0.6) + math.exp(0.8))
    assert soft[0, 1, 0, 0].item() == pytest.approx(p1, abs=1e-6)
    assert torch.allclose(soft.sum(1), torch.ones(1, 2, 2))
    assert soft.argmax(1).tolist() == [[[1, 1], [0, 1]]]


def test_prototype_is_normalised_mean_over_class_cells():
    feats = torch.tensor([[[1.0, 0.6]], [[0.0, 0.8]]])  # (D=2, h=1, w=2), both cells class 1
    label = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])  # 2x4 -> 1x2 nearest: [[1, 0]]
    protos = class_prototypes([feats], [label], num_classes=2)
    assert torch.allclose(protos[1], torch.tensor([1.0, 0.0]))
    assert torch.allclose(protos[0], torch.tensor([0.6, 0.8]))
    # pooled over two references, the class-1 sum is (1, 0) + (0.6, 0.8) = (1.6, 0.8) -> normalised
    protos2 = class_prototypes([feats, feats], [label, 1 - label], num_classes=2)
    expected = torch.tensor([1.6, 0.8]) / math.hypot(1.6, 0.8)
    assert torch.allclose(protos2[1], expected) and torch.allclose(protos2[0], expected)


def test_foreground_contrast_raises_the_bar_to_the_image_mean_plus_k_std():
    # one image, 1x4 cells, background score 0 everywhere: the margins are the foreground scores 0.1, 0.2, 0.3, 0.6
    scores = torch.tensor([[[[0.0, 0.0, 0.0, 0.0]], [[0.1, 0.2, 0.3, 0.6]]]])
    # mean 0.3; deviations -0.2, -0.1, 0, 0.3 -> unbiased variance 0.14 / 3; k = 0.5 -> bar 0.3 + 0.5 * 0.21602
    bar = 0.3 + 0.5 * math.sqrt(0.14 / 3)
    adjusted = foreground_contrast_scores(scores, 0.5)
    assert torch.equal(adjusted[:, 0], scores[:, 0])  # background untouched
    torch.testing.assert_close(adjusted[0, 1, 0], torch.tensor([0.1, 0.2, 0.3, 0.6]) - bar)
    assert scores.argmax(1).tolist() == [[[1, 1, 1, 1]]]  # the paper's argmax: every cell foreground
    assert adjusted.argmax(1).tolist() == [[[0, 0, 0, 1]]]  # only the cell that stands out in its image
    assert foreground_contrast_scores(scores, None) is scores


def test_foreground_contrast_never_lowers_the_paper_bar_and_is_per_class_and_image():
    # margins -0.5, -0.4, -0.3, 0.1: mean -0.275, std 0.263, bar -0.275 + 0.5 * 0.263 < 0 -> clamped to 0
    low = torch.tensor([[[[0.0, 0.0, 0.0, 0.0]], [[-0.5, -0.4, -0.3, 0.1]]]])
    torch.testing.assert_close(foreground_contrast_scores(low, 0.5), low)
    # a batch of that image and the one above, and a third class: each (image, class) gets its own bar
    high = torch.tensor([[[[0.0, 0.0, 0.0, 0.0]], [[0.1, 0.2, 0.3, 0.6]]]])
    batch = torch.cat([torch.cat([low, high[:, 1:]], 1), torch.cat([high, low[:, 1:]], 1)])  # (2, C=3, 1, 4)
    adjusted = foreground_contrast_scores(batch, 0.5)
    bar = 0.3 + 0.5 * math.sqrt(0.14 / 3)
    torch.testing.assert_close(adjusted[0, 1], low[0, 1])
    torch.testing.assert_close(adjusted[0, 2], high[0, 1] - bar)
    torch.testing.assert_close(adjusted[1, 1], high[0, 1] - bar)
    torch.testing.assert_close(adjusted[1, 2], low[0, 1])


def test_multiclass_upsampling_is_bilinear_then_softmax():
    scores = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]], [[0.5, 0.5]]]])  # (1, C=3, 1, 2)
    soft = soft_labels(scores, (1, 4))
    assert soft.shape == (1, 3, 1, 4)
    # align_corners=False bilinear at x=0.25 of the 2-pixel row: first output pixel = first input value
    assert torch.allclose(soft[0, :, 0, 0], torch.softmax(torch.tensor([0.0, 1.0, 0.5]), 0))


@pytest.mark.parametrize(
    "values, message",
    [([0, 1, 3], "values [3] are outside 0..2"), ([0, 2], "classes [1] are absent"), ([-1, 0, 1, 2], "[-1]")],
)
def test_bad_reference_labels_are_rejected(values, message):
    label = torch.tensor(values)
    with pytest.raises(ValueError, match="ref.png") as err:
        check_reference_label(label, 3, name="reference label ref.png")
    assert message in str(err.value)


def test_an_all_background_label_passes_only_where_allowed():
    empty = torch.zeros(4, 4, dtype=torch.long)
    check_reference_label(empty, 3, allow_empty=True)  # K-shot: an image marked "nothing here"
    with pytest.raises(ValueError, match=r"classes \[1, 2\] are absent"):
        check_reference_label(empty, 3)
    with pytest.raises(ValueError, match=r"classes \[2\] are absent"):  # partly labelled: still every class or none
        check_reference_label(torch.tensor([0, 1]), 3, allow_empty=True)


def test_flip_averaged_multi_layer_features_match_hand_computation(tiny_encoder):
    from transformers import Dinov2Model

    from scripts.features import dinov2_features
    from scripts.network import IMAGENET_MEAN, IMAGENET_STD

    encoder = Dinov2Model.from_pretrained(tiny_encoder).eval()
    x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    patch, glob = dinov2_features(encoder, x, layers=(-3, -1), flip_average=True)

    def grids(image):
        norm = (image - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        out = encoder(pixel_values=norm, output_hidden_states=True)
        per_layer = [encoder.layernorm(out.hidden_states[0]), out.last_hidden_state]  # -3 of 3 hidden states = 0
        return [F.normalize(t[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2), dim=1) for t in per_layer], out

    with torch.no_grad():
        direct, out = grids(x)
        mirrored, _ = grids(x.flip(-1))
        layers = [F.normalize(d + m.flip(-1), dim=1) for d, m in zip(direct, mirrored, strict=True)]
        expected = F.normalize(torch.cat(layers, dim=1), dim=1)
    assert patch.shape == (2, 64, 4, 4)
    torch.testing.assert_close(patch, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(glob, F.normalize(out.last_hidden_state[:, 0], dim=1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"feature layers \[-5\] must be hidden-state indices in -3..2"):
        dinov2_features(encoder, x, layers=(-5,))


def test_rotated_views_turn_image_and_label_together():
    # 2x3 image whose channel 0 numbers the pixels 0..5 row by row; the label marks the top-right pixel (value 2)
    image = torch.arange(6.0).reshape(1, 2, 3).repeat(3, 1, 1)
    label = torch.tensor([[0, 0, 1], [0, 0, 0]])
    views = rotated_views(image, label)
    assert [tuple(v[1].shape) for v in views] == [(2, 3), (3, 2), (2, 3), (3, 2)]
    # 90 degrees counter-clockwise: the top-right corner moves to the top-left; 180: bottom-left; 270: bottom-right
    assert [torch.nonzero(v[1]).tolist() for v in views] == [[[0, 2]], [[0, 0]], [[1, 0]], [[2, 1]]]
    assert views[1][0][0].tolist() == [[2.0, 5.0], [1.0, 4.0], [0.0, 3.0]]
    for view_image, view_label in views:  # the labelled pixel still shows the same image value in every view
        assert view_image[:, view_label == 1].flatten().tolist() == [2.0, 2.0, 2.0]
    assert torch.equal(views[0][0], image) and torch.equal(views[0][1], label)
