"""A round before and after the speed work of issue 32, side by side in one invocation, on the same pool and seed.

    python -m benchmarks.speed --data_root ../shared/data

"old" switches the four speed options back to the behaviour of bundles before 0.4.0 (every step runs the ViT,
float32 backbone, feature pyramid upsampled at the backbone width, 12544 points per mask in the set loss); "new" is
the defaults. Fused AdamW is code, not an option, so both paths have it. Each path is one `monai.bundle run` of the
cpu-quick profile with one round on the same seeded Kvasir pool and reference (benchmarks.paper's split). By default
the two runs go at the same time with one thread each, so that any other load on the machine slows both alike;
``--sequential`` runs them one after the other with every thread. Finished runs are reused, so an interrupted
benchmark resumes. Writes ``benchmarks/results/speed.json``: per-part timings of each path, ``ratio`` (new round-1
wall time / old) and ``label_dice_agreement`` (mean per-image foreground Dice between the two paths' round-1
pseudo-labels; an image both leave empty counts 1).

``--reseed`` measures what that agreement can be at best: the "new" path trained once more with the next seed (same
pool, reference and round-0 labels; only the training's random draws differ), and the Dice between its round-1 labels
and those of the "new" run, added to the existing ``--out`` file as ``reseeded`` and ``label_dice_agreement_reseeded``
(the other entries are kept as they were measured).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch

from benchmarks.paper import choose_split, run_medsmile  # first: it puts bundle/ on sys.path
from scripts.atomic_files import write_json_atomic
from scripts.image_io import read_label

# issue 32's comparison is of the paper's round (the one that runs without the token cache), in both paths
PATHS = {
    "old": {
        "cache_backbone_tokens": False,
        "backbone_bf16": False,
        "feature_pyramid": "upsample_first",
        "mask_loss_points": 12544,
        "round_training": "pseudo_labels",
    },
    "new": {"round_training": "pseudo_labels"},
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "speed.json")


def timings(summary: dict) -> dict:
    """Per-part seconds of a one-round run from its summary.json."""
    rounds = {r["round"]: r for r in summary["rounds"]}
    r1 = rounds[1]
    cache = summary.get("token_cache_s", 0.0)
    iterations = r1["training"]["iterations"]
    return {
        "features_s": rounds[0]["timings_s"]["features"],
        "token_cache_s": cache,
        "train_s": r1["timings_s"]["train"] - cache,
        "iterations": iterations,
        "train_per_iteration_s": (r1["timings_s"]["train"] - cache) / iterations,
        "predict_s": r1["timings_s"]["predict_refine"],
        "round_total_s": r1["timings_s"]["total"],
        "backbone_bf16_active": summary.get("backbone_bf16_active", False),
        "peak_rss_mb": r1.get("peak_rss_mb"),
    }


def foreground_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of the foreground (label > 0) of two label maps; 1 when both are empty."""
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def label_agreement(old_run: str, new_run: str) -> dict:
    """Mean per-image foreground Dice between the round-1 label files of two runs over the same pool."""
    old_labels = os.path.join(old_run, "round_1", "labels")
    names = sorted(
        os.path.relpath(f, old_labels) for f in glob.glob(os.path.join(old_labels, "**", "*"), recursive=True)
    )
    names = [n for n in names if os.path.isfile(os.path.join(old_labels, n))]
    old_files = [os.path.join(old_labels, n) for n in names]
    new_files = [os.path.join(new_run, "round_1", "labels", n) for n in names]
    missing = [f for f in new_files if not os.path.isfile(f)]
    if not old_files or missing:
        raise FileNotFoundError(f"round-1 labels missing: {len(old_files)} old, missing new {missing[:3]}")
    dice = [foreground_dice(read_label(a), read_label(b)) for a, b in zip(old_files, new_files, strict=True)]
    return {"mean": float(np.mean(dice)), "min": float(np.min(dice)), "images": len(dice)}


