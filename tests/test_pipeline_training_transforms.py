"""The rounds' training transforms as configuration (medsmile.json's train_transforms, picked from its
augmentation_presets by ``augmentation``, and consistency_strong_transforms): the default lists reproduce the runs of
before byte for byte, a list of flips only runs from the cached tokens and any other runs the ViT (said once),
consistency rounds refuse such a list by its key, the lists are recorded (a swap is a changed run) and runs recorded
before them resume with their preset."""

from __future__ import annotations

import functools
import json
import logging
import os
import re

import pytest
import torch
from conftest import CONFIGS, augmentation_preset, chain, run_medsmile
from monai.transforms import RandFlipd, RandRotate90d, ShiftIntensity, ShiftIntensityd

import scripts.training
from scripts.consistency import ConsistencyStep, strong_transform
from scripts.pipeline import MedSMILEPipeline, describe_part
from scripts.token_cache import token_flips, token_training_transform, uncacheable_reason
from scripts.training import AUGMENTATIONS, training_transform

CONFIG = os.path.join(CONFIGS, "medsmile.json")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["consistency", "pseudo_labels", "strong"])
def test_default_lists_train_and_flips_run_from_the_token_cache(tiny_encoder, png_dataset, tmp_path, mode):
    """The default lists drive a whole round in each mode; the flips preset runs from the cached tokens, the strong
    one runs the ViT. (Byte-identity with the runs of before was checked when the lists replaced the Python
    choice, against sha256 digests that are specific to one CPU and torch build, so they are not kept here.)"""
    options = {"round_training": "consistency"}
    if mode != "consistency":
        options = {"round_training": "pseudo_labels", "augmentation": "strong" if mode == "strong" else "flips"}
    run_medsmile(tiny_encoder, tmp_path, **png_dataset["inputs"], num_rounds=1, export_torchscript=False, **options)
    labels = sorted((tmp_path / "run" / "round_1" / "labels").iterdir())
    assert [p.stem for p in labels] == sorted(png_dataset["sizes"])  # every pool image relabelled
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert ("token_cache_s" in summary) == (mode != "strong")  # the flips preset runs from the cached tokens
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())["config"]
    names = [str(t) for t in recorded["train_transforms"]]
    assert len(names) == len(augmentation_preset("strong" if mode == "strong" else "flips"))
    assert any("RandAffined" in n for n in names) == (mode == "strong")


# ---------------------------------------------------------------- the lists and the token cache
FLIP_TARGET = "monai.transforms.spatial.dictionary.RandFlipd"
ROTATE = {"_target_": "RandRotate90d", "_mode_": "callable", "keys": ["image", "label"], "prob": 1.0}


def _pipeline(tmp_path, **options):
    return MedSMILEPipeline(output_dir=str(tmp_path / "run"), model_path=str(tmp_path / "m.pt"), **options)


def test_augmentation_picks_a_preset_of_medsmile_json_as_train_transforms(tmp_path):
    with open(CONFIG) as f:
        config = json.load(f)
    assert tuple(config["augmentation_presets"]) == AUGMENTATIONS  # the names the augmentation option accepts
    flips = [{"_target_": FLIP_TARGET, "keys": ["image", "label"], "prob": 0.5, "spatial_axis": a} for a in (0, 1)]
    assert describe_part(augmentation_preset("flips")) == flips
    strong = [d["_target_"].rsplit(".", 1)[1] for d in describe_part(augmentation_preset("strong"))]
    assert strong == [
        "RandFlipd",
        "RandFlipd",
        "RandAffined",
        "RandAdjustContrastd",
        "RandScaleIntensityd",
        "RandShiftIntensityd",
    ]
    # what the pipeline records; a Python caller without lists gets the preset its augmentation names
    assert _pipeline(tmp_path).cfg["train_transforms"] == flips
    strong_run = _pipeline(tmp_path, augmentation="strong", round_training="pseudo_labels")
    assert strong_run.cfg["train_transforms"] == describe_part(augmentation_preset("strong"))
    # the strong view of consistency rounds is recorded with its arguments, the grey step's function by name
    recorded = _pipeline(tmp_path).cfg["consistency_strong_transforms"]
    assert recorded[3] == {
        "_target_": "monai.transforms.utility.array.RandLambda",
        "func": "scripts.consistency.grey",
        "prob": 0.2,
    }


def test_an_unknown_augmentation_on_the_command_line_is_refused_by_name(tiny_encoder, tmp_path):
    with pytest.raises(Exception) as err:
        run_medsmile(tiny_encoder, tmp_path, augmentation="heavy")
    assert "augmentation='heavy' must be one of ('flips', 'strong')" in chain(err.value)
    assert not (tmp_path / "run").exists()


