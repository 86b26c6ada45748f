"""Dice and IoU of label maps against ground truth: one image, two folders, or every round of a MedSMILE run.

Conventions (the same everywhere in this module):

- Scores are per foreground class ``1 .. C-1``; class 0 (background) is never scored.
- Per image and class, MONAI's ``compute_dice`` / ``compute_iou`` with ``ignore_empty=False``:
  truth and prediction both empty for the class -> 1 (nothing to find, nothing found);
  truth empty but prediction not -> 0.
- ``mean_dice`` / ``mean_iou`` ("mDice" / "mIoU") = mean over images of the per-image mean over foreground classes.
  ``per_class[c]`` = mean over images of class c's score.
- Label files (prediction and truth) are read with MONAI ``LoadImage`` through
  :func:`scripts.image_io.read_label` with ``num_classes``, so the bundle's one rule applies
  (:func:`scripts.image_io.label_classes`): values in ``0 .. C-1`` are class indices as stored, a 0/255 (any
  ``{0, k}``, ``k >= C``) mask becomes ``{0, 1}``, a lossy JPEG mask with ``C = 2`` is foreground where > 127, and
  anything else out of range is an error.
- Images whose truth is empty (no foreground class; BUSI's normal scans, volume slices without the structure) make
  ``mean_dice`` depend on how many there are. So :func:`presence_summary` also reports ``nonempty_dice`` (mean Dice
  over images whose truth is not empty) and image-level ``specificity`` (empty truth predicted empty) and
  ``sensitivity`` (non-empty truth predicted non-empty). An empty-empty pair scores Dice 1 in ``mean_dice``, is left
  out of ``nonempty_dice``, and counts as a true negative in ``specificity`` (:data:`EMPTY_PAIR_RULE`).
- A 3-D label file (a volume) is one image of the means above: its Dice is the per-volume Dice. Its slices along
  ``slice_axis`` are also counted for presence (``slice_specificity`` / ``slice_sensitivity``).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from monai.networks.utils import one_hot

from .atomic_files import atomic_path, write_json_atomic
from .image_io import read_label

logger = logging.getLogger(__name__)

# Longest first so that ".nii.gz" wins over ".gz"-less matches.
LABEL_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "per_image.csv"
LABEL_QUALITY_FILE = "label_quality.json"
EMPTY_PAIR_RULE = (
    "an image whose truth and prediction are both empty scores Dice 1 in mean_dice, is left out of nonempty_dice "
    "(only images whose truth is not empty count there), and counts as a true negative in specificity"
)


# ----------------------------------------------------------------------------------------------------------------------
# one image
# ----------------------------------------------------------------------------------------------------------------------


def _label_tensor(x: np.ndarray | torch.Tensor, num_classes: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"{what}: label map has non-integer values")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(
            f"{what}: label values must lie in 0..{num_classes - 1}, got min {int(t.min())} max {int(t.max())}"
        )
    return t


def segmentation_scores(
    pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, num_classes: int
) -> dict[str, list[float]]:
    """Dice and IoU of one label map against its truth, per foreground class.

    Args:
        pred, truth: integer class maps (values 0..num_classes-1) of the same spatial shape (any dimensionality).
        num_classes: number of classes including background (>= 2).

    Returns:
        ``{"dice": [class 1, ..., class C-1], "iou": [...]}``; empty truth and prediction give 1, empty truth with a
        non-empty prediction gives 0 (MONAI ``ignore_empty=False``).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    p = _label_tensor(pred, num_classes, "prediction")
    t = _label_tensor(truth, num_classes, "truth")
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != truth shape {tuple(t.shape)}")
    p = one_hot(p[None, None], num_classes, dim=1)  # (1, C, *spatial)
    t = one_hot(t[None, None], num_classes, dim=1)
    dice = compute_dice(p, t, include_background=False, ignore_empty=False)[0]
    iou = compute_iou(p, t, include_background=False, ignore_empty=False)[0]
    return {"dice": [float(v) for v in dice], "iou": [float(v) for v in iou]}


