"""Rescore finished ``benchmarks.paper`` runs with mirrored views at inference (issue 9): which flips help where.

    python -m benchmarks.flip_inference --dataset busi --seeds 0 1 2 \\
        --runs results/cpu-quick_num_rounds-2_flip_average_predictions-True --views none h hv

Training is not repeated: each seed's last-round network (``<runs>/<dataset>/seed<s>/medsmile``) predicts the test
splits of the seed's split again, once per view set: ``none`` (one view, the benchmark's ``test``), ``h``
(+ horizontal mirror), ``v`` (+ vertical mirror), ``hv`` (+ both and their composition, ``DEFAULT_FLIPS``, the
benchmark's ``test_flip_average``). Writes ``<runs>/flip_inference_<dataset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from benchmarks.paper import choose_split, predict_test
from scripts.inferers import DEFAULT_FLIPS
from scripts.network import network_from_file

VIEWS = {"none": None, "h": ((-1,),), "v": ((-2,),), "hv": DEFAULT_FLIPS}


def last_round_network(run_dir: str) -> tuple[torch.nn.Module, int]:
    """The network of a run's last finished round, with that round's number."""
    rounds = sorted(
        int(name.split("_")[1])
        for name in os.listdir(os.path.join(run_dir, "run"))
        if name.startswith("round_") and os.path.isfile(os.path.join(run_dir, "run", name, "model.pt"))
    )
    if not rounds:
        raise FileNotFoundError(f"{run_dir}: no finished round with a model.pt")
    network = network_from_file(os.path.join(run_dir, "models", "network.json"))
    state = torch.load(os.path.join(run_dir, "run", f"round_{rounds[-1]}", "model.pt"), weights_only=True)
    network.load_state_dict(state)
    return network, rounds[-1]


def rescore(runs: str, dataset: str, seeds: list[int], views: list[str], data_root: str, test_size=None) -> dict:
    """``test_size``: images per test split; default the one the results file records (results written before
    it was recorded must be given it: the profile's ``benchmark.test_size``, 50 for cpu-quick)."""
    path = os.path.join(runs, f"{dataset}.json")
    with open(path) as f:
        bench = json.load(f)
    if test_size is None:
        if "test_size" not in bench:
            raise ValueError(f"{path} records no test_size: pass --test_size (the profile's benchmark.test_size)")
        test_size = bench["test_size"]  # null: every test image
    image_size = bench["config"]["image_size"]
    result = {"dataset": dataset, "runs": runs, "views": views, "test_size": test_size, "seeds": {}}
    for seed in seeds:
        split = choose_split(data_root, dataset, seed, bench["pool_size"], test_size)
        network, r = last_round_network(os.path.join(runs, dataset, f"seed{seed}", "medsmile"))
        scores = {view: predict_test(network, data_root, split["tests"], image_size, VIEWS[view]) for view in views}
        result["seeds"][str(seed)] = {"round": r, "test": scores}
    return result


def markdown(result: dict, command: str) -> str:
    seeds = list(result["seeds"])
    subsets = list(next(iter(result["seeds"].values()))["test"][result["views"][0]])
    lines = [
        f"### {result['dataset']}: test Dice of the last round's network by inference views (seeds {' '.join(seeds)})",
        "",
        f"Command: `{command}`",
        "",
        "| test split | " + " | ".join(f"views {v}: mean (per seed)" for v in result["views"]) + " |",
        "|---|" + "---|" * len(result["views"]),
    ]
    for subset in subsets:
        cells = []
        for view in result["views"]:
            values = [result["seeds"][s]["test"][view][subset]["dice"] for s in seeds]
            cells.append(f"{np.mean(values):.3f} ({' / '.join(f'{v:.3f}' for v in values)})")
        lines.append(f"| {subset} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="a benchmarks.paper results folder whose runs are on disk")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--views", nargs="+", default=list(VIEWS), choices=list(VIEWS))
    parser.add_argument("--data_root", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--test_size", type=int, help="images per test split, when the results file records none")
    args = parser.parse_args(argv)
    data_root = os.path.abspath(args.data_root)
    result = rescore(args.runs, args.dataset, args.seeds, args.views, data_root, args.test_size)
    command = "python -m benchmarks.flip_inference " + " ".join(argv if argv is not None else sys.argv[1:])
    out = os.path.join(args.runs, f"flip_inference_{args.dataset}")
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
