"""Frozen-backbone token cache: each image's DINOv2 token grid computed once per run, not at every training step.

With ``freeze_backbone`` the backbone of every round is the same pretrained (or fine-tuned) DINOv2, so an image's
tokens never change; recomputing them at each epoch and again at prediction was a quarter to a half of a round's CPU
time (issue 32). The default training transforms (medsmile.json's ``train_transforms``, the "flips" preset) mirror
images, and the tokens of a mirrored image are not the mirrored tokens, so each image keeps four token grids, one per
mirrored view (``TOKEN_VIEWS``), stored as float16. Training draws the mirroring as the image path does and takes the
matching view (``token_training_transform``); prediction reads the identity view, or all four for flip-averaged
predictions (``TokenHead``). A list with transforms that change pixels (the "strong" preset) still runs the ViT.
"""

from __future__ import annotations

import torch
from monai.transforms import Compose, Lambdad, MapTransform, RandFlipd, Randomizable
from torch import nn

from .inferers import DEFAULT_FLIPS, mean_of_flipped_views

# identity, then the mirrorings of the "flips" augmentation: index = 2 * (rows mirrored) + (columns mirrored)
TOKEN_VIEWS: tuple[tuple[int, ...], ...] = ((), *DEFAULT_FLIPS)
VIEW_KEY = "token_view"  # a training item's chosen view while its flips are drawn


@torch.no_grad()
def fill_token_views(network, images, out, batch_size: int = 8, bf16: bool = False, device=None) -> None:
    """Write the token grids of every mirrored view of ``images`` (N, 3, S, S) uint8 into ``out``
    (N, len(TOKEN_VIEWS), D, S/14, S/14) float16 (a tensor or a pool_store.DiskArray), ``batch_size`` images at a
    time; ``network`` is a Mask2FormerDinov2 (its ``backbone_tokens``), ``bf16`` as there."""
    device = device or next(network.parameters()).device
    was_training = network.training
    network.eval()
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device).float() / 255.0
            views = [network.backbone_tokens(x.flip(dims) if dims else x, bf16=bf16) for dims in TOKEN_VIEWS]
            out[start : start + len(x)] = torch.stack(views, dim=1).to(torch.float16).cpu()
    finally:
        network.train(was_training)


class RandTokenFlipd(Randomizable, MapTransform):
    """``RandFlipd`` for an item whose image is cached token views: with probability ``prob`` the label is mirrored
    along ``spatial_axis`` (0: rows, 1: columns) and the item's chosen view (``VIEW_KEY``) switches to the mirrored
    one. Drawn as RandFlipd draws, so a seeded pair of them mirrors exactly as the image path's pair would."""

    def __init__(self, spatial_axis: int, prob: float = 0.5, label_key: str = "label"):
        MapTransform.__init__(self, [label_key])
        if spatial_axis not in (0, 1):
            raise ValueError(f"spatial_axis must be 0 or 1 for 2-D items, got {spatial_axis}")
        self.spatial_axis, self.prob, self.label_key = spatial_axis, prob, label_key
        self._do_transform = False

    def randomize(self, data=None) -> None:
        self._do_transform = self.R.rand() < self.prob

    def __call__(self, data: dict) -> dict:
        self.randomize()
        d = dict(data)
        if self._do_transform:
            d[self.label_key] = torch.as_tensor(d[self.label_key]).flip(self.spatial_axis - 2)
            d[VIEW_KEY] = d.get(VIEW_KEY, 0) ^ (2 if self.spatial_axis == 0 else 1)
        return d


class SelectTokenViewd(MapTransform):
    """The item's image (V, D, h, w) float16 token views -> the chosen view's (D, h, w) float32 grid."""

    def __init__(self, image_key: str = "image"):
        super().__init__([image_key])
        self.image_key = image_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        d[self.image_key] = torch.as_tensor(d[self.image_key][d.pop(VIEW_KEY, 0)]).float()
        return d


def token_flips(transforms, name: str = "train_transforms") -> list[RandTokenFlipd]:
    """The ``RandTokenFlipd`` twins of a training-transform list (``training.training_transform``'s argument) made
    only of ``RandFlipd`` over spatial axis 0 or 1 of both image and label: the same probabilities in the same order,
    so the same random draws. Any other item changes pixels or flips something else, so it needs the ViT: refused
    with a ValueError that names it (``name``#index and its class)."""
    from .training import build_transforms

    flips = []
    for i, t in enumerate(build_transforms(transforms)):
        axis = getattr(getattr(t, "flipper", None), "spatial_axis", None)
        axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        if type(t) is not RandFlipd or set(t.keys) != {"image", "label"} or axis not in (0, 1):
            raise ValueError(
                f"{name}#{i} ({type(t).__name__}) is not a RandFlipd over spatial axis 0 or 1 of image and label, "
                "the only transform that cached backbone tokens can replay"
            )
        flips.append(RandTokenFlipd(spatial_axis=axis, prob=t.prob))
    return flips


def uncacheable_reason(transforms, name: str = "train_transforms") -> str:
    """Why ``transforms`` cannot run from cached token views (``token_flips``' refusal), or "" when they can."""
    try:
        token_flips(transforms, name)
    except ValueError as err:
        return str(err)
    return ""


def token_training_transform(transforms=None) -> Compose:
    """A training-transform list of flips only (``token_flips``; default: medsmile.json's ``train_transforms``) on
    cached token views: the same random draws, the label mirrored alike, the image replaced by the matching view."""
    from .training import bundle_default

    flips = token_flips(bundle_default("train_transforms") if transforms is None else transforms)
    return Compose([Lambdad(keys="label", func=lambda x: torch.as_tensor(x).long()), *flips, SelectTokenViewd()])


class TokenHead(nn.Module):
    """The network's prediction from cached token grids (``Mask2FormerDinov2.forward_tokens``), for an evaluator.

    Input (B, D, h, w): one view. Input (B, V, D, h, w) with the views of ``TOKEN_VIEWS``: the mean class
    probability of the views, each mirrored back (as ``FlipAveragingInferer`` on images), as log-probabilities."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim == 4:
            return self.network.forward_tokens(tokens)
        if tokens.shape[1] != len(TOKEN_VIEWS):
            raise ValueError(f"expected {len(TOKEN_VIEWS)} token views in dim 1, got shape {tuple(tokens.shape)}")
        return mean_of_flipped_views(
            [(dims, self.network.forward_tokens(tokens[:, v])) for v, dims in enumerate(TOKEN_VIEWS)]
        )
