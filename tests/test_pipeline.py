"""The bundle commands end to end with a tiny encoder: medsmile.json -> artefacts -> inference.json."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, CONFIGS, TINY_OVERRIDES, chain, run_medsmile
from monai.bundle import ConfigParser, run
from PIL import Image


@pytest.mark.slow
def test_pipeline_writes_every_artefact_and_inference_runs(tiny_encoder, png_dataset, tmp_path):
    data = png_dataset
    args = run_medsmile(tiny_encoder, tmp_path, refine=True, **data["inputs"])  # the paper's KNN step, off by default
    run_dir = tmp_path / "run"
    for r in range(3):
        labels = run_dir / f"round_{r}" / "labels"
        assert (run_dir / f"round_{r}" / "round.json").is_file()
        for name, (h, w) in data["sizes"].items():
            label = np.asarray(Image.open(labels / f"{name}.png"))
            assert label.shape == (h, w), f"round {r} {name}: pseudo-label must have the input size"
            assert set(np.unique(label)) <= {0, 1}
    assert not (run_dir / "round_1.partial").exists()

    summary = json.loads((run_dir / "summary.json").read_text())
    assert [x["round"] for x in summary["rounds"]] == [0, 1, 2]
    assert summary["encoder"]["kind"] == "local"
    assert summary["pool"]["images"] == 6
    for record in summary["rounds"][1:]:
        assert record["mean_uncertainty"] > 0
        assert len(record["refined"]) >= 1  # quantile 0.5 of 6 images: 3 uncertain, each with certain neighbours
        assert set(record["timings_s"]) >= {"train", "predict_refine"}
    csv_lines = (run_dir / "round_2" / "uncertainty.csv").read_text().splitlines()
    assert csv_lines[0] == "image,mean_pixel_entropy,refined" and len(csv_lines) == 7
    # the run ends with the review list (last round, most uncertain first) and the static report
    entropy = {row.split(",")[0]: float(row.split(",")[1]) for row in csv_lines[1:]}
    review = (run_dir / "review.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in review] == sorted(entropy, key=lambda n: (-entropy[n], n))
    assert "<img" in (run_dir / "report" / "index.html").read_text()

    # models/model.pt loads (weights_only) into inference.json's network_def
    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "inference.json"))
    parser.update({"bundle_root": BUNDLE_ROOT, "network_config": str(tmp_path / "models" / "network.json")})
    network = parser.get_parsed_content("network_def")
    state = torch.load(args["model_path"], weights_only=True)
    network.load_state_dict(state)
    round2 = torch.load(run_dir / "round_2" / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], round2[k]) for k in state), "model.pt must be the last round's network"

    # models/model.ts (traced) gives the eager network's output; the bundle metadata travels inside it
    extra = {"metadata.json": "", "inference.json": ""}
    traced = torch.jit.load(str(tmp_path / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["outputs"]["pred"]["num_channels"] == 2
    assert json.loads(extra["inference.json"])["image_size"] == TINY_OVERRIDES["image_size"]
    network.eval()
    for shape in ((1, 3, 56, 56), (2, 3, 56, 56)):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(traced(x), network(x), atol=1e-4, rtol=0)

    # inference.json segments new images and writes masks of their size
    out = tmp_path / "inference"
    run(
        config_file=os.path.join(CONFIGS, "inference.json"),
        bundle_root=BUNDLE_ROOT,
        ckpt_path=args["model_path"],
        network_config=str(tmp_path / "models" / "network.json"),
        dataset_dir=data["dataset_dir"],
        output_dir=str(out),
        image_size=TINY_OVERRIDES["image_size"],
    )
    for name, (h, w) in data["sizes"].items():
        mask = np.asarray(Image.open(out / f"{name}_seg.png"))
        assert mask.shape == (h, w)


@pytest.mark.slow
def test_volume_pseudo_labels_keep_geometry(tiny_encoder, png_dataset, tmp_path):
    data = png_dataset
    rng = np.random.default_rng(1)
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = [10, -20, 5]
    volume = (rng.random((40, 44, 3)) * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, affine), os.path.join(data["dataset_dir"], "vol.nii.gz"))
    run_medsmile(
        tiny_encoder,
        tmp_path,
        **data["inputs"],
        num_rounds=1,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pool"] == {"cases": 7, "images": 9, "skipped": []}
    for r in (0, 1):
        written = nib.load(tmp_path / "run" / f"round_{r}" / "labels" / "vol.nii.gz")
        assert written.shape == (40, 44, 3)
        np.testing.assert_allclose(written.affine, affine, atol=1e-5)


@pytest.mark.parametrize(
    "label_values, message",
    [((0, 1, 2), "label values {0, 1, 2} are outside 0..1"), ((0, 0, 0), "classes [1] are absent")],
)
def test_bad_reference_label_is_rejected_with_its_name(tiny_encoder, png_dataset, tmp_path, label_values, message):
    """Refused by the one label rule (image_io.label_classes: a {0, k} mask would be binary) or by the classes."""
    bad = np.full((48, 64), label_values[0], dtype=np.uint8)
    bad[10:20, 10:20] = label_values[1]
    bad[30:40, 10:20] = label_values[2]
    path = png_dataset["root"] / "bad_label.png"
    Image.fromarray(bad).save(path)
    with pytest.raises(RuntimeError) as err:
        run_medsmile(
            tiny_encoder,
            tmp_path,
            dataset_dir=png_dataset["dataset_dir"],
            reference_image=png_dataset["reference_image"],
            reference_label=str(path),
        )
    assert "ValueError" in chain(err.value) and "bad_label.png" in chain(err.value)
    assert message in chain(err.value)


def test_size_mismatch_and_unreadable_file_name_the_file(tiny_encoder, png_dataset, tmp_path):
    small = png_dataset["root"] / "small_label.png"
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(small)
    with pytest.raises(RuntimeError) as err:
        run_medsmile(
            tiny_encoder,
            tmp_path / "a",
            dataset_dir=png_dataset["dataset_dir"],
            reference_image=png_dataset["reference_image"],
            reference_label=str(small),
        )
    assert "small_label.png: label spatial shape (10, 10) does not match the image spatial shape (64, 48)" in chain(
        err.value
    )
    broken = os.path.join(png_dataset["dataset_dir"], "broken.png")
    with open(broken, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(RuntimeError) as err:
        run_medsmile(
            tiny_encoder,
            tmp_path / "b",
            dataset_dir=png_dataset["dataset_dir"],
            reference_image=png_dataset["reference_image"],
            reference_label=png_dataset["reference_label"],
        )
    assert "broken.png" in chain(err.value)


@pytest.mark.slow
def test_finished_run_is_never_overwritten(tiny_encoder, png_dataset, tmp_path):
    data = png_dataset
    common = {
        "dataset_dir": data["dataset_dir"],
        "reference_image": data["reference_image"],
        "reference_label": data["reference_label"],
        "num_rounds": 1,
    }
    run_medsmile(tiny_encoder, tmp_path, **common)
    label_file = tmp_path / "run" / "round_1" / "labels" / "img_0.png"
    before = (label_file.read_bytes(), os.stat(label_file).st_mtime_ns)
    with pytest.raises(RuntimeError) as err:
        run_medsmile(tiny_encoder, tmp_path, **{**common, "knn_k": 3})
    assert "holds a run with a different configuration (changed: ['knn_k'])" in chain(err.value)
    # a failing run (broken reference) into the same folder leaves the finished rounds untouched too
    with pytest.raises(RuntimeError):
        run_medsmile(
            tiny_encoder,
            tmp_path,
            **{**common, "overwrite": True, "reference_label": data["reference_image"] + ".missing"},
        )
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before
    # the same command again resumes: nothing is recomputed
    run_medsmile(tiny_encoder, tmp_path, **common)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before


@pytest.mark.slow
def test_run_recorded_before_an_option_existed_still_resumes(tiny_encoder, png_dataset, tmp_path):
    common = {k: png_dataset[k] for k in ("dataset_dir", "reference_image", "reference_label")}
    common["round_training"] = "pseudo_labels"  # the round every option here was added to
    run_medsmile(tiny_encoder, tmp_path, num_rounds=1, **common)
    record_file = tmp_path / "run" / "run_config.json"
    record = json.loads(record_file.read_text())
    label_file = tmp_path / "run" / "round_1" / "labels" / "img_0.png"
    before = (label_file.read_bytes(), os.stat(label_file).st_mtime_ns)
    # as written before reference_repeats existed: the default 1 is what such a run did, so nothing is recomputed
    old = {k: v for k, v in record["config"].items() if k != "reference_repeats"}
    record_file.write_text(json.dumps({"fingerprint": "older", "config": old}))
    first_wall_time = json.loads((tmp_path / "run" / "summary.json").read_text())["wall_time_s"]
    run_medsmile(tiny_encoder, tmp_path, num_rounds=1, **common)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before
    # the resumed run's wall time adds to the first one's, which did the work
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["wall_time_s"] > first_wall_time
    # as written before head_learning_rate existed (the head trained at learning_rate): the default 5e-4 is a change
    old = {k: v for k, v in record["config"].items() if k != "head_learning_rate"}
    record_file.write_text(json.dumps({"fingerprint": "older", "config": old}))
    with pytest.raises(RuntimeError) as err:
        run_medsmile(tiny_encoder, tmp_path, num_rounds=1, **common)
    assert "different configuration (changed: ['head_learning_rate'])" in chain(err.value)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before
    # as written before foreground_contrast existed (the paper's plain argmax): the default null is what such a run
    # did, so it resumes untouched; asking for the contrast step on that run is a change and is refused
    old = {k: v for k, v in record["config"].items() if k != "foreground_contrast"}
    record_file.write_text(json.dumps({"fingerprint": "older", "config": old}))
    run_medsmile(tiny_encoder, tmp_path, num_rounds=1, **common)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before
    with pytest.raises(RuntimeError) as err:
        run_medsmile(tiny_encoder, tmp_path, num_rounds=1, foreground_contrast=0.5, **common)
    assert "different configuration (changed: ['foreground_contrast'])" in chain(err.value)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before
    # as written by 0.4.0: consistency options recorded, no consistency_loss (added in 0.5.0 with a new default);
    # a pseudo_labels round computes nothing from them, so the run resumes, also with another consistency weight
    old = {**record["config"], "consistency_weight": 1.0, "consistency_threshold": 0.95}
    old.pop("consistency_loss", None)
    record_file.write_text(json.dumps({"fingerprint": "older", "config": old}))
    run_medsmile(tiny_encoder, tmp_path, num_rounds=1, consistency_weight=3.0, **common)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before


@pytest.mark.slow
def test_foreground_contrast_shapes_the_round0_labels(tiny_encoder, png_dataset, tmp_path):
    common = {k: png_dataset[k] for k in ("dataset_dir", "reference_image", "reference_label")}
    fractions = {}
    for name, contrast, recorded in (("plain", "null", None), ("impossible", 100, 100.0)):
        run_medsmile(tiny_encoder, tmp_path / name, num_rounds=0, foreground_contrast=contrast, **common)
        summary = json.loads((tmp_path / name / "run" / "summary.json").read_text())
        assert summary["config"]["foreground_contrast"] == recorded
        fractions[name] = summary["rounds"][0]["foreground_fraction"]
    # no cell beats its image's mean margin by 100 standard deviations: every round-0 label is background
    assert fractions["plain"] > 0 and fractions["impossible"] == 0
    with pytest.raises(RuntimeError) as err:
        run_medsmile(tiny_encoder, tmp_path / "bad", num_rounds=0, foreground_contrast="high", **common)
    assert "foreground_contrast='high' must be a number or null" in chain(err.value)


@pytest.mark.slow
def test_more_rounds_extend_a_finished_run(tiny_encoder, png_dataset, tmp_path):
    common = {k: png_dataset[k] for k in ("dataset_dir", "reference_image", "reference_label")}
    run_medsmile(tiny_encoder, tmp_path, num_rounds=1, **common)
    label_file = tmp_path / "run" / "round_1" / "labels" / "img_0.png"
    before = (label_file.read_bytes(), os.stat(label_file).st_mtime_ns)
    run_medsmile(tiny_encoder, tmp_path, num_rounds=2, **common)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before  # round 1 kept, not retrained
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert summary["config"]["num_rounds"] == 2 and not {"name", "size"} & set(summary["config"])
    # refinement is off by default: every round keeps its network's own predictions
    assert summary["config"]["refine"] is False and all(r["refined"] == [] for r in summary["rounds"][1:])
    rows = (tmp_path / "run" / "round_2" / "uncertainty.csv").read_text().splitlines()[1:]
    assert rows and all(row.endswith(",0") for row in rows)
    exported = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    last = torch.load(tmp_path / "run" / "round_2" / "model.pt", weights_only=True)
    assert exported.keys() == last.keys() and all(torch.equal(exported[k], last[k]) for k in last)
    # fewer rounds is a change: refused, and round 2 stays
    with pytest.raises(RuntimeError) as err:
        run_medsmile(tiny_encoder, tmp_path, num_rounds=1, **common)
    assert "different configuration (changed: ['num_rounds'])" in chain(err.value)
    assert (tmp_path / "run" / "round_2" / "model.pt").is_file()


@pytest.mark.slow
def test_a_moved_run_folder_resumes_from_its_new_place(tiny_encoder, png_dataset, tmp_path):
    common = {k: png_dataset[k] for k in ("dataset_dir", "reference_image", "reference_label")}
    run_medsmile(tiny_encoder, tmp_path / "old", num_rounds=1, **common)
    shutil.move(tmp_path / "old", tmp_path / "new")
    label_file = tmp_path / "new" / "run" / "round_1" / "labels" / "img_0.png"
    before = (label_file.read_bytes(), os.stat(label_file).st_mtime_ns)
    run_medsmile(tiny_encoder, tmp_path / "new", num_rounds=2, **common)
    assert (label_file.read_bytes(), os.stat(label_file).st_mtime_ns) == before  # round 1 kept, not retrained
    summary = json.loads((tmp_path / "new" / "run" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert summary["config"]["output_dir"] == str(tmp_path / "new" / "run")  # recorded where it now lives


def test_metadata_verifies_offline():
    from monai.bundle import verify_metadata

    verify_metadata(
        meta_file=os.path.join(CONFIGS, "metadata.json"),
        filepath=os.path.join(BUNDLE_ROOT, "docs", "meta_schema.json"),
    )


@pytest.mark.slow
def test_finetuned_encoder_feeds_every_later_stage(tiny_encoder, png_dataset, tmp_path, monkeypatch):
    from scripts import network as network_module
    from scripts.encoder import load_dinov2
    from scripts.features import dinov2_features
    from scripts.pool import ImagePool, pool_sources

    loaded = []
    original = network_module.Mask2FormerDinov2.load_encoder_weights
    monkeypatch.setattr(
        network_module.Mask2FormerDinov2,
        "load_encoder_weights",
        lambda self, path: (loaded.append(str(path)), original(self, path))[1],
    )
    data = png_dataset
    run_medsmile(
        tiny_encoder,
        tmp_path,
        **data["inputs"],
        num_rounds=1,
        finetune_encoder=True,
        finetune_epochs=1,
        finetune_batch_size=3,
        finetune_global_crop_size=56,
        finetune_local_crop_size=28,
        finetune_num_local_crops=1,
        backbone_bf16=False,  # float32 features, compared below with float32 recomputations
    )
    finetuned = str(tmp_path / "run" / "encoder_finetuned")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["encoder"]["kind"] == "local" and summary["encoder"]["source_kind"] == "moco-finetune"
    assert loaded == [finetuned]  # round 1's new network starts from the fine-tuned weights
    # round-0 features came from the fine-tuned encoder, not the original one
    pool = ImagePool.load(pool_sources(data["dataset_dir"], None, []), 56, 56, dataset_root=data["dataset_dir"])
    images = pool.feature_images.float() / 255
    saved = np.load(tmp_path / "run" / "round_0" / "global_features.npy")
    _, tuned = dinov2_features(load_dinov2(finetuned), images)
    _, base = dinov2_features(load_dinov2(tiny_encoder), images)
    np.testing.assert_allclose(saved, tuned.numpy(), atol=1e-5)
    assert not np.allclose(saved, base.numpy(), atol=1e-5)


def test_suggest_command_ranks_the_pool_through_medsmile_json(tiny_encoder, png_dataset, tmp_path):
    run(
        "suggest",
        config_file=os.path.join(CONFIGS, "medsmile.json"),
        bundle_root=BUNDLE_ROOT,
        output_dir=str(tmp_path / "out"),
        encoder_weights=tiny_encoder,
        feature_image_size=56,
        num_suggestions=3,
        dataset_dir=png_dataset["dataset_dir"],
    )
    rows = (tmp_path / "out" / "suggestions" / "ranking.csv").read_text().splitlines()
    assert rows[0].startswith("rank,image,score") and len(rows) == 1 + 6  # every pool image, best first
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    assert Image.open(tmp_path / "out" / "suggestions" / "preview.png").size[0] > 0


def reference_items_per_round(monkeypatch) -> list:
    """Each round's training items of the references (index -1), as ``train_round`` receives them."""
    import scripts.pipeline as pipeline_module

    seen = []
    real_train_round = pipeline_module.train_round

    def spy(network, items, *args, **kwargs):
        seen.append([item for item in items if item["index"] == -1])
        return real_train_round(network, items, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "train_round", spy)
    return seen


