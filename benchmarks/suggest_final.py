"""Suggested vs random reference after the rounds (issue 8): a paired table from two `benchmarks.paper` results.

    python -m benchmarks.paper --profile cpu-quick --dataset busi --seeds 0 1 2
    python -m benchmarks.paper --profile cpu-quick --dataset busi --seeds 0 1 --reference suggested --variants medsmile
    python -m benchmarks.suggest_final --datasets polyp isic2017 busi

For each seed both runs see the same 101 images (the seed's random reference + its 100-image pool); the suggested
run labels the top image of `run suggest` among them instead. Rows pair the seeds; the last row per dataset is the
mean over the seeds both runs have.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scores(run: dict, subsets: list[str]) -> dict:
    """Round-0 and final test Dice (mean over the test splits) and the final pool pseudo-label Dice of one run."""
    return {
        "round0_test": float(np.mean([run["round0_test"][s]["dice"] for s in subsets])),
        "final_test": float(np.mean([run["medsmile"]["test"][-1][s]["dice"] for s in subsets])),
        "round0_pool": run["medsmile"]["pool_dice"][0],
        "final_pool": run["medsmile"]["pool_dice"][-1],
    }


def paired_rows(random: dict, suggested: dict) -> list[dict]:
    subsets = random["test_subsets"]
    by_seed = {run["seed"]: run for run in random["runs"]}
    rows = []
    for run in suggested["runs"]:
        if run["seed"] in by_seed:
            base = by_seed[run["seed"]]
            rows.append(
                {
                    "seed": run["seed"],
                    "random": {"reference": base["reference"], **scores(base, subsets)},
                    "suggested": {"reference": run["reference"], **scores(run, subsets)},
                }
            )
    return rows


def markdown(tables: dict) -> str:
    keys = ("round0_pool", "final_pool", "round0_test", "final_test")
    lines = [
        "| dataset | seed | reference | round-0 pool Dice | final pool Dice | round-0 test Dice | final test Dice |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset, rows in tables.items():
        for row in rows:
            for choice in ("random", "suggested"):
                r = row[choice]
                cells = " | ".join(f"{r[k]:.3f}" for k in keys)
                lines.append(f"| {dataset} | {row['seed']} | {choice}: {r['reference']} | {cells} |")
        for choice in ("random", "suggested"):
            cells = " | ".join(f"{np.mean([row[choice][k] for row in rows]):.3f}" for k in keys)
            lines.append(f"| {dataset} | mean of {len(rows)} | **{choice}** | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["polyp", "isic2017", "busi"])
    parser.add_argument("--profile", default="cpu-quick")
    parser.add_argument("--results_dir", default=os.path.join(REPO, "benchmarks", "results"))  # benchmarks.paper's
    args = parser.parse_args(argv)
    tables = {}
    for dataset in args.datasets:
        with open(os.path.join(args.results_dir, args.profile, f"{dataset}.json")) as f:
            random = json.load(f)
        with open(os.path.join(args.results_dir, f"{args.profile}_suggested", f"{dataset}.json")) as f:
            suggested = json.load(f)
        tables[dataset] = paired_rows(random, suggested)
    md = markdown(tables)
    out = os.path.join(args.results_dir, f"{args.profile}_suggested", "paired.md")
    with open(out, "w") as f:
        f.write(md + "\n")
    with open(out.replace(".md", ".json"), "w") as f:
        json.dump(tables, f, indent=1)
    print(md)


if __name__ == "__main__":
    main()
