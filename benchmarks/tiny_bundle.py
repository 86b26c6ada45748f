"""A tiny random-init DINOv2 and small generated images for check scripts (monailabel_check, hostile_inputs).

Check scripts run where pytest is not installed (the MONAI Label venv, a user's machine), so they must not import
the tests: this module holds what they need from ``tests/conftest.py`` (same encoder, sizes and images).
"""

from __future__ import annotations

import os

import numpy as np

# network and training sizes that keep an end-to-end run to a few seconds on 2 CPU cores (as tests/conftest.py)
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


def make_tiny_encoder(path: str) -> str:
    """A random-init DINOv2 (hidden 32, 2 layers) saved as a Hugging Face folder at ``path``."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56
    )
    Dinov2Model(config).save_pretrained(path)
    return path


def blob_image(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image with a dark disc on a bright noisy background, and its 0/1 mask."""
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    r = rng.uniform(0.15, 0.3) * min(height, width)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
    image = np.where(mask[..., None], [60, 30, 30], [220, 180, 170]) + rng.normal(0, 10, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8)


def write_blob_dataset(root: str, sizes, seed: int = 0) -> dict:
    """``root/images/img_<i>.png`` of the given (height, width) sizes and a reference with its 0/255 mask."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(blob_image(rng, h, w)[0]).save(os.path.join(images, f"img_{i}.png"))
    ref_image, ref_mask = blob_image(rng, 48, 64)
    os.makedirs(os.path.join(root, "reference"), exist_ok=True)
    Image.fromarray(ref_image).save(os.path.join(root, "reference", "ref.png"))
    Image.fromarray(ref_mask * 255).save(os.path.join(root, "reference", "ref_mask.png"))
    return {
        "dataset_dir": images,
        "reference_image": os.path.join(root, "reference", "ref.png"),
        "reference_label": os.path.join(root, "reference", "ref_mask.png"),
    }
