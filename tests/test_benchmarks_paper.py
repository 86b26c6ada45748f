"""The paper benchmark's code path on a generated stand-in for ../shared/data (the smoke profile, tiny encoder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image
from PIL import Image

from benchmarks import paper


def fake_data_root(root, n_train=6, n_test=2):
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / "busi" / sub).mkdir(parents=True)
    stems = [f"case{i}" for i in range(n_train + n_test)]
    for stem in stems:
        image, mask = blob_image(rng, 40, 48)
        Image.fromarray(image).save(root / "busi" / "images" / f"{stem}.png")
        Image.fromarray(mask * 255).save(root / "busi" / "masks" / f"{stem}.png")
    (root / "splits.json").write_text(json.dumps({"busi": {"train": stems[:n_train], "test": stems[n_train:]}}))
    return root


@pytest.mark.slow
def test_benchmark_smoke_profile_writes_its_table(tiny_encoder, tmp_path, monkeypatch):
    fake_data_root(tmp_path / "data")
    results = tmp_path / "results"
    monkeypatch.chdir(tmp_path)  # a relative --data_root must survive the runs' start in bundle/
    paper.main(
        [
            "--profile", "smoke", "--dataset", "busi", "--seeds", "0", "--pool_size", "3",
            "--data_root", "data", "--results_dir", str(results),
            "--set", f'encoder_weights="{tiny_encoder}"', "head_learning_rate=null",
            "--set", "flip_average_predictions=true",  # a second --set adds to the first
        ]
    )  # fmt: skip
    tag = f"encoder_weights-{os.path.basename(tiny_encoder)}_head_learning_rate-None_flip_average_predictions-True"
    out = results / f"smoke_pool-3_{tag}"
    res = json.loads((out / "busi.json").read_text())
    run = res["runs"][0]
    assert res["pool_size"] == 3 and run["medsmile"]["summary_rounds"][0]["images"] == 3  # not the profile's 4
    assert len(run["medsmile"]["pool_dice"]) == 2 and len(run["no_knn"]["pool_dice"]) == 2  # rounds 0 and 1
    assert all(0.0 <= d <= 1.0 for d in run["medsmile"]["pool_dice"])
    assert set(run["medsmile"]["test"][0]) == {"busi"}
    assert set(run["medsmile"]["test_flip_average"][0]) == {"busi"}  # scored both ways
    assert 0.0 <= res["supervised"]["test"]["busi"]["dice"] <= 1.0
    table = (out / "results.md").read_text()
    assert "| medsmile pool pseudo-label Dice | pool |" in table and "fully supervised" in table
    assert (out / "busi.md").read_text() == table  # one file per dataset survives later invocations
    # null reaches the run (monai.bundle drops "--key None", which used to leave the default 5e-4 in place)
    recorded = json.loads((out / "busi" / "seed0" / "medsmile" / "run" / "run_config.json").read_text())["config"]
    assert recorded["head_learning_rate"] is None
    assert recorded["flip_average_predictions"] is True
    # rescoring the last round's network by inference views reproduces both recorded test scores
    from benchmarks import flip_inference

    flip_inference.main(
        ["--runs", str(out), "--dataset", "busi", "--seeds", "0", "--views", "none", "h", "hv", "--data_root", "data"]
    )
    rescored = json.loads((out / "flip_inference_busi.json").read_text())
    assert rescored["test_size"] == 2 and rescored["seeds"]["0"]["round"] == 1
    views = rescored["seeds"]["0"]["test"]
    assert views["none"]["busi"]["dice"] == pytest.approx(run["medsmile"]["test"][-1]["busi"]["dice"])
    assert views["hv"]["busi"]["dice"] == pytest.approx(run["medsmile"]["test_flip_average"][-1]["busi"]["dice"])
    assert "| busi | " in (out / "flip_inference_busi.md").read_text()


def empty_masks_outside_the_pool(data_root, pool_size):
    """Blank the masks of the train images that seed 0 leaves outside a pool of ``pool_size``; returns them."""
    split = paper.choose_split(str(data_root), "busi", 0, pool_size, None)
    train = json.loads((data_root / "splits.json").read_text())["busi"]["train"]
    outside = [stem for stem in train if ("busi", stem) not in [split["reference"], *split["pool"]]]
    for stem in outside:
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(data_root / "busi" / "masks" / f"{stem}.png")
    return split, outside


def test_empty_references_come_from_outside_the_pool_in_seeded_order(tmp_path):
    data_root = fake_data_root(tmp_path / "data", n_train=8)
    before, outside = empty_masks_outside_the_pool(data_root, pool_size=3)
    assert "empty_references" not in before  # the records of runs without keep their key
    split = paper.choose_split(str(data_root), "busi", 0, 3, None, empty_references=2)
    assert (split["reference"], split["pool"]) == (before["reference"], before["pool"])
    assert len(split["empty_references"]) == 2 and {s for _, s in split["empty_references"]} <= set(outside)
    order = [c for c in paper.choose_split(str(data_root), "busi", 0, None, None)["pool"] if c[1] in outside]
    assert split["empty_references"] == order[:2]  # the seeded order of the train images
    with pytest.raises(ValueError, match="busi: 5 empty references asked for, but only 4 train images outside"):
        paper.choose_split(str(data_root), "busi", 0, 3, None, empty_references=5)


@pytest.mark.slow
def test_a_benchmark_with_an_empty_reference_runs_it_as_k_shot(tiny_encoder, tmp_path):
    data_root = fake_data_root(tmp_path / "data", n_train=8)
    empty_masks_outside_the_pool(data_root, pool_size=3)
    results = tmp_path / "results"
    paper.main(
        [
            "--profile", "smoke", "--dataset", "busi", "--seeds", "0", "--pool_size", "3", "--variants", "medsmile",
            "--data_root", str(data_root), "--results_dir", str(results), "--empty_references", "1",
            "--set", f'encoder_weights="{tiny_encoder}"',
        ]
    )  # fmt: skip
    out = results / f"smoke_pool-3_empty-1_encoder_weights-{os.path.basename(tiny_encoder)}"
    run = json.loads((out / "busi.json").read_text())["runs"][0]
    summary = json.loads((out / "busi" / "seed0" / "medsmile" / "run" / "summary.json").read_text())
    assert summary["references"] == {"shown": 1, "empty": 1} and summary["pool"]["images"] == 3
    assert len(run["empty_references"]) == 1
    assert f'References labelled "nothing here" (empty masks, K-shot): seed 0: {run["empty_references"][0]}.' in (
        (out / "busi.md").read_text()
    )


@pytest.mark.slow
def test_an_interrupted_benchmark_keeps_the_seeds_it_finished(tiny_encoder, tmp_path, monkeypatch):
    data_root = fake_data_root(tmp_path / "data")
    results = tmp_path / "results"
    run_medsmile = paper.run_medsmile

    def interrupted_at_seed_1(profile, out_dir, data_root, split, overrides):
        if overrides["seed"] == 1:
            raise RuntimeError("interrupted at seed 1")
        return run_medsmile(profile, out_dir, data_root, split, overrides)

    monkeypatch.setattr(paper, "run_medsmile", interrupted_at_seed_1)
    with pytest.raises(RuntimeError, match="interrupted at seed 1"):
        paper.main(
            [
                "--profile", "smoke", "--dataset", "busi", "--seeds", "0", "1", "--variants", "medsmile",
                "--data_root", str(data_root), "--results_dir", str(results),
                "--set", f'encoder_weights="{tiny_encoder}"',
            ]
        )  # fmt: skip
    out = results / f"smoke_encoder_weights-{os.path.basename(tiny_encoder)}"
    res = json.loads((out / "busi.json").read_text())
    assert res["seeds"] == [0] and res["seeds_planned"] == [0, 1] and [r["seed"] for r in res["runs"]] == [0]
    assert len(res["runs"][0]["medsmile"]["pool_dice"]) == 2  # seed 0's rounds 0 and 1, scored
    assert "#### busi (seeds [0] of [0, 1], unfinished, pool" in (out / "busi.md").read_text()
    assert not (out / "results.md").exists()  # the invocation's summary only when it completes

    # the restart scores only seed 1: seed 0 comes back from its record, neither rerun nor rescored
    def only_seed_1(profile, out_dir, data_root, split, overrides):
        assert overrides["seed"] == 1, "seed 0 was run again"
        return run_medsmile(profile, out_dir, data_root, split, overrides)

    monkeypatch.setattr(paper, "run_medsmile", only_seed_1)
    restart = [
        "--profile", "smoke", "--dataset", "busi", "--seeds", "0", "1", "--variants", "medsmile",
        "--data_root", str(data_root), "--results_dir", str(results), "--set", f'encoder_weights="{tiny_encoder}"',
    ]  # fmt: skip
    paper.main(restart)
    done = json.loads((out / "busi.json").read_text())
    assert done["seeds"] == [0, 1] and "seeds_planned" not in done
    assert done["runs"][0] == res["runs"][0]
    assert done["timing"]["total_s"] > 0  # seed 0's wall time came back with its scores

    # another configuration is another key: the record is not taken for it
    record = json.loads((out / "busi" / "seed0" / "record.json").read_text())
    assert paper.read_seed_record(str(out / "busi" / "seed0" / "record.json"), record["key"])["run"] == res["runs"][0]
    other = paper.record_key({**record["key"]["config"], "num_rounds": 2}, 0, record["key"]["split"], ["medsmile"])
    assert paper.read_seed_record(str(out / "busi" / "seed0" / "record.json"), other) is None


@pytest.mark.slow
def test_a_killed_benchmark_stops_the_run_it_waits_for():
    script = (
        "from benchmarks.paper import stop_runs_on_sigterm; import subprocess; stop_runs_on_sigterm(); "
        "subprocess.run(['sleep', '60'])"
    )
    bench = subprocess.Popen([sys.executable, "-c", script], cwd=paper.REPO)
    children = Path(f"/proc/{bench.pid}/task/{bench.pid}/children")
    deadline = time.time() + 60

    def stand_in_run() -> int | None:
        """The pid of the ``sleep`` child; imports may start short-lived children of their own before it."""
        for pid in children.read_text().split():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep":
                    return int(pid)
            except FileNotFoundError:  # it ended between the two reads
                continue
        return None

    while (run_pid := stand_in_run()) is None:  # wait for the child run to start
        assert bench.poll() is None and time.time() < deadline, "the stand-in run never started"
        time.sleep(0.2)
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=30) == 128 + signal.SIGTERM
    assert not os.path.exists(f"/proc/{run_pid}"), "the run outlived the benchmark"


@pytest.mark.slow
def test_one_round_ablation_is_scored_from_the_medsmile_network(tiny_encoder, tmp_path):
    """The no-KNN row reuses the medsmile run: with refine off (the default) it is that run; with refine on and one
    round it is the same network (the replay test below covers that case)."""
    data_root = fake_data_root(tmp_path / "data")
    results = tmp_path / "results"
    paper.main(
        [
            "--profile", "smoke", "--dataset", "busi", "--seeds", "0", "--variants", "medsmile", "no_knn",
            "--reference", "suggested", "--data_root", str(data_root), "--results_dir", str(results),
            "--set", f'encoder_weights="{tiny_encoder}"',
        ]
    )  # fmt: skip
    out = results / f"smoke_suggested_encoder_weights-{os.path.basename(tiny_encoder)}"
    run = json.loads((out / "busi.json").read_text())["runs"][0]
    # refine is off by default, so the ablation is the medsmile run itself
    assert run["no_knn"]["derived_from_medsmile"] == "refine off" and run["no_knn"]["test"] == run["medsmile"]["test"]
    assert run["no_knn"]["pool_dice"] == run["medsmile"]["pool_dice"]
    assert not (out / "busi" / "seed0" / "no_knn").exists()  # no second training run
    # the suggested reference is the top-ranked image of `run suggest` with a non-empty mask (all blobs are)
    ranking = (out / "busi" / "seed0" / "suggest" / "suggestions" / "ranking.csv").read_text().splitlines()
    top = ranking[1].split(",")[1]
    assert run["reference"] == f"busi/{os.path.splitext(os.path.basename(top))[0]}"
    assert run["reference_choice"] == "suggested"
    assert "Labelled reference (suggested)" in (out / "results.md").read_text()


@pytest.mark.slow
def test_refinement_replay_reproduces_the_round_it_replays(tiny_encoder, tmp_path):
    """Replayed with the run's own q and K, the refinement gives the pool Dice the round wrote; q = 1 gives the
    unrefined labels the one-round no-KNN row scores."""
    from benchmarks import refinement_replay

    data_root = fake_data_root(tmp_path / "data")
    results = tmp_path / "results"
    paper.main(
        [
            "--profile", "smoke", "--dataset", "busi", "--seeds", "0", "--variants", "medsmile", "no_knn",
            "--data_root", str(data_root), "--results_dir", str(results),
            "--set", f'encoder_weights="{tiny_encoder}"', "refine=true",
        ]
    )  # fmt: skip
    out = results / f"smoke_encoder_weights-{os.path.basename(tiny_encoder)}_refine-True"
    run = json.loads((out / "busi.json").read_text())["runs"][0]
    replayed = refinement_replay.replay(str(out / "busi" / "seed0" / "medsmile"), 1, (0.5, 1.0), (5,))
    assert replayed["grid"]["q=0.5 K=5"]["pool_dice"] == pytest.approx(run["medsmile"]["pool_dice"][1], abs=1e-6)
    assert replayed["grid"]["q=1.0 K=0"]["pool_dice"] == pytest.approx(run["no_knn"]["pool_dice"][1], abs=1e-6)
    assert replayed["grid"]["q=1.0 K=0"]["refined"] == 0 and replayed["grid"]["q=0.5 K=5"]["refined"] == 2
    assert refinement_replay.spearman(np.array([3.0, 1.0, 2.0]), np.array([0.1, 0.3, 0.2])) == pytest.approx(-1.0)


def test_set_values_are_json_or_plain_text():
    from benchmarks.paper import set_value

    assert set_value("5e-4") == 5e-4
    assert set_value("false") is False
    assert set_value("null") is None
    assert set_value("[-1]") == [-1]
    assert set_value('"strong"') == "strong"
    assert set_value("strong") == "strong"  # not JSON: the text itself, as a shell user would type it


def test_table_of_a_ceiling_only_invocation():
    """``--variants supervised`` alone: the ceiling row without a recovery, and no MedSMILE timing line."""
    res = {
        "seeds": [0],
        "pool_size": 3,
        "rounds": 1,
        "test_subsets": ["busi"],
        "runs": [{"seed": 0, "reference": "busi/case0", "round0_test": {"busi": {"dice": 0.25}}}],
        "supervised": {"test": {"busi": {"dice": 0.5}}},
    }
    table = paper.markdown({"busi": res}, "smoke", "cmd")
    assert "| fully supervised (same net, budget) | busi | 0.500 | recovery of final one-label Dice: - |" in table
    assert "Wall time" not in table and "Labelled reference (random): seed 0: busi/case0." in table
    res["runs"][0]["medsmile"] = {"test": [{"busi": {"dice": 0.4}}], "pool_dice": [0.3, 0.35]}
    assert "recovery of final one-label Dice: 0.800 |" in paper.markdown({"busi": res}, "smoke", "cmd")


def test_round0_test_scores_with_the_probe_the_run_saved(tiny_encoder, tmp_path):
    import torch

    from scripts.image_io import read_label
    from scripts.metrics import segmentation_scores, summarize

    data_root = fake_data_root(tmp_path / "data")
    split = paper.choose_split(str(data_root), "busi", 0, None, None)
    cfg = {
        "encoder_weights": tiny_encoder,
        "feature_image_size": 56,
        "feature_layers": [-1],
        "flip_average": False,
        "round0_classifier": "linear_probe",
    }
    truths = [
        read_label(paper.mask_path(str(data_root), "busi", stem), num_classes=2) for stem in split["tests"]["busi"]
    ]
    expected = summarize([segmentation_scores(np.ones_like(t), t, 2) for t in truths], 2)["mean_dice"]
    (tmp_path / "run" / "round_0").mkdir(parents=True)
    for bias, dice in (([0.0, 50.0], expected), ([50.0, 0.0], 0.0)):  # a probe that calls every pixel lesion / none
        state = {"weight": torch.zeros(2, 32), "bias": torch.tensor(bias)}
        torch.save(state, tmp_path / "run" / "round_0" / "linear_probe.pt")
        result = paper.round0_test(cfg, str(data_root), split, str(tmp_path / "run"))
        assert result["busi"]["dice"] == pytest.approx(dice)


def test_round0_test_reads_the_encoder_the_run_finetuned(tiny_encoder, tmp_path, monkeypatch):
    import shutil

    data_root = fake_data_root(tmp_path / "data")
    split = paper.choose_split(str(data_root), "busi", 0, None, None)
    shutil.copytree(tiny_encoder, tmp_path / "run" / "encoder_finetuned")
    cfg = {"encoder_weights": tiny_encoder, "feature_image_size": 56, "feature_layers": [-1], "flip_average": False}
    loaded = []
    real_load = paper.load_dinov2
    monkeypatch.setattr(paper, "load_dinov2", lambda source: loaded.append(source.path) or real_load(source))
    base = paper.round0_test(cfg, str(data_root), split)
    tuned = paper.round0_test({**cfg, "finetune_encoder": True}, str(data_root), split, str(tmp_path / "run"))
    assert loaded == [tiny_encoder, str(tmp_path / "run" / "encoder_finetuned")]
    assert tuned == base  # same weights in both folders: same scores, so only the folder differs
    # scored before the run only when round 0 needs nothing the run makes
    assert not paper.needs_run(cfg) and not paper.needs_run({**cfg, "round0_classifier": "prototypes"})
    assert paper.needs_run({**cfg, "finetune_encoder": True})
    assert paper.needs_run({**cfg, "round0_classifier": "linear_probe"})


def test_pool_labels_of_a_pool_with_empty_truth_get_presence_rows(tmp_path):
    """Round 0 of a hand-made run: case0 (lesion, found exactly), case1 (empty truth, predicted empty), case2 (empty
    truth, foreground predicted), case3 (lesion, nothing predicted)."""
    root = tmp_path / "data"
    (root / "busi" / "masks").mkdir(parents=True)
    lesion = np.zeros((4, 4), dtype=np.uint8)
    lesion[1:3, 1:3] = 255
    empty = np.zeros((4, 4), dtype=np.uint8)
    labels = tmp_path / "run" / "round_0" / "labels"
    labels.mkdir(parents=True)
    files = {}
    for stem, truth, pred in (("case0", lesion, lesion), ("case1", empty, empty), ("case2", empty, lesion),
                              ("case3", lesion, empty)):  # fmt: skip
        Image.fromarray(truth).save(root / "busi" / "masks" / f"{stem}.png")
        Image.fromarray(pred // 255).save(labels / f"{stem}.png")
        files[f"busi/images/{stem}"] = f"labels/{stem}.png"
    (tmp_path / "run" / "round_0" / "round.json").write_text(json.dumps({"label_files": files}))
    presence = []
    assert paper.pool_label_dice(str(tmp_path / "run"), str(root), presence) == [pytest.approx(0.5)]  # 1, 1, 0, 0
    assert presence[0]["nonempty_dice"] == 0.5 and presence[0]["num_empty_truth"] == 2
    assert presence[0]["specificity"] == 0.5 and presence[0]["sensitivity"] == 0.5
    res = {
        "seeds": [0],
        "pool_size": 4,
        "rounds": 0,
        "test_subsets": ["busi"],
        "runs": [
            {
                "seed": 0,
                "reference": "busi/ref",
                "round0_test": {"busi": {"dice": 0.25}},
                "medsmile": {"test": [], "pool_dice": [0.5], "pool_presence": presence},
            }
        ],
    }
    table = paper.markdown({"busi": res}, "smoke", "cmd")
    assert "| medsmile pool labels: empty truth predicted empty | pool | 0.500 |" in table
    assert "| medsmile pool labels: Dice, truth not empty | pool | 0.500 |" in table
    assert "counts as a true negative in specificity" in table
    del res["runs"][0]["medsmile"]["pool_presence"]  # a record from before these rows: none, and no error
    assert "pool labels:" not in paper.markdown({"busi": res}, "smoke", "cmd")
