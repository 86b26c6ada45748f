"""On-disk round folders: ``round_<r>/labels/...`` plus ``round.json``, written atomically and read back on resume.

A round folder becomes visible only once complete (written as ``round_<r>.partial`` then renamed), so a crash never
leaves a half round that a rerun would mistake for a finished one, and a finished round is never overwritten.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .atomic_files import move_into_place
from .image_io import label_slices, read_label, write_label
from .pool import ImagePool

ROUND_FILE = "round.json"
IGNORED_FILE = "ignored_pixels.npy"  # training labels' ignored pixels, bit-packed (N, S, S); only when some are


def round_dir(output_dir: str, r: int) -> str:
    return os.path.join(output_dir, f"round_{r}")


def is_complete(output_dir: str, r: int) -> bool:
    return os.path.isfile(os.path.join(round_dir(output_dir, r), ROUND_FILE))


def begin_round(output_dir: str, r: int) -> str:
    """A fresh ``round_<r>.partial`` folder (a leftover from a crashed attempt is discarded)."""
    if is_complete(output_dir, r):
        raise FileExistsError(f"{round_dir(output_dir, r)} is complete and is never overwritten")
    partial = round_dir(output_dir, r) + ".partial"
    if os.path.isdir(partial):
        shutil.rmtree(partial)
    os.makedirs(os.path.join(partial, "labels"))
    return partial


def finish_round(output_dir: str, r: int, partial: str, record: dict) -> str:
    """Write ``round.json`` last, then rename the partial folder into place."""
    with open(os.path.join(partial, ROUND_FILE), "w") as f:
        json.dump(record, f, indent=2)
    final = round_dir(output_dir, r)
    move_into_place(partial, final, replace_folder=False)  # a complete round is never overwritten
    return final


def write_round_labels(
    pool: ImagePool, labels_dir: str, soft_label_at: Callable[[int, tuple[int, int]], torch.Tensor]
) -> dict[str, str]:
    """Write every case's hard label at its native size; returns case name -> file relative to the round folder.

    ``soft_label_at(i, size)`` gives pool item i's class probabilities (C, *size); hard label = argmax.
    """
    by_case: dict[int, list[tuple[int, int]]] = {}
    for i, item in enumerate(pool.items):
        by_case.setdefault(item.case, []).append((item.slice, i))
    files = {}
    for case_index, members in by_case.items():
        case = pool.cases[case_index]
        slices = [
            soft_label_at(i, pool.items[i].native_shape).argmax(0).to(torch.uint8).numpy() for _, i in sorted(members)
        ]
        path = write_label(case, slices, labels_dir)
        files[case.name] = os.path.relpath(path, os.path.dirname(labels_dir))
    return files


def read_round_uncertainty(output_dir: str, r: int, num_images: int) -> np.ndarray:
    """Per-image mean pixel entropy of a finished round, from its ``uncertainty.csv`` (one row per pool image in
    pool order)."""
    path = os.path.join(round_dir(output_dir, r), "uncertainty.csv")
    with open(path, newline="") as f:
        values = [float(row["mean_pixel_entropy"]) for row in csv.DictReader(f)]
    if len(values) != num_images:
        raise ValueError(f"{path}: {len(values)} rows for a pool of {num_images} images")
    return np.asarray(values)


def read_round_labels(
    output_dir: str, r: int, pool: ImagePool, size: int, out=None, ignore_value: int = 255
) -> torch.Tensor:
    """Training labels (N, size, size) uint8 of a finished round, read back from its files (nearest resizing) into
    ``out`` (default: a new tensor; or a pool_store.DiskArray, filled row by row), with ``ignore_value`` where the
    round's ``ignored_pixels.npy`` (if any) says so."""
    folder = round_dir(output_dir, r)
    with open(os.path.join(folder, ROUND_FILE)) as f:
        files = json.load(f)["label_files"]
    labels = torch.zeros((len(pool), size, size), dtype=torch.uint8) if out is None else out
    cache: tuple[int, list[np.ndarray]] | None = None
    for i, item in enumerate(pool.items):
        case = pool.cases[item.case]
        if cache is None or cache[0] != item.case:
            path = os.path.join(folder, files[case.name])
            cache = (item.case, label_slices(case, read_label(path, case.spatial_shape)))
        grid = torch.as_tensor(np.ascontiguousarray(cache[1][item.slice]), dtype=torch.float32)[None, None]
        labels[i] = F.interpolate(grid, size=(size, size), mode="nearest")[0, 0].to(torch.uint8)
    ignored_path = os.path.join(folder, IGNORED_FILE)
    if os.path.isfile(ignored_path):  # the round's training labels left these pixels out: so does a resumed run
        packed = np.load(ignored_path, allow_pickle=False)
        for i in range(len(pool)):
            mask = np.unpackbits(packed[i], count=size * size).reshape(size, size).astype(bool)
            row = labels[i]
            row[torch.from_numpy(mask)] = ignore_value
            labels[i] = row
    return labels


def write_ignored_pixels(folder: str, labels, ignore_value: int, batch_size: int = 256) -> None:
    """Save which pixels of the training labels (N, S, S) equal ``ignore_value`` (bit-packed, one row per image)
    into a round folder, for ``read_round_labels`` on resume."""
    n = len(labels)
    rows = []
    for start in range(0, n, batch_size):
        chunk = torch.as_tensor(labels[start : start + batch_size]).numpy() == ignore_value
        rows.append(np.packbits(chunk.reshape(len(chunk), -1), axis=1))
    np.save(os.path.join(folder, IGNORED_FILE), np.concatenate(rows) if rows else np.zeros((0, 0), np.uint8))