def test_only_flips_of_image_and_label_replay_from_cached_tokens():
    flips = token_flips([functools.partial(RandFlipd, keys=["label", "image"], prob=0.3, spatial_axis=[1])])
    assert [(f.spatial_axis, f.prob) for f in flips] == [(1, 0.3)]
    assert [(f.spatial_axis, f.prob) for f in token_flips(augmentation_preset("flips"))] == [(0, 0.5), (1, 0.5)]
    assert token_flips([]) == []  # no augmentation: always the identity view
    refused = {
        "train_transforms#2 (RandRotate90d)": [
            *augmentation_preset("flips"),
            functools.partial(RandRotate90d, keys=["image", "label"]),
        ],
        "train_transforms#0 (RandFlipd)": [functools.partial(RandFlipd, keys="image", prob=0.5, spatial_axis=0)],
    }
    for name, transforms in refused.items():
        with pytest.raises(ValueError, match=re.escape(f"{name} is not a RandFlipd over spatial axis 0 or 1")):
            token_flips(transforms)
    # RandFlipd without spatial_axis mirrors every axis: not one of the cached views' single mirrors
    assert "train_transforms#0 (RandFlipd)" in uncacheable_reason(
        [functools.partial(RandFlipd, keys=["image", "label"])]
    )
    assert uncacheable_reason(augmentation_preset("flips")) == ""


