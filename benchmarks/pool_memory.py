"""Peak RSS of one MedSMILE round against the pool size, pool in RAM vs streamed from disk (issue 6).

    OMP_NUM_THREADS=1 python -m benchmarks.pool_memory --sizes 200 1000 4000 --baseline eec2afc

For each pool size it writes that many synthetic PNGs (a dark disc on a noisy bright background, 128 x 128), then
runs round 0 + one round (``num_rounds 1``, one epoch) of ``configs/medsmile.json`` as a separate process for each
variant, with a tiny random-init DINOv2 (hidden 32, 2 layers) and the tiny decoder of the tests: the per-image
arrays are then what dominates memory, which is what this measures. Variants:

* ``disk``: ``--pool_store disk`` (the default): pool images, labels and probabilities stream through files;
* ``memory``: ``--pool_store memory``: the same code with every per-image array held as a tensor;
* ``before``: the bundle as it was at ``--baseline`` (a git commit; extracted with ``git archive``), all in RAM.

Peak RSS is the pipeline's own ``ru_maxrss`` record in summary.json after round 0 and after round 1 (the process
peak so far, so the round-1 figure is the peak of the whole run). Results go to stdout as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundle")
TINY = {
    "feature_layers": "[-3,-1]",  # the tiny encoder has 2 layers (ignored by bundles older than that option)
    "epochs": 1,
    "min_iterations": 0,
    "num_rounds": 1,
    "hidden_dim": 32,
    "num_queries": 4,
    "decoder_layers": 1,
    "pixel_decoder_layers": 1,
    "export_torchscript": False,
}


def blob_image(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx, r = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size, rng.uniform(0.15, 0.3) * size
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
    image = np.where(mask[..., None], [60, 30, 30], [220, 180, 170]) + rng.normal(0, 10, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_dataset(folder: str, n: int, size: int = 128) -> dict:
    """``n`` unlabelled PNGs in ``folder/images`` and one reference with its mask (written once, then reused)."""
    images, ref = os.path.join(folder, "images"), os.path.join(folder, "reference")
    done = os.path.join(folder, "done")
    if not os.path.isfile(done):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(images)
        os.makedirs(ref)
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(blob_image(rng, size)[0]).save(os.path.join(images, f"img_{i:05d}.png"))
        image, mask = blob_image(rng, size)
        Image.fromarray(image).save(os.path.join(ref, "ref.png"))
        Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(ref, "ref_mask.png"))
        open(done, "w").close()
    return {
        "dataset_dir": images,
        "reference_image": os.path.join(ref, "ref.png"),
        "reference_label": os.path.join(ref, "ref_mask.png"),
    }


def tiny_encoder(path: str, image_size: int) -> str:
    if not os.path.isdir(path):
        import torch
        from transformers import Dinov2Config, Dinov2Model

        torch.manual_seed(0)
        config = Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            patch_size=14,
            image_size=image_size,
        )
        Dinov2Model(config).save_pretrained(path)
    return path


def extract_bundle(commit: str, work: str) -> str:
    """The bundle folder as it was at ``commit`` (git archive), for the ``before`` variant."""
    target = os.path.join(work, f"bundle_{commit}")
    if not os.path.isdir(target):
        os.makedirs(target)
        archive = subprocess.run(["git", "-C", REPO, "archive", commit, "bundle"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", target], input=archive.stdout, check=True)
    return os.path.join(target, "bundle")


def run_once(bundle: str, args: dict, log: str) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/medsmile.json"]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=bundle, check=True, stdout=f, stderr=subprocess.STDOUT)
    with open(os.path.join(args["output_dir"], "summary.json")) as f:
        return json.load(f), time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 4000])
    parser.add_argument("--variants", nargs="+", default=["disk", "memory", "before"])
    parser.add_argument("--baseline", default="eec2afc", help="git commit of the 'before' variant")
    parser.add_argument("--feature_image_size", type=int, default=224)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--work", default="/tmp/medsmile_pool_memory")
    opts = parser.parse_args()

    os.makedirs(opts.work, exist_ok=True)
    encoder = tiny_encoder(os.path.join(opts.work, "tiny_dinov2"), opts.feature_image_size)
    rows = []
    for n in opts.sizes:
        data = make_dataset(os.path.join(opts.work, f"pool_{n}"), n)
        for variant in opts.variants:
            bundle = extract_bundle(opts.baseline, opts.work) if variant == "before" else BUNDLE
            out = os.path.join(opts.work, f"run_{n}_{variant}")
            shutil.rmtree(out, ignore_errors=True)
            args = {
                **TINY,
                **data,
                "feature_image_size": opts.feature_image_size,
                "image_size": opts.image_size,
                "batch_size": opts.batch_size,
                "encoder_weights": encoder,
                "output_dir": os.path.join(out, "run"),
                "model_path": os.path.join(out, "models", "model.pt"),
            }
            if variant != "before":
                args["pool_store"] = variant
            summary, wall = run_once(bundle, args, os.path.join(opts.work, f"log_{n}_{variant}.txt"))
            peaks = {r["round"]: r["peak_rss_mb"] for r in summary["rounds"]}
            rows.append((n, variant, peaks[0], peaks[1], wall))
            print(f"n={n} {variant}: peak RSS {peaks[0]:.0f} MB after round 0, {peaks[1]:.0f} MB after round 1, "
                  f"{wall:.0f} s", flush=True)  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)

    print(
        f"\nMachine: {platform.machine()}, {os.cpu_count()} cores; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    print(f"feature_image_size {opts.feature_image_size}, image_size {opts.image_size}, batch_size {opts.batch_size}\n")
    print("| pool images | variant | peak RSS after round 0 (MB) | peak RSS of the run, round 1 (MB) | wall s |")
    print("|---|---|---|---|---|")
    for n, variant, p0, p1, wall in rows:
        print(f"| {n} | {variant} | {p0:.0f} | {p1:.0f} | {wall:.0f} |")
    for variant in opts.variants:
        by_n = {n: p1 for n, v, _, p1, _ in rows if v == variant}
        if len(by_n) > 1:
            lo, hi = min(by_n), max(by_n)
            slope = (by_n[hi] - by_n[lo]) / (hi - lo) * 1000
            print(f"\n{variant}: {slope:+.0f} MB per 1000 images between {lo} and {hi}")


if __name__ == "__main__":
    main()
