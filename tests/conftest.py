"""Shared fixtures: a tiny random-init DINOv2 encoder and tiny generated datasets (no real data, no hub)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

BUNDLE_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")

# network and training sizes that keep an end-to-end run to a few seconds on 2 CPU cores
TINY_OVERRIDES = {
    "feature_image_size": 56,
    "feature_layers": [-3, -1],  # the tiny encoder has 2 layers: embeddings + last
    "image_size": 56,
    "epochs": 1,
    "min_iterations": 0,
    "num_rounds": 2,
    "hidden_dim": 32,
    "num_queries": 4,
    "decoder_layers": 1,
    "pixel_decoder_layers": 1,
    "batch_size": 4,
    "uncertainty_quantile": 0.5,
}


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A random-init DINOv2 (hidden 32, 2 layers) saved as a Hugging Face folder."""
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56
    )
    path = tmp_path_factory.mktemp("tiny_dinov2")
    Dinov2Model(config).save_pretrained(path)
    return str(path)


def blob_image(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image with a dark disc on a bright noisy background, and its 0/1 mask."""
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    r = rng.uniform(0.15, 0.3) * min(height, width)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
    image = np.where(mask[..., None], [60, 30, 30], [220, 180, 170]) + rng.normal(0, 10, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8)


@pytest.fixture
def png_dataset(tmp_path) -> dict:
    """6 unlabelled PNGs of different sizes + a reference image and 0/255 mask, in separate folders."""
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    sizes = [(40, 60), (50, 50), (64, 48), (30, 70), (56, 56), (45, 52)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(blob_image(rng, h, w)[0]).save(images / f"img_{i}.png")
    ref_image, ref_mask = blob_image(rng, 48, 64)
    (tmp_path / "reference").mkdir()
    Image.fromarray(ref_image).save(tmp_path / "reference" / "ref.png")
    Image.fromarray(ref_mask * 255).save(tmp_path / "reference" / "ref_mask.png")
    inputs = {
        "dataset_dir": str(images),
        "reference_image": str(tmp_path / "reference" / "ref.png"),
        "reference_label": str(tmp_path / "reference" / "ref_mask.png"),
    }
    return {
        **inputs,
        "inputs": inputs,  # the pipeline arguments, to pass as **png_dataset["inputs"]
        "sizes": {f"img_{i}": s for i, s in enumerate(sizes)},
        "root": tmp_path,
    }
