"""``ignore_uncertain_pixels``: which pixels are left out (by hand), that the losses skip them, and that a run saves
them with the round so that a resumed run trains on the same labels. (Training a tiny network with ignored pixels:
test_losses.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from monai.losses import DiceCELoss

from scripts.losses import IGNORE_LABEL, SemanticDiceCELoss, semantic_to_instances
from scripts.refinement import mark_uncertain_pixels


def soft_from_margins(labels: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """Two-class soft labels whose argmax is ``labels`` with the given top-1 minus top-2 margins."""
    p_label = (1 + margins) / 2
    p1 = torch.where(labels == 1, p_label, 1 - p_label)
    return torch.stack([1 - p1, p1], dim=1)


def test_marks_the_smallest_margins_of_each_class_in_each_image():
    labels = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0]]], dtype=torch.uint8)  # 2 foreground, 6 background pixels
    margins = torch.tensor([[[0.06, 0.05, 0.1, 0.3], [0.5, 0.7, 0.9, 0.4]]])
    soft = soft_from_margins(labels, margins)
    out = mark_uncertain_pixels(labels.clone(), soft, 0.5)
    # foreground: int(0.5 * 2) = 1 -> its smaller margin 0.05; background: int(0.5 * 6) = 3 -> 0.1, 0.3, 0.4.
    # (An image-wide cut of 4 would take both foreground pixels, 0.05 and 0.06, and leave no lesion to learn.)
    assert out.tolist() == [[[1, 255, 255, 255], [0, 0, 0, 255]]]
    assert mark_uncertain_pixels(labels.clone(), soft, 0.25).tolist() == [[[1, 1, 255, 0], [0, 0, 0, 0]]]
    assert torch.equal(mark_uncertain_pixels(labels.clone(), soft, 0.0), labels)
    # ties: three background margins of 0.5 (exact in binary), one to ignore -> the first in pixel order
    tied = mark_uncertain_pixels(labels.clone(), soft_from_margins(labels, torch.full((1, 2, 4), 0.5)), 0.2)
    assert tied.tolist() == [[[1, 1, 255, 0], [0, 0, 0, 0]]]  # int(0.2 * 2) = 0 foreground, int(0.2 * 6) = 1


def test_semantic_loss_equals_monai_dicece_without_ignored_pixels():
    torch.manual_seed(0)
    pred = torch.randn(2, 3, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8))
    ours = SemanticDiceCELoss(3)(pred, label)
    monai = DiceCELoss(to_onehot_y=True, softmax=True)(pred, label)
    assert ours.item() == pytest.approx(monai.item(), abs=1e-6)


def test_semantic_loss_gives_no_gradient_at_ignored_pixels():
    torch.manual_seed(0)
    pred = torch.randn(1, 2, 4, 4, requires_grad=True)
    label = torch.randint(0, 2, (1, 1, 4, 4))
    label[0, 0, :2, :] = IGNORE_LABEL  # the top half is ignored
    SemanticDiceCELoss(2)(pred, label).backward()
    assert pred.grad[..., :2, :].abs().max().item() == 0.0
    assert pred.grad[..., 2:, :].abs().max().item() > 0.0
    # and the value ignores what the top half says: same loss as the bottom half alone (CE by pixels, Dice by sums)
    bottom = SemanticDiceCELoss(2)(pred[..., 2:, :], label[..., 2:, :])
    assert SemanticDiceCELoss(2)(pred, label).item() == pytest.approx(bottom.item(), abs=1e-6)
    everything = torch.full((1, 1, 4, 4), IGNORE_LABEL)
    assert SemanticDiceCELoss(2)(pred, everything).item() == 0.0


def test_set_loss_targets_take_the_network_probability_at_ignored_pixels():
    label = torch.tensor([[[[0, 1], [IGNORE_LABEL, 1]]]])  # (1, 1, 2, 2)
    fill = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]], [[0.9, 0.8], [0.7, 0.6]]]])  # (1, C=2, 2, 2)
    masks, classes = semantic_to_instances(label, 2, fill)
    assert classes[0].tolist() == [0, 1]
    assert torch.allclose(masks[0], torch.tensor([[[1.0, 0.0], [0.3, 0.0]], [[0.0, 1.0], [0.7, 1.0]]]))
    masks, _ = semantic_to_instances(label, 2)  # no fill: ignored pixels belong to no class
    assert masks[0][:, 1, 0].tolist() == [0.0, 0.0]


@pytest.mark.slow
def test_run_saves_ignored_pixels_and_resume_reads_them(tiny_encoder, png_dataset, tmp_path):
    from scripts.pipeline import MedSMILEPipeline
    from scripts.pool import ImagePool, pool_sources
    from scripts.round_store import read_round_labels

    args = {**TINY_OVERRIDES, "num_rounds": 1, "ignore_uncertain_pixels": 0.25, "export_torchscript": False}
    run_dir = tmp_path / "run"
    MedSMILEPipeline(
        output_dir=str(run_dir), model_path=str(tmp_path / "model.pt"), encoder_weights=tiny_encoder,
        **png_dataset["inputs"], **args,
    ).run()  # fmt: skip
    pool = ImagePool.load(pool_sources(png_dataset["dataset_dir"], None, []), 56, 56)
    size = 56 * 56
    for r in (0, 1):
        packed = np.load(run_dir / f"round_{r}" / "ignored_pixels.npy")
        ignored = np.unpackbits(packed, axis=1, count=size).astype(bool)
        assert ignored.shape == (len(pool), size)
        # a quarter of each class's pixels, rounded down per class (2 classes): between size / 4 - 2 and size / 4
        assert ((ignored.sum(1) <= size // 4) & (ignored.sum(1) > size // 4 - 2)).all()
        with_ignore = read_round_labels(str(run_dir), r, pool, 56)
        assert torch.equal(with_ignore.flatten(1) == IGNORE_LABEL, torch.from_numpy(ignored))
    files = list((run_dir / "round_1" / "labels").iterdir())
    from PIL import Image

    assert files and all(np.asarray(Image.open(f)).max() < IGNORE_LABEL for f in files)  # user outputs stay labels
