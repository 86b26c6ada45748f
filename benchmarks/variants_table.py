"""One table per dataset of every measured configuration variant (issue 9): what each option buys, per round.

    python -m benchmarks.paper --profile cpu-quick --dataset polyp --seeds 0 1 2                       # defaults
    python -m benchmarks.paper --profile cpu-quick --dataset polyp --seeds 0 1 2 --variants medsmile \\
        --set ignore_uncertain_pixels=0.5                                                              # one variant
    python -m benchmarks.variants_table --dataset polyp \\
        --variant defaults=results/cpu-quick --variant "ignore 50 %"=results/cpu-quick_ignore_uncertain_pixels-0.5

Each variant is a ``benchmarks.paper`` results folder; its options are the keys whose value differs from the first
variant's configuration. Rows give, over the seeds both share with the first variant, the pool pseudo-label Dice of
every round and the test Dice at round 0 and after the last round (mean over the test splits), with the change of
the final test Dice against the first variant, seed by seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex

import numpy as np

from benchmarks.paper import mean_std
from benchmarks.suggest_final import scores
from scripts.pipeline import ADDED_OPTIONS, TRAINING_PARTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORED_KEYS = (  # not options of a run; augmentation_presets is a menu of lists, train_transforms (compared) the one used
    "hyperparameter_notes",
    "augmentation_presets",
    "seed",
    "pipeline",
    "output_dir",
    "model_path",
    "imports",
    "logging",
    "run",
    "suggest",
    "report",
)


def load_variant(folder: str, dataset: str) -> dict:
    path = os.path.join(folder, f"{dataset}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no benchmarks.paper result for {dataset} in {folder}")
    with open(path) as f:
        return json.load(f)


def changed_options(config: dict, baseline: dict) -> str:
    """Options whose value differs; an option a run predates counts with the value that reproduces it, and a training
    part (``TRAINING_PARTS``: loss, optimizer, transforms...) that one run predates is compared only when both record
    it (a run recorded before it was configuration trained with its default, as its resume assumes)."""
    config, baseline = {**ADDED_OPTIONS, **config}, {**ADDED_OPTIONS, **baseline}
    unshared = {k for k in TRAINING_PARTS if (k in config) != (k in baseline)}
    keys = sorted(
        k
        for k in set(config) | set(baseline)
        if k not in IGNORED_KEYS and k not in unshared and config.get(k) != baseline.get(k)
    )
    return ", ".join(f"{k}={json.dumps(config.get(k))}" for k in keys) or "-"


def run_scores(run: dict, subsets: list[str]) -> dict:
    """Per-round pool Dice, and round-0 / final test Dice averaged over the test splits, of one seed's run."""
    return {**scores(run, subsets), "pool": run["medsmile"]["pool_dice"]}


def variant_rows(variants: dict[str, dict]) -> list[dict]:
    """One row per variant, over the seeds it shares with the first (the baseline)."""
    names = list(variants)
    base = variants[names[0]]
    base_by_seed = {run["seed"]: run_scores(run, base["test_subsets"]) for run in base["runs"]}
    rows = []
    for name in names:
        res = variants[name]
        by_seed = {run["seed"]: run_scores(run, res["test_subsets"]) for run in res["runs"]}
        seeds = sorted(set(by_seed) & set(base_by_seed))
        if not seeds:
            raise ValueError(f"variant {name!r} shares no seed with {names[0]!r}")
        rounds = len(by_seed[seeds[0]]["pool"])
        rows.append(
            {
                "variant": name,
                "options": changed_options(res["config"], base["config"]),
                "seeds": seeds,
                "pool": [[by_seed[s]["pool"][r] for s in seeds] for r in range(rounds)],
                "round0_test": [by_seed[s]["round0_test"] for s in seeds],
                "final_test": [by_seed[s]["final_test"] for s in seeds],
                "delta_vs_first": [by_seed[s]["final_test"] - base_by_seed[s]["final_test"] for s in seeds],
                "train_s": res["timing"]["train_s"],
            }
        )
    return rows


def markdown(dataset: str, rows: list[dict], command: str) -> str:
    rounds = max(len(row["pool"]) for row in rows)
    lines = [
        f"### {dataset}: configuration variants (mean ± std over seeds)",
        "",
        f"Command: `{command}`",
        "",
        "| variant | options | seeds | "
        + " | ".join(f"pool Dice r{r}" for r in range(rounds))
        + " | test Dice r0 | final test Dice | final vs first row | training s per run |",
        "|---" * (7 + rounds) + "|",
    ]
    for row in rows:
        pool = [mean_std(row["pool"][r]) if r < len(row["pool"]) else "" for r in range(rounds)]
        lines.append(
            f"| {row['variant']} | {row['options']} | {' '.join(map(str, row['seeds']))} | "
            + " | ".join(pool)
            + f" | {mean_std(row['round0_test'])} | {mean_std(row['final_test'])} | "
            + f"{np.mean(row['delta_vs_first']):+.3f} | {row['train_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME=results folder; the first is the base")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "variants"))
    args = parser.parse_args(argv)
    variants = {}
    for spec in args.variant:
        name, sep, folder = spec.partition("=")
        if not sep:
            raise SystemExit(f"--variant {spec!r}: expected NAME=FOLDER")
        variants[name] = load_variant(folder, args.dataset)
    rows = variant_rows(variants)
    command = "python -m benchmarks.variants_table " + " ".join(
        [f"--dataset {args.dataset}"] + [f"--variant {shlex.quote(v)}" for v in args.variant]
    )
    text = markdown(args.dataset, rows, command)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.dataset}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"{args.dataset}.json"), "w") as f:
        json.dump({"command": command, "rows": rows}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
