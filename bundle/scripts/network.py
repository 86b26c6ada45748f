"""Mask2Former with a DINOv2 backbone, as a plain tensor-in / tensor-out segmentation network.

MONAI inferers, ``ckpt_export``, MONAI Label and MONAI Deploy all expect ``network(x) -> (B, C, H, W)`` scores.
The Hugging Face objects stay inside this wrapper: the rest of the bundle never sees ``ModelOutput``.

DINOv2 emits a single stride-14 token grid, while Mask2Former's pixel decoder wants four scales. A ViTDet-style
simple feature pyramid (two transposed convolutions up, one max-pool down) builds them from the last layer, so mask
logits come out at a quarter of the token stride instead of being stuck at stride 14. The default layout projects the
tokens to the decoder width first and upsamples after (``feature_pyramid="project_first"``): the transposed
convolutions then run at 128 channels instead of DINOv2's 384 (benchmarks/results/speed.json).

With a frozen backbone the token grid of an image never changes, so a round computes it once
(``backbone_tokens``) and trains and predicts the rest from it (``forward_tokens``); both paths give the same output.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os

import torch
from torch import nn
from transformers import Dinov2Config, Mask2FormerConfig, Mask2FormerForUniversalSegmentation
from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_stats(like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) tensors, with ``like``'s dtype and device when given."""
    kw = {"dtype": like.dtype, "device": like.device} if like is not None else {}
    return torch.tensor(IMAGENET_MEAN, **kw).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD, **kw).view(1, 3, 1, 1)


def imagenet_normalize(
    images: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
) -> torch.Tensor:
    """The input normalisation of DINOv2 (ImageNet statistics) for float images (N, 3, H, W) in [0, 1]. A module
    passes its own ``mean``/``std`` buffers (from :func:`imagenet_stats`), so a traced TorchScript model follows
    ``.to(device)``; otherwise they are made on the images' device."""
    if mean is None or std is None:
        mean, std = imagenet_stats(images)
    return (images - mean) / std


FEATURE_PYRAMIDS = ("project_first", "upsample_first")


def bf16_supported(device: torch.device | str) -> bool:
    """Whether the device has native bfloat16 matrix arithmetic (AVX512-BF16/AMX CPUs, Ampere+ GPUs)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def backbone_autocast(device: torch.device | str, enabled: bool = True):
    """bf16 autocast for a DINOv2 forward that computes no gradient, where the device supports it (else a no-op).

    On a CPU with AVX512-BF16 the ViT-S/14 forward runs 1.6x faster with the same argmax; a whole training step in
    bf16 was slower (issue 32), so only the frozen backbone uses it."""
    device = torch.device(device)
    if not (enabled and bf16_supported(device)):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def load_encoder_config(encoder_config: str | os.PathLike | dict | Dinov2Config) -> Dinov2Config:
    """A Dinov2Config from a config object, a dict, a ``config.json`` file or a Hugging Face model folder."""
    if isinstance(encoder_config, Dinov2Config):
        return encoder_config
    if isinstance(encoder_config, dict):
        return Dinov2Config(**{k: v for k, v in encoder_config.items() if k not in ("architectures", "model_type")})
    path = os.fspath(encoder_config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder config not found: {path}")
    with open(path) as f:
        return load_encoder_config(json.load(f))


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group: normalises each (C, H, W) map over C, H and W together, with a per-channel affine.

    Not ViTDet's channel LayerNorm, which normalises over C at each pixel; the name says which one this is. Its
    parameters (``weight``, ``bias`` of size C) and state-dict keys are those of the earlier ``LayerNorm2d``.
    """

    def __init__(self, channels: int):
        super().__init__(1, channels)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet simple feature pyramid on a DINOv2 backbone: one token grid -> four maps at x4, x2, x1, x0.5.

    Looks like a transformers backbone to Mask2Former (``.channels`` and an output with ``.feature_maps``). Its input
    is what Mask2Former was given as ``pixel_values``: images (B, 3, H, W), or the backbone's token grid
    (B, hidden_size, h, w) when the caller computed (or cached) it. ``out_channels``: project the tokens to this width
    before upsampling (cheap); None upsamples at the tokens' own width (the layout of bundles before 0.4.0).
    """

    def __init__(self, backbone: nn.Module, hidden_size: int, out_channels: int | None = None):
        super().__init__()
        if hidden_size == 3:
            raise ValueError("a backbone width of 3 cannot be told apart from RGB images")
        self.backbone = backbone
        self.hidden_size = hidden_size
        c = hidden_size if out_channels is None else out_channels
        self.project = (
            nn.Identity() if out_channels is None else nn.Sequential(nn.Conv2d(hidden_size, c, 1), GroupNorm1(c))
        )
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(c, c, kernel_size=2, stride=2),
            GroupNorm1(c),
            nn.GELU(),
            nn.ConvTranspose2d(c, c, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(c, c, kernel_size=2, stride=2)
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.channels = [c, c, c, c]

    def forward(self, pixel_values: torch.Tensor):
        grid = pixel_values if pixel_values.shape[1] == self.hidden_size else self.tokens(pixel_values)
        grid = self.project(grid)
        maps = (self.up4(grid), self.up2(grid), grid, self.down2(grid))
        return _FeatureMaps(maps)

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's last-layer token grid (B, hidden_size, h, w) of normalised images."""
        return self.backbone(pixel_values).feature_maps[-1]


