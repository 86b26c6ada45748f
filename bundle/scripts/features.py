"""DINOv2 features for round 0 and the KNN refinement: L2-normalised patch tokens and a global image feature."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import Dinov2Model

from .network import backbone_autocast, imagenet_normalize


@torch.no_grad()
def dinov2_features(
    encoder: Dinov2Model,
    images: torch.Tensor,
    layers: Sequence[int] = (-1,),
    flip_average: bool = False,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features (B, len(layers) * D, h, w) and global features (B, D) of images (B, 3, H, W) in [0, 1].

    Each layer's tokens go through DINOv2's final norm and are L2-normalised (layer -1 is ``x_norm_patchtokens``,
    the paper's feature); with ``flip_average`` the tokens of the mirrored image, mirrored back, are averaged in.
    Several layers are concatenated and the result L2-normalised again, so cosine similarity stays the metric.
    Why: on Kvasir pools the last layer alone over-segments (fg precision 0.37); mid layers add local appearance
    and flip averaging removes the patch-grid jitter (benchmarks/results/round0_variants.md). The global feature is
    the last layer's class token. H and W must be multiples of the patch size. ``bf16``: the encoder runs under
    bf16 autocast where the device supports it (``network.backbone_autocast``); the features stay float32.
    """
    patch = encoder.config.patch_size
    b, _, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"feature input {h}x{w} is not a multiple of the patch size {patch}")
    depth = encoder.config.num_hidden_layers
    bad = [layer for layer in layers if not -depth - 1 <= layer <= depth]
    if bad or not layers:
        raise ValueError(f"feature layers {list(layers)} must be hidden-state indices in -{depth + 1}..{depth}")
    x = imagenet_normalize(images)
    views = (x, x.flip(-1)) if flip_average else (x,)
    skip = 1 + getattr(encoder.config, "num_register_tokens", 0)
    grids, global_feature = 0, None
    for v, view in enumerate(views):
        with backbone_autocast(images.device, bf16):
            out = encoder(pixel_values=view, output_hidden_states=list(layers) != [-1])
        if global_feature is None:
            global_feature = F.normalize(out.last_hidden_state[:, 0].float(), dim=1)
        per_layer = []
        for layer in layers:
            if layer == -1:
                tokens = out.last_hidden_state.float()
            else:
                tokens = encoder.layernorm(out.hidden_states[layer].float())
            grid = tokens[:, skip:].reshape(b, h // patch, w // patch, -1).permute(0, 3, 1, 2)
            grid = F.normalize(grid, dim=1)
            per_layer.append(grid.flip(-1) if v else grid)
        grids = grids + torch.stack(per_layer, 1)
    grids = F.normalize(grids, dim=2).flatten(1, 2)  # average over views per layer, then concatenate layers
    return F.normalize(grids, dim=1), global_feature
