"""Uncertainty-guided KNN refinement of one round's pseudo-labels (docs/METHOD.md, "Rounds", steps 3-4)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .knn_index import build_index, search


def mean_pixel_entropy(probs: torch.Tensor) -> torch.Tensor:
    """U = mean over pixels of -sum_c p_c log p_c, for class probabilities (B, C, H, W) -> (B,). 0 log 0 = 0."""
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-12).log(), torch.zeros_like(probs))
    return -plogp.sum(dim=1).flatten(1).mean(dim=1)


def most_certain(uncertainty: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (ascending) of the ceil(fraction * N) images of lowest uncertainty; ties broken by index.

    Why: on one-label pools the per-image mean entropy ranks label quality (Kvasir round 0: Dice 0.59 for the
    certain half vs 0.40 for the rest), so a round that trains on the certain part learns from cleaner labels
    and still predicts every image (reliable-image selection, ST++, Yang et al., CVPR 2022).
    """
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    keep = max(1, math.ceil(len(uncertainty) * fraction))
    return np.sort(np.argsort(uncertainty, kind="stable")[:keep])


def mark_uncertain_pixels(labels: torch.Tensor, soft: torch.Tensor, fraction: float, ignore_value: int = 255):
    """Set ``ignore_value`` in ``labels`` (B, H, W) at the least certain ``fraction`` of each image's pixels of each
    class, by the margin between the two most probable classes of the soft label (B, C, H, W); returns ``labels``
    (changed in place).

    Why: a prototype or network pseudo-label is wrong mostly where its classes are close; training on those pixels
    copies the noise (FINDINGS.md: ignoring the 50 % smallest-margin pixels raised one round's Kvasir test Dice from
    0.32 to 0.37). Per class, not per image: the foreground is the low-margin class of a prototype map, and an
    image-wide cut left out 63 % of it and a whole lesion in 5 % of a Kvasir pool; that round learnt to predict
    background (pool Dice 0.37 -> 0.12, benchmarks/README.md). Per image and class, ``int(fraction * n_c)`` of its n_c
    pixels; ties broken by pixel order (deterministic).
    """
    if fraction <= 0:
        return labels
    top2 = soft.float().topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).flatten(1)  # (B, H*W)
    flat = labels.view(len(labels), -1)
    ignored = torch.zeros_like(margin, dtype=torch.bool)
    for c in torch.unique(flat).tolist():
        members = flat == c
        count = (members.sum(1) * fraction).long()  # (B,)
        order = torch.argsort(margin.masked_fill(~members, float("inf")), dim=1, stable=True)
        first = torch.arange(margin.shape[1], device=margin.device)[None] < count[:, None]  # in sorted order
        ignored |= torch.zeros_like(first).scatter_(1, order, first)
    flat[ignored] = ignore_value
    return labels


@dataclass
class RefinementPlan:
    """Who is uncertain, their neighbours among the certain images, and the neighbour weights."""

    threshold: float
    uncertain: np.ndarray  # indices into the pool, ascending
    neighbours: np.ndarray  # (len(uncertain), K) pool indices of certain images, -1 where fewer than K exist
    weights: np.ndarray  # (len(uncertain), K) max(0, cosine), 0 where no neighbour


def plan_refinement(
    uncertainty: np.ndarray, global_features: np.ndarray, quantile: float = 0.9, k: int = 5, exact_limit: int = 50_000
) -> RefinementPlan:
    """Images with U >= quantile(U, q) are uncertain; each gets its K nearest certain images by inner product on
    L2-normalised global features (exact faiss IndexFlatIP up to ``exact_limit`` certain images, IVF past it; see
    knn_index.py), weighted by max(0, cos)."""
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    feats = np.ascontiguousarray(global_features, dtype=np.float32)
    threshold = float(np.quantile(uncertainty, quantile))
    uncertain_mask = uncertainty >= threshold
    if uncertain_mask.all() and len(uncertainty) > 1:
        # all tied at the threshold (e.g. an untrained network): keep the intended share, ranked, ties by index
        order = np.argsort(-uncertainty, kind="stable")
        uncertain_mask = np.zeros(len(uncertainty), dtype=bool)
        uncertain_mask[order[: max(1, math.ceil(len(uncertainty) * (1 - quantile)))]] = True
    uncertain = np.flatnonzero(uncertain_mask)
    certain = np.flatnonzero(~uncertain_mask)
    neighbours = np.full((len(uncertain), k), -1, dtype=np.int64)
    weights = np.zeros((len(uncertain), k), dtype=np.float32)
    if len(uncertain) and len(certain):
        sims, idx = search(build_index(feats[certain], exact_limit=exact_limit), feats[uncertain], k)
        found = idx >= 0  # fewer than k certain images (or an approximate index's short list): stays -1, weight 0
        neighbours[found] = certain[idx[found]]
        weights[found] = np.maximum(sims[found], 0.0)
    return RefinementPlan(threshold, uncertain, neighbours, weights)


def refine_soft_label(neighbour_labels: torch.Tensor, weights: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """Weighted mean of the neighbours' one-hot labels: (K, H, W) ints and (K,) weights -> (C, H, W) soft map.

    Returns None when every weight is zero (no neighbour is similar at all): the raw label is kept then.
    """
    total = float(weights.sum())
    if total <= 0:
        return None
    onehot = torch.nn.functional.one_hot(neighbour_labels.long(), num_classes).permute(0, 3, 1, 2).float()
    return torch.einsum("k,kchw->chw", weights.float(), onehot) / total