@pytest.mark.slow
def test_k_shot_references_leave_the_pool_and_keep_their_true_labels(tiny_encoder, png_dataset, tmp_path, monkeypatch):
    """K = 2: the second labelled image is a pool file; it must leave the pool (no pseudo-label is ever written for
    it) and every round must train on it with its true mask."""

    data = png_dataset
    rng = np.random.default_rng(5)
    from conftest import blob_image

    image, mask = blob_image(rng, 56, 56)
    Image.fromarray(image).save(os.path.join(data["dataset_dir"], "img_extra.png"))
    (data["root"] / "labels").mkdir()
    Image.fromarray(mask * 255).save(data["root"] / "labels" / "img_extra_mask.png")
    seen = reference_items_per_round(monkeypatch)
    run_medsmile(
        tiny_encoder,
        tmp_path,
        dataset_dir=data["dataset_dir"],
        reference_image=[data["reference_image"], os.path.join(data["dataset_dir"], "img_extra.png")],
        reference_label=[data["reference_label"], str(data["root"] / "labels" / "img_extra_mask.png")],
        round_training="pseudo_labels",  # the round that adds the references to its items (consistency: every batch)
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pool"]["images"] == 6
    for r in range(3):
        assert not (tmp_path / "run" / f"round_{r}" / "labels" / "img_extra.png").exists()
    assert len(seen) == 2  # two rounds, each with both references at their true labels
    for refs in seen:
        assert len(refs) == 2
        # MONAI's PNG reader gives (x, y) spatial order: the numpy (row, column) mask transposed
        expected = torch.as_tensor(np.ascontiguousarray(mask.T))[None]
        assert torch.equal(refs[1]["label"].long(), expected.long())


@pytest.mark.slow
def test_an_all_background_reference_teaches_the_rounds_absence_and_stays_out_of_round_0(
    tiny_encoder, png_dataset, tmp_path, monkeypatch
):
    """K-shot with an image marked "nothing here": round 0's labels are those of the other reference alone, and the
    round trains on the marked image with its empty label. Background-only labels alone are refused by name."""

    data = png_dataset
    normal = tmp_path / "normal"
    normal.mkdir()
    Image.fromarray(np.full((56, 56), 90, np.uint8)).save(normal / "normal.png")
    Image.fromarray(np.zeros((56, 56), np.uint8)).save(normal / "normal_mask.png")
    seen = reference_items_per_round(monkeypatch)
    common = {"dataset_dir": data["dataset_dir"], "num_rounds": 1, "round_training": "pseudo_labels"}
    run_medsmile(tiny_encoder, tmp_path / "one", reference_image=data["reference_image"],
                 reference_label=data["reference_label"], **common)  # fmt: skip
    run_medsmile(tiny_encoder, tmp_path / "two", reference_image=[data["reference_image"], str(normal / "normal.png")],
                 reference_label=[data["reference_label"], str(normal / "normal_mask.png")], **common)  # fmt: skip
    one, two = (sorted((tmp_path / run / "run" / "round_0" / "labels").iterdir()) for run in ("one", "two"))
    assert [f.name for f in one] == [f.name for f in two] and len(one) == 6
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))  # round 0 ignores the empty reference
    summary = json.loads((tmp_path / "two" / "run" / "summary.json").read_text())
    assert summary["references"] == {"shown": 1, "empty": 1}
    assert [len(refs) for refs in seen] == [1, 2]  # the first run's round, then the second's: both references
    assert not seen[1][1]["label"].any()
    # consistency rounds (the default) put both references in every batch
    consistency = {**common, "round_training": "consistency"}
    run_medsmile(tiny_encoder, tmp_path / "three", reference_image=[data["reference_image"], str(normal / "normal.png")],
                 reference_label=[data["reference_label"], str(normal / "normal_mask.png")], **consistency)  # fmt: skip
    assert (tmp_path / "three" / "run" / "round_1" / "model.pt").is_file()
    with pytest.raises(Exception) as err:
        run_medsmile(tiny_encoder, tmp_path / "none", reference_image=[str(normal / "normal.png")] * 2,
                     reference_label=[str(normal / "normal_mask.png")] * 2, **common)  # fmt: skip
    assert "every reference label is all background" in chain(err.value)
    assert "at least one must show every class 0..1" in chain(err.value)