class _FeatureMaps:
    """The one attribute Mask2Former reads from a backbone output."""

    def __init__(self, feature_maps):
        self.feature_maps = feature_maps


class Mask2FormerDinov2(nn.Module):
    """Mask2Former (transformers) + DINOv2 backbone; input (B, 3, H, W) in [0, 1], output (B, C, H, W) log-probabilities.

    The output is the log of Mask2Former's semantic map (sum over queries of class probability times sigmoid mask),
    renormalised over classes, so ``softmax(output)`` is that per-class probability map: losses, argmax and the
    pixel entropy of METHOD.md all read the same numbers. H and W must be multiples of the patch size (14).

    Args:
        num_classes: C, background included.
        encoder_config: Dinov2Config, dict, config.json path or HF model folder (architecture only).
        encoder_weights: optional HF Dinov2 folder whose weights initialise the backbone (each round starts here).
        num_queries, decoder_layers, hidden_dim, pixel_decoder_layers: Mask2Former size; small values keep CPU
            runs practical.
        feature_pyramid: "project_first" (tokens projected to ``hidden_dim`` before upsampling) or
            "upsample_first" (upsampled at the backbone width: networks written before 0.4.0).
        mask_loss_points: points per mask that Mask2Former's set loss samples (its default 12544); training only.
    """

    def __init__(
        self,
        num_classes: int,
        encoder_config,
        encoder_weights: str | os.PathLike | None = None,
        num_queries: int = 16,
        decoder_layers: int = 4,
        hidden_dim: int = 128,
        pixel_decoder_layers: int = 2,
        num_heads: int = 4,
        feature_pyramid: str = "project_first",
        mask_loss_points: int = 12544,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
        if feature_pyramid not in FEATURE_PYRAMIDS:
            raise ValueError(f"feature_pyramid must be one of {FEATURE_PYRAMIDS}, got {feature_pyramid!r}")
        enc_cfg = load_encoder_config(encoder_config)
        backbone_cfg = Dinov2Config(
            **{**enc_cfg.to_dict(), "out_features": [f"stage{enc_cfg.num_hidden_layers}"], "out_indices": None}
        )
        m2f_cfg = _mask2former_config(
            backbone_config=backbone_cfg,
            num_labels=num_classes,
            num_queries=num_queries,
            decoder_layers=decoder_layers,
            hidden_dim=hidden_dim,
            feature_size=hidden_dim,
            mask_feature_size=hidden_dim,
            encoder_layers=pixel_decoder_layers,
            encoder_feedforward_dim=4 * hidden_dim,
            dim_feedforward=4 * hidden_dim,
            num_attention_heads=num_heads,
            train_num_points=mask_loss_points,
        )
        self.num_classes = num_classes
        self.patch_size = enc_cfg.patch_size
        self.mask2former = Mask2FormerForUniversalSegmentation(m2f_cfg)
        pixel_module = self.mask2former.model.pixel_level_module
        out_channels = hidden_dim if feature_pyramid == "project_first" else None
        pixel_module.encoder = SimpleFeaturePyramid(pixel_module.encoder, enc_cfg.hidden_size, out_channels)
        # The pixel decoder was sized for one backbone map; rebuild it for the pyramid's four, initialised the
        # way transformers initialises it.
        pixel_module.decoder = Mask2FormerPixelDecoder(m2f_cfg, feature_channels=pixel_module.encoder.channels)
        pixel_module.decoder.apply(self.mask2former._init_weights)
        if encoder_weights is not None:
            self.load_encoder_weights(encoder_weights)
        mean, std = imagenet_stats()  # buffers: a traced model.ts moves them with .to(device)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    backbone_bf16 = False  # set by network_from_file for inference; not a constructor argument, not in network.json

    @property
    def backbone(self) -> nn.Module:
        return self.mask2former.model.pixel_level_module.encoder.backbone

    def load_encoder_weights(self, encoder_weights: str | os.PathLike) -> None:
        """Initialise the DINOv2 backbone from a Hugging Face Dinov2Model folder (Dinov2Model and Dinov2Backbone
        share parameter names: embeddings, encoder, layernorm)."""
        from transformers import Dinov2Model

        state = Dinov2Model.from_pretrained(os.fspath(encoder_weights)).state_dict()
        missing, _ = self.backbone.load_state_dict(state, strict=False)
        if missing:
            raise RuntimeError(f"encoder weights in {encoder_weights} lack backbone parameters: {missing[:5]}")

    @property
    def pyramid(self) -> SimpleFeaturePyramid:
        return self.mask2former.model.pixel_level_module.encoder

    def _check_size(self, h: int, w: int) -> None:
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}")

    def backbone_tokens(self, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """The token grid (B, D, H/14, W/14) of images (B, 3, H, W) in [0, 1] that ``forward_tokens`` reads, in
        float32; ``bf16`` runs the backbone under bf16 autocast where the device supports it."""
        self._check_size(*x.shape[-2:])
        with backbone_autocast(x.device, bf16):
            return self.pyramid.tokens(imagenet_normalize(x, self.mean, self.std)).float()

    def forward(self, x: torch.Tensor, with_queries: bool = False):
        """Log-probabilities (B, C, H, W); ``with_queries`` also returns Mask2Former's per-query outputs of the same
        pass (with the auxiliary layers), which its set loss reads (losses.py), as ``(log_probs, outputs)``.

        With ``backbone_bf16`` set (inference.json, evaluate.json) a forward that computes no gradient runs the
        backbone under bf16 autocast where the device supports it and the head in float32; training and TorchScript
        tracing (model.ts stays float32, portable) keep float32 throughout."""
        self._check_size(*x.shape[-2:])
        if self.backbone_bf16 and not torch.is_grad_enabled() and not torch.jit.is_tracing():
            return self._segment(self.backbone_tokens(x, bf16=True), x.shape[-2:], with_queries)
        return self._segment(imagenet_normalize(x, self.mean, self.std), x.shape[-2:], with_queries)

    def forward_tokens(self, grid: torch.Tensor, with_queries: bool = False):
        """``forward`` of the images whose ``backbone_tokens`` are ``grid``: the backbone is not run."""
        size = (grid.shape[-2] * self.patch_size, grid.shape[-1] * self.patch_size)
        return self._segment(grid, size, with_queries)

    def _segment(self, pixel_values: torch.Tensor, size, with_queries: bool = False):
        h, w = size
        out = self.mask2former(pixel_values=pixel_values, output_auxiliary_logits=with_queries)
        class_probs = out.class_queries_logits.softmax(dim=-1)[..., :-1]  # drop the "no object" class
        mask_probs = out.masks_queries_logits.sigmoid()
        semantic = torch.einsum("bqc,bqhw->bchw", class_probs, mask_probs)
        semantic = nn.functional.interpolate(semantic, size=(h, w), mode="bilinear", align_corners=False)
        semantic = semantic.clamp_min(1e-6)
        log_probs = torch.log(semantic / semantic.sum(dim=1, keepdim=True))
        return (log_probs, out) if with_queries else log_probs


class WithQueryOutputs(nn.Module):
    """The network as a trainer sees it: ``(log_probs, per-query outputs)`` of one pass, from images or, with
    ``tokens``, from cached token grids; so the set loss is computed from the outputs it is given, and DDP wraps the
    module whose forward the loss differentiates."""

    def __init__(self, network: Mask2FormerDinov2, tokens: bool = False):
        super().__init__()
        self.network = network
        self.tokens = tokens

    def forward(self, x: torch.Tensor):
        return (self.network.forward_tokens if self.tokens else self.network)(x, with_queries=True)


def _mask2former_config(**kwargs) -> Mask2FormerConfig:
    """Mask2FormerConfig without its warning that only Swin backbones are "supported": the feature pyramid above is
    what makes a DINOv2 backbone fit."""
    logger = logging.getLogger("transformers.models.mask2former.configuration_mask2former")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return Mask2FormerConfig(**kwargs)
    finally:
        logger.setLevel(level)


def network_from_file(path: str | os.PathLike, backbone_bf16: bool = False) -> Mask2FormerDinov2:
    """The network a run trained, rebuilt from the ``models/network.json`` it wrote (architecture only; load
    ``models/model.pt`` into it). Used by ``network_def`` in inference.json and evaluate.json. The keys that describe
    the model rather than build it (``scripts.model_files.RECORD_KEYS``: training size, class names, run, swapped
    pool_transforms, which are warned about) are left out.
    ``backbone_bf16``: its gradient-free forwards run the backbone under bf16 autocast where supported (``forward``).
    """
    from .model_files import RECORD_KEYS, preprocessing_warning

    with open(path) as f:
        spec = json.load(f)
    warning = preprocessing_warning(spec, path)
    if warning:
        logger.warning("%s", warning)
    spec = {k: v for k, v in spec.items() if k not in RECORD_KEYS}
    spec.setdefault("feature_pyramid", "upsample_first")  # network.json of bundles before 0.4.0
    target = spec.pop("_target_", None)  # a subclass that the run's network_def named
    if target is None:
        network = Mask2FormerDinov2(**spec)
    else:
        module, _, name = target.rpartition(".")
        network = getattr(importlib.import_module(module), name)(**spec)
    network.backbone_bf16 = bool(backbone_bf16)
    return network