def test_a_flips_list_draws_the_same_mirrors_on_tokens_as_on_images():
    """Other probabilities than the preset's: the token path still mirrors the label exactly as the image path."""
    transforms = [
        functools.partial(RandFlipd, keys=["image", "label"], prob=p, spatial_axis=a) for p, a in ((0.8, 1), (0.3, 0))
    ]
    label = torch.arange(16, dtype=torch.uint8).view(1, 4, 4)
    views = torch.arange(4, dtype=torch.float16).view(4, 1, 1, 1).expand(4, 2, 2, 2)
    image_path, token_path = training_transform(transforms), token_training_transform(transforms)
    seen = set()
    for seed in range(16):
        image_path.set_random_state(seed=seed)
        token_path.set_random_state(seed=seed)
        a = image_path({"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "label": label})
        b = token_path({"image": views, "label": label})
        assert torch.equal(b["label"], a["label"])
        seen.add(int(b["image"][0, 0, 0]))
    assert seen == {0, 1, 2, 3}


def test_consistency_rounds_refuse_a_list_the_token_cache_cannot_replay(tmp_path):
    rotate = [functools.partial(RandRotate90d, keys=["image", "label"])]
    with pytest.raises(ValueError) as err:
        _pipeline(tmp_path, train_transforms=rotate)  # round_training 'consistency' is the default
    message = str(err.value)
    assert "needs freeze_backbone=true, cache_backbone_tokens=true and train_transforms of flips only" in message
    assert "train_transforms#0 (RandRotate90d) is not a RandFlipd" in message
    assert "--round_training pseudo_labels trains without them" in message
    with pytest.raises(ValueError, match=re.escape("augmentation='strong'; train_transforms#2 (RandAffined) is not")):
        _pipeline(tmp_path, augmentation="strong")
    assert _pipeline(tmp_path, train_transforms=rotate, round_training="pseudo_labels")._uses_token_cache() is False
    assert not (tmp_path / "run").exists()


def test_a_ready_transform_object_is_refused_since_its_arguments_cannot_be_recorded(tmp_path):
    with pytest.raises(ValueError, match=r'train_transforms#1 is a RandFlipd object: give it "_mode_": "callable"'):
        _pipeline(tmp_path, train_transforms=[RandRotate90d, RandFlipd(keys=["image", "label"], prob=0.5)])
    with pytest.raises(TypeError, match="consistency_strong_transforms must be a list of transforms"):
        _pipeline(tmp_path, consistency_strong_transforms=functools.partial(ShiftIntensity, offset=0.1))
    with pytest.raises(ValueError, match=r'pool_transforms#0 is a ShiftIntensityd object: give it "_mode_"'):
        _pipeline(tmp_path, pool_transforms=[ShiftIntensityd(keys="image", offset=1.0)])  # before the pool is read
    assert not (tmp_path / "run").exists()


def test_the_strong_view_applies_the_given_list_then_clamps():
    image = torch.tensor([0.1, 0.5, 0.9]).view(1, 1, 3).expand(3, 2, 3)
    out = strong_transform([functools.partial(ShiftIntensity, offset=0.25)])(image)
    torch.testing.assert_close(torch.as_tensor(out)[:, 0, :], torch.tensor([[0.35, 0.75, 1.0]] * 3))
    assert torch.equal(torch.as_tensor(strong_transform([])(image)), image)  # an empty list: the view is the image


# ---------------------------------------------------------------- whole runs
@pytest.mark.slow
def test_a_swapped_list_in_json_reaches_the_trainer_and_turns_the_cache_off(
    tiny_encoder, png_dataset, tmp_path, caplog
):
    built = []
    real = scripts.training.training_transform

    def spy(transforms=None):
        built.append(real(transforms))
        return built[-1]

    caplog.set_level(logging.INFO, logger="scripts.pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scripts.training, "training_transform", spy)
        run_medsmile(
            tiny_encoder, tmp_path, **png_dataset["inputs"], num_rounds=2, export_torchscript=False,
            round_training="pseudo_labels", train_transforms=[ROTATE],
        )  # fmt: skip
    assert len(built) == 2  # one per round, each with the JSON list between the fixed steps
    names = [type(t).__name__ for t in built[0].transforms]
    assert names == ["Lambdad", "Lambdad", "RandRotate90d", "Lambdad", "Lambdad"]
    said = [r.getMessage() for r in caplog.records if "backbone token cache off" in r.getMessage()]
    why = "train_transforms#0 (RandRotate90d) is not a RandFlipd over spatial axis 0 or 1 of image and label"
    replay = "the only transform that cached backbone tokens can replay"
    assert said == [f"backbone token cache off, the ViT runs at every training step: {why}, {replay}"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "token_cache_s" not in summary
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())["config"]
    assert recorded["train_transforms"] == [
        {"_target_": "monai.transforms.spatial.dictionary.RandRotate90d", "keys": ["image", "label"], "prob": 1.0}
    ]
    # another list is another run: the finished rounds are not reused with the default flips
    with pytest.raises(RuntimeError) as err:
        run_medsmile(
            tiny_encoder, tmp_path, **png_dataset["inputs"], num_rounds=2, export_torchscript=False,
            round_training="pseudo_labels",
        )  # fmt: skip
    assert "different configuration (changed: ['train_transforms'])" in chain(err.value)


@pytest.mark.slow
def test_the_strong_view_list_in_json_reaches_the_consistency_stream(tiny_encoder, png_dataset, tmp_path, monkeypatch):
    views = []
    real = ConsistencyStep._strong_view

    def spy(self, index, dims, device):
        out = real(self, index, dims, device)
        pixels = torch.as_tensor(self.pool_images[index.cpu().numpy()]).float() / 255.0
        expected = [(p.flip(d) if d else p) for p, d in zip(pixels, dims, strict=True)]
        views.append((out, (torch.stack(expected) + 0.25).clamp(0, 1)))
        return out

    monkeypatch.setattr(ConsistencyStep, "_strong_view", spy)
    shift = [{"_target_": "ShiftIntensity", "_mode_": "callable", "offset": 0.25}]
    run_medsmile(
        tiny_encoder, tmp_path, **png_dataset["inputs"], num_rounds=1, export_torchscript=False,
        consistency_strong_transforms=shift,
    )  # fmt: skip
    assert views
    for out, expected in views:
        torch.testing.assert_close(out, expected)
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())["config"]
    assert recorded["consistency_strong_transforms"] == [
        {"_target_": "monai.transforms.intensity.array.ShiftIntensity", "offset": 0.25}
    ]


@pytest.mark.slow
@pytest.mark.parametrize("augmentation", ["flips", "strong"])
def test_a_run_recorded_with_only_augmentation_resumes_with_its_preset(
    tiny_encoder, png_dataset, tmp_path, augmentation
):
    options = {"num_rounds": 1, "export_torchscript": False, "augmentation": augmentation}
    options["round_training"] = "consistency" if augmentation == "flips" else "pseudo_labels"
    run_medsmile(tiny_encoder, tmp_path, **png_dataset["inputs"], **options)
    record_file = tmp_path / "run" / "run_config.json"
    record = json.loads(record_file.read_text())
    assert record["config"]["train_transforms"] == describe_part(augmentation_preset(augmentation))
    label_file = tmp_path / "run" / "round_1" / "labels" / "img_0.png"
    before = (label_file.read_bytes(), os.stat(label_file).st_mtime_ns)
    old = {k: v for k, v in record["config"].items() if k not in ("train_transforms", "consistency_strong_transforms")}
    record_file.write_text(json.dumps({"fingerprint": "older", "config": old}))  # as 0.5.0 wrote it
    run_medsmile(tiny_encoder, tmp_path, **png_dataset["inputs"], **options)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before
    if augmentation == "strong":  # that run trained with the strong preset: without --augmentation strong it changed
        record_file.write_text(json.dumps({"fingerprint": "older", "config": old}))
        with pytest.raises(RuntimeError) as err:
            run_medsmile(tiny_encoder, tmp_path, **png_dataset["inputs"], **{**options, "augmentation": "flips"})
        assert "different configuration (changed: ['augmentation', 'train_transforms'])" in chain(err.value)