def summarize(per_image: Sequence[dict], num_classes: int) -> dict:
    """Means over images of :func:`segmentation_scores` results -> mean_dice, mean_iou, per_class, num_images."""
    if not per_image:
        raise ValueError("no images to summarize")
    dice = np.array([s["dice"] for s in per_image], dtype=np.float64)  # (N, C-1)
    iou = np.array([s["iou"] for s in per_image], dtype=np.float64)
    return {
        "mean_dice": float(dice.mean(axis=1).mean()),
        "mean_iou": float(iou.mean(axis=1).mean()),
        "per_class": {
            str(c): {"dice": float(dice[:, c - 1].mean()), "iou": float(iou[:, c - 1].mean())}
            for c in range(1, num_classes)
        },
        "num_images": len(per_image),
    }


def presence_rates(present: Sequence[tuple[bool, bool]]) -> dict:
    """Image-level presence from (truth has foreground, prediction has foreground) pairs: ``specificity`` (empty
    truths predicted empty / empty truths), ``sensitivity`` (non-empty truths predicted non-empty / non-empty
    truths), each None where there is nothing to count, and ``num_empty_truth`` / ``num_nonempty_truth``."""
    empty_truth = [p for t, p in present if not t]
    found = [p for t, p in present if t]
    return {
        "specificity": float(np.mean([not p for p in empty_truth])) if empty_truth else None,
        "sensitivity": float(np.mean(found)) if found else None,
        "num_empty_truth": len(empty_truth),
        "num_nonempty_truth": len(found),
    }


def presence_summary(per_image: Sequence[dict], present: Sequence[tuple[bool, bool]]) -> dict:
    """Dice on images whose truth is not empty, and image-level presence counts (:func:`presence_rates`).

    Args:
        per_image: :func:`segmentation_scores` results; present: per image, (truth has foreground, prediction has
            foreground), any foreground class.
    Returns:
        ``nonempty_dice`` (mean over images with non-empty truth of the per-image mean Dice; None if there is none),
        :func:`presence_rates`'s keys and ``empty_pair_rule``.
    """
    if len(per_image) != len(present):
        raise ValueError(f"{len(per_image)} score entries but {len(present)} presence entries")
    nonempty = [float(np.mean(s["dice"])) for s, (t, _) in zip(per_image, present, strict=True) if t]
    return {
        "nonempty_dice": float(np.mean(nonempty)) if nonempty else None,
        **presence_rates(present),
        "empty_pair_rule": EMPTY_PAIR_RULE,
    }


def slice_presence(pred: np.ndarray, truth: np.ndarray, slice_axis: int = 2) -> list[tuple[bool, bool]]:
    """Per slice of a 3-D label pair along ``slice_axis``: (truth has foreground, prediction has foreground)."""
    t = np.moveaxis(np.asarray(truth) > 0, slice_axis, 0).reshape(truth.shape[slice_axis], -1).any(1)
    p = np.moveaxis(np.asarray(pred) > 0, slice_axis, 0).reshape(pred.shape[slice_axis], -1).any(1)
    return list(zip(t.tolist(), p.tolist(), strict=True))


# ----------------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------------


def _split_suffix(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for sfx in LABEL_SUFFIXES:
        if lower.endswith(sfx) and len(name) > len(sfx):
            return name[: -len(sfx)], name[-len(sfx) :]
    return None


def _label_files(folder: str, strip: str = "") -> dict[str, str]:
    """Label files under ``folder`` (recursive, hidden files/folders skipped) keyed by relative path without suffix.

    With ``strip`` only names ending in ``strip`` (before the suffix) are kept, and ``strip`` is removed from the key.
    """
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"not a folder: {folder!r}")
    files: dict[str, str] = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            split = _split_suffix(name)
            if name.startswith(".") or split is None:
                continue
            stem = split[0]
            if strip:
                if not stem.endswith(strip) or len(stem) == len(strip):
                    continue
                stem = stem[: -len(strip)]
            rel = os.path.relpath(root, folder)
            key = stem if rel == "." else Path(rel, stem).as_posix()
            path = os.path.join(root, name)
            if key in files:
                raise ValueError(f"two label files for {key!r}: {files[key]} and {path}")
            files[key] = path
    return files


