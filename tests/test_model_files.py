"""The exported model's files: training size and class names recorded and used by inference.json, each run's model
kept in its own folder, and a model of another run in models/ moved aside rather than overwritten."""

from __future__ import annotations

import filecmp
import json
import logging
import os

import numpy as np
import pytest
from conftest import BUNDLE_ROOT, TINY_OVERRIDES
from monai.bundle import ConfigParser, run
from PIL import Image

CONFIGS = os.path.join(BUNDLE_ROOT, "configs")
FAST = {**TINY_OVERRIDES, "num_rounds": 1, "export_torchscript": False}


def train(tiny_encoder, data, out_dir, models_dir, **overrides):
    run(
        config_file=os.path.join(CONFIGS, "medsmile.json"),
        bundle_root=BUNDLE_ROOT,
        output_dir=str(out_dir),
        model_path=str(models_dir / "model.pt"),
        encoder_weights=tiny_encoder,
        **data["inputs"],
        **{**FAST, **overrides},
    )
    return json.loads((out_dir / "summary.json").read_text())


def run_inference(models_dir, dataset_dir, out, **overrides):
    """inference.json with the model in models_dir and no image_size given."""
    run(
        config_file=os.path.join(CONFIGS, "inference.json"),
        bundle_root=BUNDLE_ROOT,
        ckpt_path=str(models_dir / "model.pt"),
        network_config=str(models_dir / "network.json"),
        dataset_dir=str(dataset_dir),
        output_dir=str(out),
        **overrides,
    )


@pytest.mark.slow
def test_model_records_its_size_and_runs_keep_their_models(tiny_encoder, png_dataset, tmp_path, caplog):
    models = tmp_path / "models"
    summary_a = train(tiny_encoder, png_dataset, tmp_path / "run_a", models, image_size=70)

    # the run's own copy and the published one are the same files
    for name in ("model.pt", "network.json", "metadata.json"):
        assert filecmp.cmp(tmp_path / "run_a" / "model" / name, models / name, shallow=False), name
    network = json.loads((models / "network.json").read_text())
    assert network["image_size"] == 70 and network["label_names"] == ["background", "lesion"]
    assert network["trained_by"] == {
        "output_dir": str(tmp_path / "run_a"),
        "fingerprint": network["trained_by"]["fingerprint"],
    }
    assert summary_a["model"]["trained_by"] == network["trained_by"] and summary_a["model"]["previous"] is None
    metadata = json.loads((models / "metadata.json").read_text())
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [70, 70]
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "lesion"}

    # inference.json without an image_size: the training size (70), not the old fixed 224
    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "inference.json"))
    parser.update({"bundle_root": BUNDLE_ROOT, "network_config": str(models / "network.json")})
    assert parser.get_parsed_content("image_size") == 70
    image = os.path.join(png_dataset["dataset_dir"], "img_0.png")
    assert parser.get_parsed_content("preprocessing")({"image": image})["image"].shape == (3, 70, 70)
    out = tmp_path / "pred"
    run_inference(models, png_dataset["dataset_dir"], out)
    for name, (h, w) in png_dataset["sizes"].items():
        assert np.asarray(Image.open(out / f"{name}_seg.png")).shape == (h, w)

    # a second run elsewhere: models/ now holds its model, run A's is moved aside, not overwritten
    caplog.set_level(logging.INFO, logger="scripts.model_files")
    summary_b = train(tiny_encoder, png_dataset, tmp_path / "run_b", models, image_size=56)
    kept = models / "previous" / network["trained_by"]["fingerprint"]
    assert summary_b["model"]["previous"] == {"trained_by": network["trained_by"], "moved_to": str(kept)}
    assert sorted(os.listdir(kept)) == ["metadata.json", "model.pt", "network.json"]
    assert filecmp.cmp(kept / "model.pt", tmp_path / "run_a" / "model" / "model.pt", shallow=False)
    assert filecmp.cmp(models / "model.pt", tmp_path / "run_b" / "model" / "model.pt", shallow=False)
    assert json.loads((models / "network.json").read_text())["trained_by"]["output_dir"] == str(tmp_path / "run_b")
    assert summary_b["model"]["trained_by"]["output_dir"] == str(tmp_path / "run_b")
    assert f"held the model of another run ({network['trained_by']}): moved to {kept}" in caplog.text
    assert f"now holds the model of run {tmp_path / 'run_b'}" in caplog.text

    # the same run exporting again (a rerun of the finished command) replaces its own model: nothing moved
    summary_b2 = train(tiny_encoder, png_dataset, tmp_path / "run_b", models, image_size=56)
    assert summary_b2["model"]["previous"] is None
    assert os.listdir(models / "previous") == [kept.name]


