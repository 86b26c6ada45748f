"""The paper's protocol on real data: one-label MedSMILE per round, the no-KNN ablation, the fully supervised
ceiling with the same network and budget, recovery, and wall time / memory; mean and std over reference seeds.

    python -m benchmarks.paper --profile cpu-quick --dataset polyp --seeds 0 1 2

Profiles are config override files in ``bundle/configs/profiles/`` (merged over medsmile.json the MONAI way); their
``benchmark`` key holds the pool and test sizes. Results land in ``benchmarks/results/<tag>/`` as JSON and Markdown,
where the committed tables live (the run folders ``<dataset>/seed<S>/`` below them are git-ignored). Each
seed's scores are kept in ``<dataset>/seed<S>/record.json``: seeds run side by side (one ``--seeds S`` process each)
are gathered by one more invocation over all of them, which reuses the records of the same configuration.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SimpleInferer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundle")
RESULTS = os.path.join(REPO, "benchmarks", "results")  # tables committed; run folders below <tag>/ git-ignored
sys.path.insert(0, BUNDLE)

from scripts.atomic_files import write_json_atomic
from scripts.distributed import local_device
from scripts.encoder import load_dinov2, resolve_encoder
from scripts.features import dinov2_features
from scripts.image_io import read_case, read_label
from scripts.inferers import DEFAULT_FLIPS, FlipAveragingInferer
from scripts.metrics import EMPTY_PAIR_RULE, presence_summary, segmentation_scores, summarize
from scripts.network import Mask2FormerDinov2, network_from_file
from scripts.pipeline import default_parts
from scripts.pool import resize_image, to_uint8
from scripts.prototypes import (
    LinearProbe,
    class_prototypes,
    foreground_contrast_scores,
    prototype_scores,
    rotated_views,
    soft_labels,
)
from scripts.token_cache import TOKEN_VIEWS, fill_token_views, uncacheable_reason
from scripts.training import round_epochs, train_round

DATASETS = {
    "polyp": {"train": ["kvasir_seg", "cvc_clinicdb"], "test": ["kvasir_seg", "cvc_clinicdb"]},
    "kvasir": {"train": ["kvasir_seg"], "test": ["kvasir_seg"]},
    "isic2017": {"train": ["isic2017"], "test": ["isic2017"]},
    "busi": {"train": ["busi"], "test": ["busi"]},
}


def image_path(data_root: str, subset: str, stem: str) -> str:
    for ext in (".jpg", ".png", ".jpeg"):
        path = os.path.join(data_root, subset, "images", stem + ext)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no image for {subset}/{stem} under {data_root}")


def mask_path(data_root: str, subset: str, stem: str) -> str:
    return os.path.join(data_root, subset, "masks", stem + ".png")


def load_profile(name: str) -> dict:
    with open(os.path.join(BUNDLE, "configs", "profiles", f"{name}.json")) as f:
        return json.load(f)


def choose_split(
    data_root: str, dataset: str, seed: int, pool_size: int, test_size: int | None, empty_references: int = 0
) -> dict:
    """Seeded reference (a train image whose mask is not empty), pool (train subsample) and test lists.
    ``empty_references``: that many more train images whose mask IS empty, labelled "nothing here" (K-shot), taken
    from outside the pool in the same seeded order, so that the pool and reference stay those of the run without."""
    with open(os.path.join(data_root, "splits.json")) as f:
        splits = json.load(f)
    spec = DATASETS[dataset]
    train = [(s, stem) for s in spec["train"] for stem in splits[s]["train"]]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    reference = None
    for i in order:
        subset, stem = train[i]
        if read_label(mask_path(data_root, subset, stem), num_classes=2).any():
            reference = (subset, stem)
            break
    rest = [train[i] for i in order if train[i] != reference]
    pool = rest[:pool_size] if pool_size else rest
    tests = {}
    for subset in spec["test"]:
        stems = splits[subset]["test"]
        tests[subset] = stems[:test_size] if test_size else stems
    split = {"reference": reference, "pool": pool, "tests": tests}
    if empty_references:  # only then a key: the records of runs without stay valid
        outside = rest[len(pool) :]
        empty = [c for c in outside if not read_label(mask_path(data_root, *c), num_classes=2).any()]
        if len(empty) < empty_references:
            raise ValueError(
                f"{dataset}: {empty_references} empty references asked for, but only {len(empty)} train images "
                "outside the pool have an empty mask"
            )
        split["empty_references"] = empty[:empty_references]
    return split


def suggested_split(split: dict, data_root: str, profile: str, out_dir: str, seed: int, overrides: dict) -> dict:
    """The same population of images as ``split`` (its reference + pool), but the reference is the top image of
    ``monai.bundle run suggest`` (issue 8) whose ground-truth mask is not empty, as a user would pick it."""
    population = [split["reference"], *split["pool"]]
    os.makedirs(out_dir, exist_ok=True)
    datalist = os.path.join(out_dir, "datalist.json")
    write_datalist(datalist, data_root, population)
    configs = f"['configs/medsmile.json','configs/profiles/{profile}.json']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "suggest", "--config_file", configs, "--datalist", datalist]
    cmd += ["--dataset_dir", os.path.abspath(data_root), "--output_dir", out_dir, "--seed", str(seed)]
    for key, value in overrides.items():
        cmd += [f"--{key}", cli_value(value)]
    with open(os.path.join(out_dir, "log.txt"), "w") as log:
        subprocess.run(cmd, cwd=BUNDLE, check=True, stdout=log, stderr=subprocess.STDOUT)
    by_path = {os.path.realpath(image_path(data_root, *case)): case for case in population}
    with open(os.path.join(out_dir, "suggestions", "ranking.csv"), newline="") as f:
        ranked = [by_path[os.path.realpath(row["source"])] for row in csv.DictReader(f)]
    reference = next(c for c in ranked if read_label(mask_path(data_root, *c), num_classes=2).any())
    return {**split, "reference": reference, "pool": [c for c in population if c != reference]}


def cli_value(value) -> str:
    """A setting as ``monai.bundle run`` reads it: None as "null", since it drops ``--key None`` and keeps the
    config's value (the pipeline reads "null" as None)."""
    return "null" if value is None else str(value)