def machine() -> dict:
    model = ""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_end": os.getloadavg(),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--dataset", default="kvasir")
    parser.add_argument("--pool_size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default="cpu-quick")
    parser.add_argument("--work_dir", default=os.path.join("outputs", "speed"), help="where the two runs go")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides for both paths (JSON values)")
    parser.add_argument("--sequential", action="store_true", help="one run after the other, all threads each")
    parser.add_argument("--note", default="", help="what the JSON should say about how these runs were made")
    parser.add_argument("--reseed", action="store_true", help="only the agreement floor: 'new' again, next seed")
    args = parser.parse_args(argv)
    data_root, work = os.path.abspath(args.data_root), os.path.abspath(args.work_dir)
    common = {"num_rounds": 1, "export_torchscript": False, "seed": args.seed}
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            common[key] = json.loads(value)
        except json.JSONDecodeError:
            common[key] = value
    split = choose_split(data_root, args.dataset, args.seed, args.pool_size, None)
    given = sys.argv[1:] if argv is None else argv
    result = {"command": "python -m benchmarks.speed " + shlex.join(given), "dataset": args.dataset}
    result.update(pool_size=len(split["pool"]), reference=list(split["reference"]), profile=args.profile)
    if not args.sequential:
        os.environ["OMP_NUM_THREADS"] = "1"  # read by each run's torch; the two runs share the cores evenly

    def run(name: str) -> dict:
        t0 = time.time()
        out = os.path.join(work, name)
        overrides = {**common, **PATHS[name], "model_path": os.path.join(out, "models", "model.pt")}
        summary = run_medsmile(args.profile, out, data_root, split, overrides)
        return {"overrides": overrides, **timings(summary), "invocation_s": time.time() - t0}

    if args.reseed:
        return reseed(args, work, data_root, split, common)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1 if args.sequential else len(PATHS)) as pool:
        for name, timed in zip(PATHS, pool.map(run, PATHS), strict=True):
            result[name] = timed
            print(name, json.dumps(timed, indent=1), flush=True)
    result["mode"] = "sequential, all threads" if args.sequential else "concurrent, one thread each"
    if args.note:
        result["note"] = args.note
    result["ratio"] = result["new"]["round_total_s"] / result["old"]["round_total_s"]
    result["train_per_iteration_ratio"] = (
        result["new"]["train_per_iteration_s"] / result["old"]["train_per_iteration_s"]
    )
    result["features_ratio"] = result["new"]["features_s"] / result["old"]["features_s"]
    agreement = label_agreement(os.path.join(work, "old", "run"), os.path.join(work, "new", "run"))
    result["label_dice_agreement"] = agreement["mean"]
    result["label_dice_agreement_min"] = agreement["min"]
    result["machine"] = machine()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json_atomic(args.out, result)
    print(json.dumps({k: result[k] for k in ("ratio", "train_per_iteration_ratio", "label_dice_agreement")}))
    return result


def reseed(args, work: str, data_root: str, split: dict, common: dict) -> dict:
    """The "new" path once more with seed + 1, its round-1 labels compared with the "new" run's, merged into --out."""
    with open(args.out) as f:
        result = json.load(f)
    out = os.path.join(work, "new_reseeded")
    overrides = {**common, **PATHS["new"], "seed": common["seed"] + 1}
    overrides["model_path"] = os.path.join(out, "models", "model.pt")
    t0 = time.time()
    summary = run_medsmile(args.profile, out, data_root, split, overrides)
    result["reseeded"] = {"overrides": overrides, **timings(summary), "invocation_s": time.time() - t0}
    agreement = label_agreement(os.path.join(work, "new", "run"), os.path.join(out, "run"))
    result["label_dice_agreement_reseeded"] = agreement["mean"]
    result["label_dice_agreement_reseeded_min"] = agreement["min"]
    result["reseeded_machine"] = machine()
    write_json_atomic(args.out, result)
    print(json.dumps({k: result[k] for k in ("label_dice_agreement", "label_dice_agreement_reseeded")}))
    return result


if __name__ == "__main__":
    main()