def test_a_model_of_unknown_origin_is_moved_aside(tmp_path):
    from scripts.model_files import publish_model

    run_dir, models = tmp_path / "run" / "model", tmp_path / "models"
    run_dir.mkdir(parents=True)
    models.mkdir()
    (models / "model.pt").write_bytes(b"hand-made")  # no network.json: which run made it is not recorded
    (models / "notes.txt").write_text("not a model file")
    (run_dir / "model.pt").write_bytes(b"new")
    (run_dir / "network.json").write_text(json.dumps({"num_classes": 2}))
    done = publish_model(str(run_dir), str(models), "model", {"output_dir": "x", "fingerprint": "f"})
    moved = done["previous"]["moved_to"]
    assert os.path.basename(moved).startswith("unrecorded-") and done["previous"]["trained_by"] is None
    assert (tmp_path / "models" / "previous" / os.path.basename(moved) / "model.pt").read_bytes() == b"hand-made"
    assert (models / "model.pt").read_bytes() == b"new" and (models / "notes.txt").is_file()

    # a broken network.json beside a model: its run is unknown too; a second such move gets a name of its own
    (models / "network.json").write_text("{broken")
    again = publish_model(str(run_dir), str(models), "model", {"output_dir": "y", "fingerprint": "g"})["previous"]
    assert again["trained_by"] is None and again["moved_to"] != moved
    assert (
        tmp_path / "models" / "previous" / os.path.basename(again["moved_to"]) / "network.json"
    ).read_text() == "{broken"


def test_image_size_of_an_older_export_and_a_missing_record(tmp_path, caplog):
    from scripts.model_files import trained_image_size

    old = tmp_path / "network.json"
    old.write_text(json.dumps({"num_classes": 2, "encoder_config": {}}))
    assert trained_image_size(old) == 224  # what inference.json used before the size was recorded
    assert "records no image_size" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json not found: it is written beside models/model.pt"):
        trained_image_size(tmp_path / "nowhere.json")


def test_a_model_trained_with_other_pool_transforms_says_so_where_it_is_loaded():
    from scripts.model_files import preprocessing_warning

    assert preprocessing_warning({"num_classes": 2, "image_size": 224}, "models/network.json") is None
    swapped = [{"_target_": "monai.transforms.ScaleIntensityRanged", "keys": "image", "a_min": -100}]
    assert preprocessing_warning({"pool_transforms": swapped}, "models/network.json") == (
        "models/network.json: this model was trained with its own pool_transforms (ScaleIntensityRanged), but "
        "inference.json and the other configs apply the default preprocessing (IntensityToRGBd, ResizePlanesd): "
        "change their 'preprocessing' alike before trusting its predictions"
    )


@pytest.mark.parametrize(
    "num_classes, names, expected",
    [(2, None, ["background", "lesion"]), (4, None, ["background", "class_1", "class_2", "class_3"]),
     (3, "background, polyp,  tool", ["background", "polyp", "tool"]), (2, ["bg", "skin lesion"], ["bg", "skin lesion"])],
)  # fmt: skip
def test_label_names(num_classes, names, expected):
    from scripts.model_files import label_names

    assert label_names(num_classes, names) == expected


def test_label_names_are_checked_before_any_compute(tmp_path):
    from scripts.pipeline import MedSMILEPipeline

    with pytest.raises(ValueError, match=r"label_names=\['background', 'a'\] must name all 3 classes"):
        MedSMILEPipeline(
            output_dir=str(tmp_path), model_path=str(tmp_path / "m.pt"), num_classes=3, label_names=["background", "a"]
        )
    with pytest.raises(ValueError, match="must be non-empty and distinct"):
        MedSMILEPipeline(output_dir=str(tmp_path), model_path=str(tmp_path / "m.pt"), label_names=["bg", "BG"])
    assert not os.listdir(tmp_path)