def write_datalist(path: str, data_root: str, pool: list) -> None:
    entries = [{"image": os.path.relpath(image_path(data_root, s, stem), data_root)} for s, stem in pool]
    with open(path, "w") as f:
        json.dump({"unlabeled": entries}, f, indent=1)


def run_medsmile(profile: str, out_dir: str, data_root: str, split: dict, overrides: dict) -> dict:
    """One pipeline run as the user would start it (a subprocess of monai.bundle), returns its summary."""
    os.makedirs(out_dir, exist_ok=True)
    datalist = os.path.join(out_dir, "datalist.json")
    write_datalist(datalist, data_root, split["pool"])
    references = [split["reference"], *split.get("empty_references", [])]
    images, labels = [image_path(data_root, *c) for c in references], [mask_path(data_root, *c) for c in references]
    configs = f"['configs/medsmile.json','configs/profiles/{profile}.json']"
    args = {
        "datalist": datalist,
        "dataset_dir": os.path.abspath(data_root),
        "reference_image": images if len(images) > 1 else images[0],  # a list: K-shot, the empty ones "nothing here"
        "reference_label": labels if len(labels) > 1 else labels[0],
        "output_dir": os.path.join(out_dir, "run"),
        "model_path": os.path.join(out_dir, "models", "model.pt"),
        **overrides,
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs]
    for key, value in args.items():
        cmd += [f"--{key}", cli_value(value)]
    with open(os.path.join(out_dir, "command.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n")
    with open(os.path.join(out_dir, "log.txt"), "w") as log:
        subprocess.run(cmd, cwd=BUNDLE, check=True, stdout=log, stderr=subprocess.STDOUT)
    with open(os.path.join(out_dir, "run", "summary.json")) as f:
        return json.load(f)


def pool_label_dice(run_dir: str, data_root: str, presence: list | None = None) -> list[float]:
    """Pseudo-label Dice of every finished round against the ground truth of the pool; ``presence`` (a list) also
    receives each round's ``scripts.metrics.presence_summary`` (Dice on images whose truth is not empty, image-level
    specificity and sensitivity: BUSI's pool holds normal scans with empty masks)."""
    out = []
    r = 0
    while os.path.isfile(os.path.join(run_dir, f"round_{r}", "round.json")):
        with open(os.path.join(run_dir, f"round_{r}", "round.json")) as f:
            files = json.load(f)["label_files"]
        scores, present = [], []
        for name, rel in files.items():
            subset, _, stem = name.split("/")  # "<subset>/images/<stem>"
            pred = read_label(os.path.join(run_dir, f"round_{r}", rel), num_classes=2)
            truth = read_label(mask_path(data_root, subset, stem), num_classes=2)
            scores.append(segmentation_scores(pred, truth, 2))
            present.append((bool(truth.any()), bool(pred.any())))
        out.append(summarize(scores, 2)["mean_dice"])
        if presence is not None:
            presence.append({k: v for k, v in presence_summary(scores, present).items() if k != "empty_pair_rule"})
        r += 1
    return out


@torch.no_grad()
def predict_scores(network: torch.nn.Module, data_root: str, cases: list, image_size: int, flips=None) -> dict:
    """mDice / mIoU of a network on (subset, stem) cases: prediction at image_size, upsampled to the native size;
    ``flips`` (e.g. DEFAULT_FLIPS): averaged with those mirrored views by FlipAveragingInferer, as inference.json
    with ``flip_average`` true; None: one view."""
    network.eval()
    infer = FlipAveragingInferer(flips) if flips else SimpleInferer()
    scores = []
    for subset, stem in cases:
        _, slices = read_case(image_path(data_root, subset, stem))
        probs = infer(resize_image(slices[0], image_size)[None], network).softmax(1)
        probs = F.interpolate(probs, size=slices[0].shape[1:], mode="bilinear", align_corners=False)
        scores.append(
            segmentation_scores(
                probs.argmax(1)[0].numpy(), read_label(mask_path(data_root, subset, stem), num_classes=2), 2
            )
        )
    s = summarize(scores, 2)
    return {"dice": s["mean_dice"], "iou": s["mean_iou"]}


def predict_test(network: torch.nn.Module, data_root: str, tests: dict, image_size: int, flips=None) -> dict:
    """predict_scores on each test split."""
    return {
        subset: predict_scores(network, data_root, [(subset, s) for s in stems], image_size, flips)
        for subset, stems in tests.items()
    }


def unrefined_pool_dice(out_dir: str, data_root: str, split: dict, image_size: int) -> float:
    """Pool Dice of the last round's network predictions BEFORE KNN refinement. With one round the no-KNN ablation
    trains the very same network on the same round-0 labels, so this is its round-1 pool Dice without a second run."""
    network = network_from_file(os.path.join(out_dir, "models", "network.json"))
    network.load_state_dict(torch.load(os.path.join(out_dir, "run", "round_1", "model.pt"), weights_only=True))
    return predict_scores(network, data_root, split["pool"], image_size)["dice"]


def needs_run(cfg: dict) -> bool:
    """Whether round 0 on the test images can only be scored after the MedSMILE run: it fits a linear probe, or it
    fine-tunes the encoder first."""
    return bool(cfg.get("finetune_encoder")) or cfg.get("round0_classifier", "prototypes") == "linear_probe"


@torch.no_grad()
def round0_test(cfg: dict, data_root: str, split: dict, run_dir: str | None = None) -> dict:
    """Round 0 applied to the test images (no training), with the run's features: the reference's prototypes, or
    with ``round0_classifier`` "linear_probe" the probe the run fitted (``run_dir``/round_0/linear_probe.pt). With
    ``finetune_encoder`` the features come from the encoder the run fine-tuned (``run_dir``/encoder_finetuned), the
    one its round 0 read the pool with."""
    feature_size = cfg["feature_image_size"]
    options = {"layers": cfg["feature_layers"], "flip_average": cfg["flip_average"]}
    source = os.path.join(run_dir, "encoder_finetuned") if cfg.get("finetune_encoder") else cfg["encoder_weights"]
    encoder = load_dinov2(resolve_encoder(source)).eval()
    subset, stem = split["reference"]
    _, ref = read_case(image_path(data_root, subset, stem))
    ref_label = torch.as_tensor(read_label(mask_path(data_root, subset, stem), num_classes=2)).long()
    views = (
        rotated_views(torch.as_tensor(ref[0]), ref_label) if cfg.get("reference_rotations") else [(ref[0], ref_label)]
    )
    patches = [dinov2_features(encoder, resize_image(image, feature_size)[None], **options)[0][0] for image, _ in views]
    protos = class_prototypes(patches, [label for _, label in views], 2)
    classifier = lambda feats: prototype_scores(feats, protos)
    if cfg.get("round0_classifier", "prototypes") == "linear_probe":
        state = torch.load(os.path.join(run_dir, "round_0", "linear_probe.pt"), weights_only=True)
        classifier = LinearProbe(state["weight"], state["bias"])
    result = {}
    for test_subset, stems in split["tests"].items():
        scores = []
        for test_stem in stems:
            _, slices = read_case(image_path(data_root, test_subset, test_stem))
            feats, _ = dinov2_features(encoder, resize_image(slices[0], feature_size)[None], **options)
            cosine = foreground_contrast_scores(classifier(feats), cfg.get("foreground_contrast"))
            pred = soft_labels(cosine, slices[0].shape[1:]).argmax(1)[0]
            truth = read_label(mask_path(data_root, test_subset, test_stem), num_classes=2)
            scores.append(segmentation_scores(pred.numpy(), truth, 2))
        s = summarize(scores, 2)
        result[test_subset] = {"dice": s["mean_dice"], "iou": s["mean_iou"]}
    return result


def test_per_round(
    out_dir: str, data_root: str, split: dict, image_size: int, flip_average: bool = False
) -> tuple[list[dict], list[dict]]:
    """Single-view test scores of every round's network; with ``flip_average`` also the flip-averaged ones (else [])."""
    network = network_from_file(os.path.join(out_dir, "models", "network.json"))
    rows, flipped = [], []
    r = 1
    while os.path.isfile(os.path.join(out_dir, "run", f"round_{r}", "model.pt")):
        network.load_state_dict(torch.load(os.path.join(out_dir, "run", f"round_{r}", "model.pt"), weights_only=True))
        rows.append(predict_test(network, data_root, split["tests"], image_size))
        if flip_average:
            flipped.append(predict_test(network, data_root, split["tests"], image_size, DEFAULT_FLIPS))
        r += 1
    return rows, flipped


def set_value(text: str):
    """A ``--set`` value: JSON (3, 5e-4, false, null, [-1]), or the text itself (augmentation=strong)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def supervised_ceiling(cfg: dict, data_root: str, split: dict, out_dir: str) -> dict:
    """The same network, image size and budget (epochs of one round) trained on the pool's ground truth, on a GPU
    when there is one (as the pipeline's default device)."""
    torch.manual_seed(0)
    device = local_device()
    source = resolve_encoder(cfg["encoder_weights"])
    size = cfg["image_size"]
    items = []
    for i, (subset, stem) in enumerate(split["pool"] + [split["reference"]]):
        _, slices = read_case(image_path(data_root, subset, stem))
        label = torch.as_tensor(read_label(mask_path(data_root, subset, stem), num_classes=2), dtype=torch.float32)[
            None, None
        ]
        label = F.interpolate(label, size=(size, size), mode="nearest")[0].to(torch.uint8)
        items.append({"image": to_uint8(resize_image(slices[0], size)), "label": label, "index": i})
    network = Mask2FormerDinov2(
        cfg["num_classes"],
        source.path,
        source.path,
        num_queries=cfg["num_queries"],
        decoder_layers=cfg["decoder_layers"],
        hidden_dim=cfg["hidden_dim"],
        pixel_decoder_layers=cfg["pixel_decoder_layers"],
        feature_pyramid=cfg.get("feature_pyramid", "project_first"),
        mask_loss_points=cfg.get("mask_loss_points", 12544),
    ).to(device)
    t0 = time.time()
    transforms = default_parts(cfg, keys=("train_transforms",))["train_transforms"]
    cached = (
        cfg.get("cache_backbone_tokens", True) and cfg.get("freeze_backbone") and not uncacheable_reason(transforms)
    )
    if cached:  # as the pipeline's rounds: the head trains on the frozen backbone's cached token views
        grid = size // network.patch_size
        views = torch.zeros(len(items), len(TOKEN_VIEWS), network.pyramid.hidden_size, grid, grid, dtype=torch.float16)
        fill_token_views(network, torch.stack([it["image"] for it in items]), views, bf16=cfg.get("backbone_bf16"))
        items = [{**item, "image": views[i]} for i, item in enumerate(items)]
    train_round(
        network,
        items,
        round_epochs(len(items), cfg["batch_size"], cfg["epochs"], cfg.get("min_iterations", 0)),
        cfg["batch_size"],
        cfg["learning_rate"],
        cfg["weight_decay"],
        cfg["grad_clip_norm"],
        device,
        os.path.join(out_dir, "checkpoints"),
        loss=cfg["loss"],
        freeze_backbone=cfg.get("freeze_backbone", False),
        head_learning_rate=cfg.get("head_learning_rate"),
        transforms=transforms,
        token_views=cached,
    )
    train_s = time.time() - t0
    return {"test": predict_test(network.cpu(), data_root, split["tests"], size), "train_s": train_s}


def effective_config(profile: str) -> dict:
    with open(os.path.join(BUNDLE, "configs", "medsmile.json")) as f:
        cfg = json.load(f)
    cfg.update({k: v for k, v in load_profile(profile).items() if k != "benchmark"})
    return cfg


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def presence_rows(variant: str, res: dict) -> list[str]:
    """Pool-label rows for a pool that holds images with empty truth: Dice on the others, and image-level
    specificity / sensitivity per round; none for runs recorded before these were kept, or without empty truth."""
    per_run = [run[variant].get("pool_presence") for run in res["runs"]]
    if not all(per_run) or not any(p.get("num_empty_truth") for runs in per_run for p in runs):
        return []
    rows = []
    for key, name in (
        ("nonempty_dice", "Dice, truth not empty"),
        ("specificity", "empty truth predicted empty"),
        ("sensitivity", "non-empty truth predicted non-empty"),
    ):
        cells = [mean_std([runs[r][key] for runs in per_run]) for r in range(res["rounds"] + 1)]
        rows.append(f"| {variant} pool labels: {name} | pool | " + " | ".join(cells) + " |")
    return rows


def markdown(results: dict, profile: str, command: str) -> str:
    lines = [f"### Profile `{profile}`", "", f"Command: `{command}`", ""]
    for dataset, res in results.items():
        seeds = f"seeds {res['seeds']}" + (f" of {res['seeds_planned']}, unfinished" if "seeds_planned" in res else "")
        lines += [f"#### {dataset} ({seeds}, pool {res['pool_size']} images)", ""]
        lines += [
            "| variant | test split | round 0 | " + " | ".join(f"round {r}" for r in range(1, res["rounds"] + 1)) + " |"
        ]
        lines += ["|---" * (3 + res["rounds"]) + "|"]
        notes = []
        for variant in ("medsmile", "no_knn"):
            if variant not in res["runs"][0]:
                continue
            for subset in res["test_subsets"]:
                r0 = [run["round0_test"][subset]["dice"] for run in res["runs"]]
                cells = [
                    mean_std([run[variant]["test"][r][subset]["dice"] for run in res["runs"]])
                    for r in range(res["rounds"])
                ]
                lines.append(f"| {variant} test Dice | {subset} | {mean_std(r0)} | " + " | ".join(cells) + " |")
            pool = [mean_std([run[variant]["pool_dice"][r] for run in res["runs"]]) for r in range(res["rounds"] + 1)]
            lines.append(f"| {variant} pool pseudo-label Dice | pool | " + " | ".join(pool) + " |")
            lines += presence_rows(variant, res)
        derived = res["runs"][0].get("no_knn", {}).get("derived_from_medsmile")
        if derived == "refine off":
            notes.append("no_knn: the medsmile run itself, which already ran without KNN refinement (refine false).")
        elif derived:
            notes.append(
                "no_knn with one round: the same network as medsmile (both train on the round-0 labels), so its test "
                "Dice is medsmile's; its round-1 pool Dice is that network's own predictions, before KNN refinement."
            )
        if "supervised" in res:
            for subset in res["test_subsets"]:
                sup = res["supervised"]["test"][subset]["dice"]
                final = [run["medsmile"]["test"][-1][subset]["dice"] for run in res["runs"] if "medsmile" in run]
                recovery = mean_std([f / sup for f in final]) if sup > 0 and final else "-"
                lines.append(
                    f"| fully supervised (same net, budget) | {subset} | {sup:.3f} | recovery of final one-label Dice: "
                    f"{recovery} |"
                )
        if any(row.startswith("| medsmile pool labels") for row in lines):
            notes.append(f"Pool labels with empty truth (BUSI's normal scans): {EMPTY_PAIR_RULE}.")
        refs = ", ".join(f"seed {run['seed']}: {run['reference']}" for run in res["runs"])
        choice = res["runs"][0].get("reference_choice", "random")
        notes.append(f"Labelled reference ({choice}): {refs}.")
        empties = "; ".join(
            f"seed {run['seed']}: {', '.join(run['empty_references'])}"
            for run in res["runs"]
            if "empty_references" in run
        )
        if empties:
            notes.append(f'References labelled "nothing here" (empty masks, K-shot): {empties}.')
        lines += [""] + notes + [""]
        if "timing" in res:  # absent when only the ceiling ran
            t = res["timing"]
            lines += [
                (
                    f"Wall time per MedSMILE run (mean): features {t['features_s']:.0f} s, training {t['train_s']:.0f} "
                    f"s, inference + refinement {t['predict_s']:.0f} s, total {t['total_s']:.0f} s; "
                    f"{t['images_per_s']:.2f} pool images/s over the whole run; peak RSS {t['peak_rss_mb']:.0f} MB."
                ),
                "",
            ]
    return "\n".join(lines)


def stop_runs_on_sigterm() -> None:
    """Make `kill` of a benchmark stop its `monai.bundle run` child too: SIGTERM becomes SystemExit, on which
    subprocess.run kills the child it waits for (a bare SIGTERM leaves that child training, orphaned)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def dataset_result(runs: list[dict], bench: dict, cfg: dict, dataset: str) -> dict:
    """The per-dataset record of `main`, over the seeds in `runs`."""
    return {
        "seeds": [run["seed"] for run in runs],
        "pool_size": bench.get("pool_size"),
        "test_size": bench.get("test_size"),
        "rounds": cfg["num_rounds"],
        "test_subsets": list(DATASETS[dataset]["test"]),
        "runs": runs,
        "config": cfg,
    }


def record_key(cfg: dict, seed: int, split: dict, variants: list[str]) -> dict:
    """What a seed's scores depend on (besides the code): the merged config, the seed, the images, the variants."""
    scored = sorted(v for v in variants if v != "supervised")
    return json.loads(json.dumps({"config": cfg, "seed": seed, "split": split, "variants": scored}, default=str))


def read_seed_record(path: str, key: dict) -> dict | None:
    """``{"run", "summary"}`` saved by an earlier invocation for the same key, else None: a benchmark that gathers
    seeds run in separate processes (or restarted) does not rescore them."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    return saved if saved.get("key") == key else None


def write_seed_record(path: str, key: dict, run: dict, summary: dict | None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, {"key": key, "run": run, "summary": summary})


def write_dataset_result(out_root: str, dataset: str, res: dict, tag: str, command: str) -> None:
    """`<dataset>.json` (with the command) and `<dataset>.md`, one pair per dataset so that later invocations leave
    it alone."""
    with open(os.path.join(out_root, f"{dataset}.json"), "w") as f:
        json.dump({**res, "command": command}, f, indent=1, default=str)
    with open(os.path.join(out_root, f"{dataset}.md"), "w") as f:
        f.write(markdown({dataset: res}, tag, command) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu-quick")
    parser.add_argument("--dataset", nargs="+", default=["polyp"], choices=sorted(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data_root", default=os.path.join(REPO, "..", "shared", "data"))
    parser.add_argument("--results_dir", default=RESULTS)
    parser.add_argument("--variants", nargs="+", default=["medsmile", "no_knn", "supervised"])
    parser.add_argument(
        "--reference",
        default="random",
        choices=["random", "suggested"],
        help="random: a seeded train image (the paper); suggested: the top of `run suggest` on the same images",
    )
    parser.add_argument("--pool_size", type=int, help="pool images per run, instead of the profile's benchmark value")
    parser.add_argument("--test_size", type=int, help="images per test split, instead of the profile's benchmark value")
    parser.add_argument(
        "--empty_references",
        type=int,
        default=0,
        help="K-shot: also give this many train images with an empty mask as 'nothing here' references (issue 36)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        action="extend",  # --set a=1 --set b=2 keeps both (the default "store" kept only the last)
        default=[],
        help="extra overrides key=value (JSON values; other text is taken as a string)",
    )
    args = parser.parse_args(argv)
    stop_runs_on_sigterm()
    args.data_root = os.path.abspath(args.data_root)  # the runs start in bundle/, so relative paths would break
    profile = load_profile(args.profile)
    bench = dict(profile.get("benchmark", {}))
    sizes = {k: getattr(args, k) for k in ("pool_size", "test_size") if getattr(args, k) is not None}
    bench.update(sizes)
    extra = {k: set_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = {**effective_config(args.profile), **extra}
    tag = (
        args.profile
        + ("_suggested" if args.reference == "suggested" else "")
        + "".join(f"_{k.split('_')[0]}-{v}" for k, v in sizes.items())
        + (f"_empty-{args.empty_references}" if args.empty_references else "")
        + "".join(f"_{k}-{os.path.basename(str(v))}" for k, v in extra.items())
    )
    out_root = os.path.join(args.results_dir, tag)
    os.makedirs(out_root, exist_ok=True)
    command = "python -m benchmarks.paper " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {}
    for dataset in args.dataset:
        runs, timings = [], []
        for seed in args.seeds:
            split = choose_split(
                args.data_root, dataset, seed, bench.get("pool_size"), bench.get("test_size"), args.empty_references
            )
            if args.reference == "suggested":
                split = suggested_split(
                    split,
                    args.data_root,
                    args.profile,
                    os.path.join(out_root, dataset, f"seed{seed}", "suggest"),
                    seed,
                    extra,
                )
            seed_dir = os.path.join(out_root, dataset, f"seed{seed}")
            record_file, key = os.path.join(seed_dir, "record.json"), record_key(cfg, seed, split, args.variants)
            saved = read_seed_record(record_file, key)
            if saved is not None:
                print(f"seed {seed}: scores reused from {record_file}", flush=True)
                runs.append(saved["run"])
                timings += [saved["summary"]] if saved["summary"] else []
                continue
            run = {"seed": seed, "reference": "/".join(split["reference"]), "reference_choice": args.reference}
            if "empty_references" in split:
                run["empty_references"] = ["/".join(c) for c in split["empty_references"]]
            medsmile_summary = None
            medsmile_dir = os.path.join(seed_dir, "medsmile")
            if not needs_run(cfg):
                run["round0_test"] = round0_test(cfg, args.data_root, split)
            for variant in ("medsmile", "no_knn"):
                if variant not in args.variants:
                    continue
                if variant == "no_knn" and not cfg["refine"] and "medsmile" in run:
                    run[variant] = {**run["medsmile"], "derived_from_medsmile": "refine off"}  # the same run
                    continue
                if variant == "no_knn" and cfg["num_rounds"] == 1 and "medsmile" in run:
                    unrefined = unrefined_pool_dice(medsmile_dir, args.data_root, split, cfg["image_size"])
                    run[variant] = {
                        "pool_dice": [run["medsmile"]["pool_dice"][0], unrefined],
                        "test": run["medsmile"]["test"],
                        "derived_from_medsmile": True,
                    }
                    continue
                out_dir = os.path.join(out_root, dataset, f"seed{seed}", variant)
                overrides = {"seed": seed, **extra, **({"refine": False} if variant == "no_knn" else {})}
                summary = run_medsmile(args.profile, out_dir, args.data_root, split, overrides)
                flips = cfg.get("flip_average_predictions", False)
                test, test_flipped = test_per_round(out_dir, args.data_root, split, cfg["image_size"], flips)
                presence = []
                run[variant] = {
                    "pool_dice": pool_label_dice(os.path.join(out_dir, "run"), args.data_root, presence),
                    "pool_presence": presence,
                    "test": test,
                    **({"test_flip_average": test_flipped} if flips else {}),
                    "summary_rounds": summary["rounds"],
                }
                if variant == "medsmile":
                    timings.append(summary)
                    medsmile_summary = summary
            if "round0_test" not in run:  # round 0 as the medsmile run made it (its probe, its fine-tuned encoder)
                run["round0_test"] = round0_test(cfg, args.data_root, split, os.path.join(medsmile_dir, "run"))
            runs.append(run)
            write_seed_record(record_file, key, run, medsmile_summary)
            print(json.dumps(run, default=str)[:2000], flush=True)
            if len(runs) < len(args.seeds):  # an interrupted benchmark keeps the seeds it finished
                partial = {**dataset_result(runs, bench, cfg, dataset), "seeds_planned": args.seeds}
                write_dataset_result(out_root, dataset, partial, tag, command)
        res = dataset_result(runs, bench, cfg, dataset)
        if "supervised" in args.variants:
            split = choose_split(args.data_root, dataset, args.seeds[0], bench.get("pool_size"), bench.get("test_size"))
            res["supervised"] = supervised_ceiling(
                cfg, args.data_root, split, os.path.join(out_root, dataset, "supervised")
            )
        if timings:
            rounds = [r for s in timings for r in s["rounds"]]
            total = float(np.mean([s["wall_time_s"] for s in timings]))
            res["timing"] = {
                "features_s": float(np.mean([r["timings_s"].get("features", 0) for r in rounds if r["round"] == 0])),
                "train_s": float(np.sum([r["timings_s"].get("train", 0) for r in rounds]) / len(timings)),
                "predict_s": float(np.sum([r["timings_s"].get("predict_refine", 0) for r in rounds]) / len(timings)),
                "total_s": total,
                "images_per_s": timings[0]["pool"]["images"] / total,
                "peak_rss_mb": float(max(r.get("peak_rss_mb", 0) for r in rounds)),
            }
        results[dataset] = res
        write_dataset_result(out_root, dataset, res, tag, command)
    md = markdown(results, tag, command)
    with open(os.path.join(out_root, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"benchmark peak RSS (this process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
