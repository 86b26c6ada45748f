"""Can a trained round's network tell, without labels, which pool images show no structure (issue 36)?

    python -m benchmarks.presence_scores --runs benchmarks/results/<tag> --dataset busi --data_root ../shared/data

The final model of each finished ``benchmarks.paper`` run (seed by seed, ``<runs>/<dataset>/seed<S>/medsmile/models``)
predicts its own pool (the seed's ``choose_split``) at the run's image size. Per image, three image-level scores of
"the structure is here": the predicted foreground area (argmax), the largest foreground probability of any pixel, and
the best query's score (Mask2Former's instance score: class probability times the mean mask probability inside its
mask). Each score's AUROC between the images whose truth is empty (BUSI's normal scans) and the others says how well
ANY threshold on it could separate them; the argmax rule (empty when no pixel is foreground) is what the pipeline does.
Results are merged by runs folder into ``benchmarks/results/presence_scores.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from monai.metrics import compute_roc_auc

from benchmarks.paper import (  # first: benchmarks.paper puts bundle/ on sys.path
    choose_split,
    image_path,
    mask_path,
    mean_std,
)
from scripts.atomic_files import write_json_atomic
from scripts.image_io import read_case, read_label
from scripts.network import network_from_file
from scripts.pool import resize_image

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "presence_scores")
SCORES = ("foreground_area", "max_foreground_probability", "best_query_score")


@torch.no_grad()
def image_scores(network: torch.nn.Module, image: torch.Tensor) -> dict:
    """The three image-level scores of one (3, S, S) image in [0, 1]."""
    log_probs, out = network(image[None], with_queries=True)
    foreground = 1 - log_probs.exp()[0, 0]  # every class but background
    classes = out.class_queries_logits.softmax(-1)[0, :, 1:-1].sum(-1)  # (Q,): not background, not "no object"
    masks = out.masks_queries_logits.sigmoid()[0].flatten(1)  # (Q, h*w)
    inside = masks > 0.5
    mask_score = (masks * inside).sum(1) / inside.sum(1).clamp_min(1)
    return {
        "foreground_area": float((log_probs.argmax(1) > 0).float().mean()),
        "max_foreground_probability": float(foreground.max()),
        "best_query_score": float((classes * mask_score).max()),
    }


def score_run(run_dir: str, pool: list, data_root: str, image_size: int) -> list[dict]:
    network = network_from_file(os.path.join(run_dir, "models", "network.json"))
    network.load_state_dict(torch.load(os.path.join(run_dir, "models", "model.pt"), weights_only=True))
    network.eval()
    rows = []
    for subset, stem in pool:
        _, slices = read_case(image_path(data_root, subset, stem))
        empty = not read_label(mask_path(data_root, subset, stem), num_classes=2).any()
        rows.append(
            {
                "image": f"{subset}/{stem}",
                "empty_truth": empty,
                **image_scores(network, resize_image(slices[0], image_size)),
            }
        )
    return rows


def separation(rows: list[dict]) -> dict:
    """Per score, its AUROC (non-empty truth scored higher = 1); the argmax rule's specificity and sensitivity."""
    truth = torch.tensor([0.0 if r["empty_truth"] else 1.0 for r in rows])
    empty = truth == 0
    if empty.all() or not empty.any():
        raise ValueError("the pool needs images with and without the structure to measure their separation")
    area = torch.tensor([r["foreground_area"] for r in rows])
    result = {f"auroc_{k}": float(compute_roc_auc(torch.tensor([r[k] for r in rows]), truth)) for k in SCORES}
    result["argmax_specificity"] = float((area[empty] == 0).float().mean())
    result["argmax_sensitivity"] = float((area[~empty] > 0).float().mean())
    result.update(empty_images=int(empty.sum()), nonempty_images=int((~empty).sum()))
    return result


def write_markdown(results: dict, path: str) -> None:
    lines = [
        "### Image-level presence scores of trained rounds (issue 36)",
        "",
        (
            "`python -m benchmarks.presence_scores --runs RUNS --dataset D --data_root ../shared/data`: each seed's "
            "final model on its own pool. AUROC 1: some threshold on the score separates the images whose truth is "
            "empty from the others perfectly; 0.5: no better than chance. Argmax: the pipeline's rule (empty when no "
            "pixel is foreground). Mean ± std over the seeds."
        ),
        "",
        (
            "| runs | dataset | seeds | empty / non-empty images | AUROC area | AUROC max probability | AUROC best "
            "query | argmax: empty truth predicted empty | argmax: non-empty predicted non-empty |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results.values():
        seeds = entry["seeds"]
        counts = [sum(s[k] for s in seeds.values()) for k in ("empty_images", "nonempty_images")]
        keys = (*(f"auroc_{k}" for k in SCORES), "argmax_specificity", "argmax_sensitivity")
        cells = [mean_std([s[k] for s in seeds.values()]) for k in keys]
        lines.append(
            f"| `{entry['runs']}` | {entry['dataset']} | {', '.join(seeds)} | {counts[0]} / {counts[1]} | "
            + " | ".join(cells)
            + " |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="a benchmarks.paper results folder (with <dataset>.json)")
    parser.add_argument("--dataset", default="busi")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: those the results file holds")
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--out", default=RESULTS, help="results file stem (.json and .md)")
    args = parser.parse_args(argv)
    with open(os.path.join(args.runs, f"{args.dataset}.json")) as f:
        bench = json.load(f)
    seeds = args.seeds if args.seeds is not None else bench["seeds"]
    # the results folder's tag (benchmarks.paper's runs may live outside the repository: --results_dir)
    entry = {"runs": os.path.basename(os.path.normpath(args.runs)), "dataset": args.dataset, "seeds": {}}
    for seed in seeds:
        split = choose_split(args.data_root, args.dataset, seed, bench["pool_size"], bench.get("test_size"))
        rows = score_run(
            os.path.join(args.runs, args.dataset, f"seed{seed}", "medsmile"),
            split["pool"],
            args.data_root,
            bench["config"]["image_size"],
        )
        entry["seeds"][str(seed)] = {**separation(rows), "images": rows}
        print(f"seed {seed}:", {k: round(v, 3) for k, v in entry["seeds"][str(seed)].items() if k != "images"})
    results = {}
    if os.path.isfile(args.out + ".json"):
        with open(args.out + ".json") as f:
            results = json.load(f)
    results[f"{entry['runs']}:{args.dataset}"] = entry
    write_json_atomic(args.out + ".json", results)
    write_markdown(results, args.out + ".md")
    return entry


if __name__ == "__main__":
    main()
