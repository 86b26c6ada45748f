"""Replay a finished round's KNN refinement with other settings: what the uncertainty quantile and K buy.

    python -m benchmarks.refinement_replay --runs results/head_lr/cpu-quick --datasets polyp --seeds 0 1 2

For each benchmark run (``<runs>/<dataset>/seed<s>/medsmile``, written by ``benchmarks.paper``) the round's saved
network predicts the pool again (no training), then each (q, K) refines those same predictions; pool pseudo-label
Dice (foreground, per image at the native mask size, averaged) says which setting gives the next round better
labels. q = 1 is no refinement. Also printed: how well the mean pixel entropy ranks label quality (Spearman's rho
between uncertainty and Dice; the method assumes it is strongly negative).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.paper import mask_path
from scripts.handlers import KNNRefinementHandler
from scripts.image_io import read_label
from scripts.metrics import segmentation_scores
from scripts.network import network_from_file
from scripts.pool import ImagePool, pool_sources
from scripts.training import predict_and_refine

QUANTILES = (0.5, 0.75, 0.9, 1.0)
NEIGHBOURS = (1, 5, 10, 20)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation with ordinal ranks: tied values (many images share a Dice of 0 on BUSI) get distinct ranks in
    numpy's sort order, where scipy.stats.spearmanr would average them; the reported rho values were made this way."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def replay(run_root: str, round_index: int, quantiles=QUANTILES, neighbours=NEIGHBOURS) -> dict:
    """Pool Dice of round ``round_index``'s labels for every (q, K), from the run's saved network and features."""
    run_dir = os.path.join(run_root, "run")
    with open(os.path.join(run_dir, "run_config.json")) as f:
        cfg = json.load(f)["config"]
    data_root = cfg["dataset_dir"]
    sources = pool_sources(data_root, cfg["datalist"], exclude=[cfg["reference_image"]])
    pool = ImagePool.load(sources, cfg["feature_image_size"], cfg["image_size"], dataset_root=data_root)
    if len(pool) != len(sources):
        raise ValueError(f"{run_root}: expected one 2-D image per source, got {len(pool)} images")
    truths = []
    for source in sources:
        subset = os.path.basename(os.path.dirname(os.path.dirname(source)))
        truths.append(
            read_label(mask_path(data_root, subset, os.path.splitext(os.path.basename(source))[0]), num_classes=2)
        )
    network = network_from_file(os.path.join(run_root, "models", "network.json"))
    state = torch.load(os.path.join(run_dir, f"round_{round_index}", "model.pt"), weights_only=True)
    network.load_state_dict(state)
    features = np.load(os.path.join(run_dir, "round_0", "global_features.npy"))
    predictions = predict_and_refine(
        network,
        pool.train_images,
        features,
        cfg["num_classes"],
        cfg["batch_size"],
        torch.device("cpu"),
        1.0,
        1,
        refine=False,
    )

    def dice(i: int) -> float:
        soft = F.interpolate(
            predictions.soft_label(i)[None], size=truths[i].shape, mode="bilinear", align_corners=False
        )
        return segmentation_scores(soft.argmax(1)[0].numpy(), truths[i], 2)["dice"][0]

    raw = np.array([dice(i) for i in range(len(pool))])
    out = {"raw_dice": float(raw.mean()), "rho_uncertainty_dice": spearman(predictions.uncertainty, raw), "grid": {}}
    for q in quantiles:
        for k in neighbours if q < 1 else (0,):
            predictions.refined = {}
            if q < 1:
                KNNRefinementHandler(predictions, features, q, k)()
            changed = sorted(predictions.refined)
            scores = raw.copy()
            scores[changed] = [dice(i) for i in changed]
            out["grid"][f"q={q} K={k}"] = {
                "pool_dice": float(scores.mean()),
                "refined": len(changed),
                "refined_dice_before": float(raw[changed].mean()) if changed else None,
                "refined_dice_after": float(scores[changed].mean()) if changed else None,
            }
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="a benchmarks.paper results folder, e.g. results/cpu-quick")
    parser.add_argument("--datasets", nargs="+", default=["polyp", "isic2017", "busi"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--quantiles", nargs="+", type=float, default=list(QUANTILES))
    parser.add_argument("--neighbours", nargs="+", type=int, default=list(NEIGHBOURS))
    parser.add_argument("--out", default=None, help="JSON file for the numbers (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.time()
    results = {}
    for dataset in args.datasets:
        for seed in args.seeds:
            run_root = os.path.join(args.runs, dataset, f"seed{seed}", "medsmile")
            results[f"{dataset}/seed{seed}"] = replay(run_root, args.round, args.quantiles, args.neighbours)
            print(dataset, seed, json.dumps(results[f"{dataset}/seed{seed}"])[:400], flush=True)
    lines = [
        f"### Round-{args.round} refinement replayed, pool pseudo-label Dice (mean over seeds {args.seeds})",
        "",
        "| setting | " + " | ".join(args.datasets) + " |",
        "|---|" + "---|" * len(args.datasets),
    ]
    names = next(iter(results.values()))["grid"]
    for name in names:
        cells = []
        for dataset in args.datasets:
            runs = [results[f"{dataset}/seed{s}"]["grid"][name] for s in args.seeds]
            cells.append(f"{np.mean([r['pool_dice'] for r in runs]):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rho = [np.mean([results[f"{d}/seed{s}"]["rho_uncertainty_dice"] for s in args.seeds]) for d in args.datasets]
    lines.append("| Spearman rho(uncertainty, Dice) | " + " | ".join(f"{r:.2f}" for r in rho) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"time: {time.time() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python -m benchmarks.refinement_replay", "results": results, "table": table}, f)


if __name__ == "__main__":
    main()
