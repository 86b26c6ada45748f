"""``augmentation``: the training views (medsmile.json's presets of train_transforms) keep image and pseudo-label
aligned; "strong" moves pixels, "flips" only mirrors them; an unknown name is refused."""

import pytest
import torch
from conftest import TINY_OVERRIDES, augmentation_preset

import scripts.training
from scripts.losses import IGNORE_LABEL
from scripts.pipeline import MedSMILEPipeline, describe_part
from scripts.training import training_items, training_transform


def _item():
    """A square object with an ignored stripe; the image is white exactly where the label is foreground."""
    label = torch.zeros(1, 56, 56, dtype=torch.uint8)
    label[0, 10:30, 14:40] = 1
    label[0, 40:44, :] = IGNORE_LABEL
    image = (label == 1).to(torch.uint8).repeat(3, 1, 1) * 255
    return training_items(image[None], label)[0], label


def _flips(label):
    return [label, label.flip(-1), label.flip(-2), label.flip(-1).flip(-2)]


def test_flips_only_mirror():
    item, label = _item()
    transform = training_transform(augmentation_preset("flips"))
    for seed in range(8):
        transform.set_random_state(seed)
        out = transform(item)
        assert any(torch.equal(out["label"], f.long()) for f in _flips(label))
        assert torch.equal(out["image"].mean(0) > 0.5, out["label"][0] == 1)


def test_strong_moves_pixels_and_keeps_image_and_label_aligned():
    item, label = _item()
    transform = training_transform(augmentation_preset("strong"))
    moved = 0
    for seed in range(8):
        transform.set_random_state(seed)
        out = transform(item)
        assert out["label"].dtype == torch.long and out["label"].shape == (1, 56, 56)
        assert set(torch.unique(out["label"]).tolist()) <= {0, 1, IGNORE_LABEL}
        assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
        # jitter keeps foreground >= 0.7 and background <= 0.1; only resampled edge pixels may disagree
        agree = ((out["image"].mean(0) > 0.4) == (out["label"][0] == 1)).float().mean()
        assert agree > 0.97
        moved += not any(torch.equal(out["label"], f.long()) for f in _flips(label))
    assert moved >= 4  # the affine map fires with probability 0.8


def test_unknown_augmentation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="augmentation='heavy' must be one of \\('flips', 'strong'\\)"):
        MedSMILEPipeline(output_dir=str(tmp_path), model_path=str(tmp_path / "m.pt"), augmentation="heavy")


@pytest.mark.slow
def test_the_bundle_trains_its_rounds_with_the_chosen_augmentation(tiny_encoder, png_dataset, tmp_path, monkeypatch):
    used = []

    def spy(transforms=None):
        used.append(describe_part(transforms))
        return training_transform(transforms)

    monkeypatch.setattr(scripts.training, "training_transform", spy)
    args = {**TINY_OVERRIDES, "num_rounds": 1, "augmentation": "strong", "export_torchscript": False}
    args["round_training"] = "pseudo_labels"  # the strong augmentation needs the paper's round
    MedSMILEPipeline(
        output_dir=str(tmp_path / "run"), model_path=str(tmp_path / "model.pt"), encoder_weights=tiny_encoder,
        **png_dataset["inputs"], **args,
    ).run()  # fmt: skip
    assert used == [describe_part(augmentation_preset("strong"))]
    assert (tmp_path / "run" / "round_1" / "round.json").is_file()