def _pair(truth: dict[str, str], preds: dict[str, str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(key, pred path, truth path) by relative path, else by bare stem when that stem is unique on both sides."""
    by_stem: dict[str, list[str]] = {}
    for key in preds:
        by_stem.setdefault(key.rsplit("/", 1)[-1], []).append(key)
    truth_stems = Counter(key.rsplit("/", 1)[-1] for key in truth)
    pairs, missing = [], []
    for key, truth_path in sorted(truth.items()):
        stem = key.rsplit("/", 1)[-1]
        if key in preds:
            pairs.append((key, preds[key], truth_path))
        elif truth_stems[stem] == 1 and len(by_stem.get(stem, [])) == 1:
            pairs.append((key, preds[by_stem[stem][0]], truth_path))
        else:
            missing.append(key)
    return pairs, missing


def _same_shape(pred: np.ndarray, truth: np.ndarray, pred_path: str, truth_path: str) -> np.ndarray:
    if pred.shape == truth.shape:
        return pred
    if [s for s in pred.shape if s != 1] == [s for s in truth.shape if s != 1]:  # e.g. NIfTI (H, W, 1) vs (H, W)
        return pred.reshape(truth.shape)
    raise ValueError(
        f"shape mismatch: prediction {pred_path} has spatial shape {tuple(pred.shape)}, "
        f"truth {truth_path} has {tuple(truth.shape)}"
    )


def _write_per_image(path: str, rows: Sequence[tuple[str, dict]], num_classes: int) -> None:
    classes = range(1, num_classes)
    header = ["image", *(f"dice_c{c}" for c in classes), *(f"iou_c{c}" for c in classes), "mean_dice", "mean_iou"]
    header += ["truth_empty", "pred_empty"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for key, s in rows:
            writer.writerow(
                [key, *s["dice"], *s["iou"], float(np.mean(s["dice"])), float(np.mean(s["iou"]))]  # full precision
                + [int(not s["truth_present"]), int(not s["pred_present"])]
            )


def evaluate_folders(
    pred_dir: str,
    truth_dir: str,
    num_classes: int = 2,
    output_dir: str | None = None,
    pred_suffix: str = "",
    allow_missing: bool = False,
    slice_axis: int = 2,
) -> dict:
    """Dice / IoU of every label file in ``pred_dir`` against its ground truth in ``truth_dir``.

    Pairing: truth ``<rel>/<stem>.(png|jpg|nii.gz|...)`` with prediction ``<rel>/<stem><pred_suffix>.(png|nii.gz|...)``
    (both searched recursively; the relative folder ``<rel>`` must match, except that a stem unique in both folders
    pairs across folders, e.g. a flat prediction folder against truth in subfolders). Predictions without truth are
    ignored (counted in ``num_predictions_without_truth``). A truth file without prediction is an error listing the
    missing stems, unless ``allow_missing`` (then they are listed under ``missing`` and skipped).

    Use ``pred_suffix="_seg"`` for ``configs/inference.json`` outputs and ``""`` for MedSMILE pseudo-labels
    (``round_<r>/labels``).

    Writes ``output_dir/metrics.json`` (the returned dict) and ``output_dir/per_image.csv`` when ``output_dir`` is
    given. Returns ``{"mean_dice", "mean_iou", "per_class", "num_images", "num_classes", "pred_dir", "truth_dir",
    "pred_suffix", "missing", "num_predictions_without_truth"}`` plus :func:`presence_summary`'s keys; with 3-D
    files also ``num_volumes``, ``mean_volume_dice`` (mean Dice of the 3-D files) and ``slice_specificity`` /
    ``slice_sensitivity`` / ``slice_nonempty_count`` (presence of their slices along ``slice_axis``).
    """
    if truth_dir is None:
        raise ValueError("truth_dir is required: the folder of ground-truth label files")
    truth = _label_files(truth_dir)
    if not truth:
        raise ValueError(f"no label files ({', '.join(LABEL_SUFFIXES)}) in truth_dir {truth_dir}")
    preds = _label_files(pred_dir, strip=pred_suffix or "")
    pairs, missing = _pair(truth, preds)
    if missing and not allow_missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise ValueError(
            f"no prediction '<stem>{pred_suffix or ''}.<png|nii.gz>' in {pred_dir} for {len(missing)} truth file(s): "
            f"{shown} (pass allow_missing=True to score only the pairs found)"
        )
    if not pairs:
        raise ValueError(
            f"no prediction in {pred_dir} matches a truth file in {truth_dir} (pred_suffix={pred_suffix!r})"
        )

    rows, volume_dice, slices = [], [], []
    for key, pred_path, truth_path in pairs:
        truth_map = read_label(truth_path, num_classes=num_classes)
        pred_map = _same_shape(read_label(pred_path, num_classes=num_classes), truth_map, pred_path, truth_path)
        scores = segmentation_scores(pred_map, truth_map, num_classes)
        rows.append((key, {**scores, "truth_present": bool(truth_map.any()), "pred_present": bool(pred_map.any())}))
        if truth_map.ndim == 3 and min(truth_map.shape) > 1:  # a volume: its Dice is the per-volume Dice
            volume_dice.append(float(np.mean(scores["dice"])))
            slices += slice_presence(pred_map, truth_map, slice_axis)

    used = {p for _, p, _ in pairs}
    per_image = [s for _, s in rows]
    volumes = {}
    if volume_dice:
        by_slice = presence_rates(slices)
        volumes = {
            "num_volumes": len(volume_dice),
            "mean_volume_dice": float(np.mean(volume_dice)),
            "slice_specificity": by_slice["specificity"],
            "slice_sensitivity": by_slice["sensitivity"],
            "slice_nonempty_count": by_slice["num_nonempty_truth"],
            "slice_count": len(slices),
        }
    metrics = {
        **summarize(per_image, num_classes),
        **presence_summary(per_image, [(s["truth_present"], s["pred_present"]) for s in per_image]),
        **volumes,
        "num_classes": num_classes,
        "pred_dir": os.path.abspath(pred_dir),
        "truth_dir": os.path.abspath(truth_dir),
        "pred_suffix": pred_suffix or "",
        "missing": missing,
        "num_predictions_without_truth": sum(p not in used for p in preds.values()),
    }
    logger.info(
        "%d images: mean Dice %.4f, mean IoU %.4f (%s vs %s)",
        metrics["num_images"],
        metrics["mean_dice"],
        metrics["mean_iou"],
        pred_dir,
        truth_dir,
    )
    logger.info(
        "non-empty truth: %d images, Dice %s; empty truth: %d images, predicted empty: %s; (%s)",
        metrics["num_nonempty_truth"],
        metrics["nonempty_dice"],
        metrics["num_empty_truth"],
        metrics["specificity"],
        EMPTY_PAIR_RULE,
    )
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        write_json_atomic(os.path.join(output_dir, METRICS_FILE), metrics)
        _write_per_image(os.path.join(output_dir, PER_IMAGE_FILE), rows, num_classes)
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# MedSMILE runs
# ----------------------------------------------------------------------------------------------------------------------


def evaluate_rounds(run_dir: str, truth_dir: str, num_classes: int = 2) -> list[dict]:
    """Pseudo-label quality of every finished round (``round_<r>`` with ``round.json``) of a MedSMILE run.

    Each round's ``labels/`` folder is scored against ``truth_dir`` (pseudo-labels without truth, and truth without
    pseudo-label, are skipped and counted). Writes ``run_dir/label_quality.json`` and returns its list, one entry per
    round in order: ``{"round", "mean_dice", "mean_iou", "per_class", "num_images", "nonempty_dice", "specificity",
    "sensitivity", "num_empty_truth", "num_missing", "num_predictions_without_truth"}``.
    """
    rounds = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        m = re.fullmatch(r"round_(\d+)", name)
        if m and os.path.isfile(os.path.join(run_dir, name, "round.json")):
            rounds.append(int(m.group(1)))
    if not rounds:
        raise ValueError(f"no finished round (round_<r>/round.json) in {run_dir}")
    quality = []
    for r in sorted(rounds):
        metrics = evaluate_folders(
            os.path.join(run_dir, f"round_{r}", "labels"), truth_dir, num_classes, allow_missing=True
        )
        quality.append(
            {
                "round": r,
                **{k: metrics[k] for k in ("mean_dice", "mean_iou", "per_class", "num_images")},
                **{k: metrics[k] for k in ("nonempty_dice", "specificity", "sensitivity", "num_empty_truth")},
                "num_missing": len(metrics["missing"]),
                "num_predictions_without_truth": metrics["num_predictions_without_truth"],
            }
        )
    write_json_atomic(os.path.join(run_dir, LABEL_QUALITY_FILE), quality)
    return quality
