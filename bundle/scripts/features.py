"""DINOv2 features for round 0 and the KNN refinement: L2-normalised patch tokens and a global image feature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Dinov2Model

from .network import IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def dinov2_features(encoder: Dinov2Model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch tokens (B, D, h, w) and global features (B, D) of images (B, 3, H, W) in [0, 1], both L2-normalised.

    Patch tokens are ``last_hidden_state[:, 1:]`` after DINOv2's final norm (``x_norm_patchtokens``); the global
    feature is the class token of the same layer. H and W must be multiples of the patch size.
    """
    patch = encoder.config.patch_size
    b, _, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"feature input {h}x{w} is not a multiple of the patch size {patch}")
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    tokens = encoder(pixel_values=(images - mean) / std).last_hidden_state
    skip = 1 + getattr(encoder.config, "num_register_tokens", 0)
    grid = tokens[:, skip:].reshape(b, h // patch, w // patch, -1).permute(0, 3, 1, 2)
    return F.normalize(grid, dim=1), F.normalize(tokens[:, 0], dim=1)