@pytest.mark.parametrize("text, expected", [("null", None), ("None", None), (None, None), (0.5, 0.5), (2, 2.0)])
def test_command_line_numbers_may_be_null(text, expected):
    from scripts.pipeline import as_optional_number

    assert as_optional_number("foreground_contrast", text) == expected
    with pytest.raises(ValueError, match="head_learning_rate='fast' must be a number or null"):
        as_optional_number("head_learning_rate", "fast")


@pytest.mark.parametrize(("text", "expected"), [("false", False), ("False", False), ("true", True), ("1", True)])
def test_command_line_switches_are_parsed_as_booleans(text, expected):
    """fire hands ``--refine false`` over as the string "false"; it must switch refinement off, not on."""
    from scripts.pipeline import as_bool

    assert as_bool("refine", text) is expected


def test_a_switch_that_is_not_a_boolean_is_refused(tiny_encoder, png_dataset, tmp_path):
    with pytest.raises(Exception) as err:
        run_medsmile(tiny_encoder, tmp_path, **png_dataset["inputs"], refine="maybe")
    assert "refine must be true or false, got 'maybe'" in chain(err.value)


@pytest.mark.slow
def test_linear_probe_round0_is_recorded_and_saved(tiny_encoder, png_dataset, tmp_path):
    common = {k: png_dataset[k] for k in ("dataset_dir", "reference_image", "reference_label")}
    run_medsmile(tiny_encoder, tmp_path / "probe", num_rounds=0, round0_classifier="linear_probe", **common)
    run_dir = tmp_path / "probe" / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["round0_classifier"] == "linear_probe"
    state = torch.load(run_dir / "round_0" / "linear_probe.pt", weights_only=True)
    with open(os.path.join(tiny_encoder, "config.json")) as f:
        hidden = json.load(f)["hidden_size"]
    assert state["weight"].shape == (2, 2 * hidden) and state["bias"].shape == (2,)  # 2 feature layers, 2 classes
    assert len(list((run_dir / "round_0" / "labels").iterdir())) == summary["rounds"][0]["images"]
    run_medsmile(tiny_encoder, tmp_path / "plain", num_rounds=0, **common)
    assert not (tmp_path / "plain" / "run" / "round_0" / "linear_probe.pt").exists()
    with pytest.raises(RuntimeError) as err:
        run_medsmile(tiny_encoder, tmp_path / "bad", num_rounds=0, round0_classifier="svm", **common)
    assert "round0_classifier='svm' must be one of ('prototypes', 'linear_probe')" in chain(err.value)


