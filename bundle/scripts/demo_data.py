"""A GENERATED demo set for the bare bundle command: textured "tissue" with one blob-shaped "lesion" per image,
except every ``EMPTY_EVERY``-th pool image, which shows tissue only (empty mask): absence is a valid answer.

It exists so that ``python -m monai.bundle run --config_file configs/medsmile.json`` works offline on a fresh
machine with no data. It is synthetic, not medical data, and says so in its folder name and in the run summary.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

DEMO_NOTE = "generated demo data (synthetic textured images with one blob each, every 4th without), not medical images"
EMPTY_EVERY = 4  # pool images demo_004, demo_008, ... show no blob (the reference always shows one)


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.random((size // scale + 2, size // scale + 2))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def demo_image(rng: np.random.Generator, size: int = 160, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image (size, size, 3) and its binary mask: pinkish tissue, a darker red blob (none, and an
    empty mask, when ``lesion`` is false; the random draws are the same either way)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    ry, rx = rng.uniform(0.12, 0.25, 2) * size
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    wobble = 1 + 0.15 * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 6))
    mask = ((u**2 + v**2) < wobble**2) & lesion
    tissue = np.stack([0.85, 0.55, 0.5]) * (0.7 + 0.3 * _smooth_noise(rng, size, 8))[..., None]
    lesion = np.stack([0.6, 0.2, 0.2]) * (0.6 + 0.4 * _smooth_noise(rng, size, 4))[..., None]
    image = np.where(mask[..., None], lesion, tissue) + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask.astype(np.uint8)


# colours of the structures of a multi-class demo (class 1, 2, ...): dark red, pale blue, yellow
STRUCTURE_COLOURS = ((0.6, 0.2, 0.2), (0.35, 0.55, 0.9), (0.9, 0.85, 0.3))


def demo_image_classes(rng: np.random.Generator, size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image and its label map 0..num_classes-1: tissue with one ellipse per structure class, each in
    its own vertical band (no overlap), each its own colour."""
    if not 3 <= num_classes <= len(STRUCTURE_COLOURS) + 1:
        raise ValueError(f"num_classes={num_classes}: the multi-class demo has 3 to {len(STRUCTURE_COLOURS) + 1}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.stack([0.85, 0.55, 0.5]) * (0.7 + 0.3 * _smooth_noise(rng, size, 8))[..., None]
    label = np.zeros((size, size), np.uint8)
    band = size / (num_classes - 1)
    for c in range(1, num_classes):
        cx = (c - 1 + rng.uniform(0.4, 0.6)) * band
        cy = rng.uniform(0.35, 0.65) * size
        rx, ry = rng.uniform(0.25, 0.4) * band, rng.uniform(0.12, 0.25) * size
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        label[inside] = c
        texture = 0.6 + 0.4 * _smooth_noise(rng, size, 4)
        image = np.where(inside[..., None], np.stack(STRUCTURE_COLOURS[c - 1]) * texture[..., None], image)
    image = image + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), label


def make_demo_data(folder: str, num_images: int = 24, size: int = 160, seed: int = 0, num_classes: int = 2) -> dict:
    """Write ``images/``, ``masks/`` (0/255 PNG; with ``num_classes`` > 2 label maps 0..C-1 of C-1 structures) and
    ``reference`` paths under ``folder`` (idempotent)."""
    info_path = os.path.join(folder, "demo.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info.get("num_classes", 2) != num_classes:
            raise ValueError(f"{folder} holds a {info.get('num_classes', 2)}-class demo, not {num_classes}")
        return info
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "reference"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i in range(num_images + 1):
        if num_classes == 2:
            image, mask = demo_image(rng, size, lesion=i == 0 or i % EMPTY_EVERY != 0)
        else:
            image, mask = demo_image_classes(rng, size, num_classes)
        sub, name = ("reference", "reference") if i == 0 else ("images", f"demo_{i:03d}")
        Image.fromarray(image).save(os.path.join(folder, sub, f"{name}.png"))
        mask_dir = "reference" if i == 0 else "masks"
        mask_name = "reference_label" if i == 0 else name
        Image.fromarray(mask * 255 if num_classes == 2 else mask).save(
            os.path.join(folder, mask_dir, f"{mask_name}.png")
        )
    info = {
        "note": DEMO_NOTE,
        "dataset_dir": os.path.join(folder, "images"),
        "label_dir": os.path.join(folder, "masks"),
        "reference_image": os.path.join(folder, "reference", "reference.png"),
        "reference_label": os.path.join(folder, "reference", "reference_label.png"),
        **({"num_classes": num_classes} if num_classes != 2 else {}),
    }
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    return info