@pytest.mark.slow
def test_reference_rotations_give_round0_four_views_of_the_reference(tiny_encoder, png_dataset, tmp_path, monkeypatch):
    import scripts.pipeline

    class_prototypes = scripts.pipeline.class_prototypes
    seen = []

    def recording_prototypes(features, labels, num_classes):
        seen.append(([f.shape for f in features], [label.clone() for label in labels]))
        return class_prototypes(features, labels, num_classes)

    monkeypatch.setattr(scripts.pipeline, "class_prototypes", recording_prototypes)
    common = {k: png_dataset[k] for k in ("dataset_dir", "reference_image", "reference_label")}
    run_medsmile(tiny_encoder, tmp_path / "rot", num_rounds=0, reference_rotations=True, **common)
    shapes, labels = seen[-1]
    assert len(shapes) == 4 and len(set(shapes)) == 1  # each view resized to the square feature input
    for k, label in enumerate(labels):
        assert torch.equal(label, labels[0].rot90(k, (-2, -1)))
    summary = json.loads((tmp_path / "rot" / "run" / "summary.json").read_text())
    assert summary["config"]["reference_rotations"] is True
    run_medsmile(tiny_encoder, tmp_path / "plain", num_rounds=0, **common)
    assert len(seen[-1][0]) == 1
    with pytest.raises(Exception) as err:
        run_medsmile(tiny_encoder, tmp_path / "rot", num_rounds=0, **common)  # the same folder, option switched off
    assert "different configuration (changed: ['reference_rotations'])" in chain(err.value)
