"""Nearest-neighbour index on L2-normalised global features that stays exact while the pool is small and switches
to an approximate faiss index once exact search would dominate a round (issue 6).

Inner product on unit vectors is cosine similarity, so every index here uses ``METRIC_INNER_PRODUCT`` and returns
cosines, exactly what ``plan_refinement`` turns into neighbour weights. Callers normalise the features (and queries).

* ``flat`` (``IndexFlatIP``): exact, no training, one BLAS matrix product per query batch. Its cost is
  O(n_queries * n * d); with ~10 % of the pool as queries it grows with n^2, which is why it is only the default up to
  ``exact_limit`` vectors (50,000: a few seconds single-threaded, see ``benchmarks/results_knn.md``).
* ``ivf`` (``IVF{nlist},Flat``): the default past ``exact_limit``. k-means (spherical, as faiss does for inner
  product) splits the vectors into ``nlist`` ~ 4 sqrt(n) lists, faiss's own rule of thumb; a query scans the
  ``nprobe`` lists with the closest centroids, about nprobe / nlist of the data. Vectors are stored uncompressed, so
  the similarities it returns are exact cosines and only the candidate set is approximate. It built in 83 s on
  one core at 9 x 10^5 and is reproducible (seeded training sample, faiss's fixed k-means seed).
* ``hnsw`` (``HNSW{M}``): graph index, needs no training and searched fastest on clustered data, but its build is
  ~M * efConstruction distance evaluations per vector (>= 4 min single-threaded for 9 x 10^5 vectors, IVF: 83 s),
  it costs an extra ~2 M neighbour ids per vector, a multi-threaded build is not reproducible, and with
  ef_search=64 its recall@5 fell below IVF's in the benchmark (0.85 at 4.5 x 10^5). Offered as the alternative.

IVF's recall depends on ``nprobe`` and on how the data cluster: on wide, unstructured clusters nprobe=16 gave
recall@5 0.60 at 10^5 (nprobe=64: 0.98, slower than exact search there). Check recall against ``kind="flat"`` on real
features before relying on it; raising ``exact_limit`` is the safe fix below ~10^5.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

KINDS = ("auto", "flat", "ivf", "hnsw")
IVF_NPROBE = 16  # lists an IVF query scans; benchmarks/knn.py sweeps it by setting ``index.nprobe`` afterwards
HNSW_EF_SEARCH = 64  # candidates an HNSW search keeps; benchmarks/knn.py sets ``index.hnsw.efSearch`` afterwards
_MIN_POINTS_PER_LIST = 39  # faiss k-means warns (and clusters poorly) below 39 training points per centroid


def _as_float32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (n, d) array, got shape {x.shape}")
    return x


def default_nlist(n: int) -> int:
    """~4 sqrt(n) lists, but never fewer than 39 training points per list (and at least one list)."""
    return max(1, min(round(4 * math.sqrt(n)), n // _MIN_POINTS_PER_LIST))


def build_index(
    features: np.ndarray,
    exact_limit: int = 50_000,
    kind: str = "auto",
    nlist: int | None = None,
    hnsw_m: int = 32,
) -> faiss.Index:
    """Index the (n, d) L2-normalised ``features`` for inner-product search; row i gets id i.

    ``kind="auto"`` (what the pipeline uses; only ``exact_limit`` is a config key, ``knn_exact_limit``): exact
    ``IndexFlatIP`` for n <= ``exact_limit``, IVF-Flat past it. ``"flat"``, ``"ivf"``, ``"hnsw"`` force one, for
    benchmarks/knn.py and the tests. IVF: ``nlist`` lists (default ``default_nlist(n)``), k-means trained on a seeded
    random sample of 39 * nlist vectors (faiss's minimum per centroid: training is the dominant build cost),
    ``IVF_NPROBE`` lists scanned per query. HNSW: ``hnsw_m`` links per node, ``HNSW_EF_SEARCH`` candidates kept while
    searching (faiss uses max(efSearch, k)). Both search-time knobs are attributes of the returned index.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    x = _as_float32(features)
    n, d = x.shape
    if kind == "auto":
        kind = "flat" if n <= exact_limit else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        if n == 0:
            raise ValueError("an IVF index needs training vectors")
        nlist = default_nlist(n) if nlist is None else int(nlist)
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        n_train = min(n, _MIN_POINTS_PER_LIST * nlist)
        sample = x if n_train == n else x[np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))]
        index.train(sample)
        index.nprobe = min(IVF_NPROBE, nlist)
    else:
        index = faiss.index_factory(d, f"HNSW{hnsw_m}", faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
    index.add(x)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product: (m, k) float32 similarities, best first, and (m, k) int64 ids.

    Slots without a result (k > index.ntotal, or an approximate index that found fewer than k candidates) always
    hold id -1 and similarity -inf, at the end of the row, whatever the index kind: faiss itself fills them with
    -3.4e38 (flat) or other sentinels, and a -1 id must never be used to index an array (it would pick the last row).
    """
    q = _as_float32(queries)
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dimension {q.shape[1]}, the index {index.d}")
    if k <= 0 or len(q) == 0 or index.ntotal == 0:
        return np.full((len(q), max(k, 0)), -np.inf, dtype=np.float32), np.full((len(q), max(k, 0)), -1, np.int64)
    sims, ids = index.search(q, k)
    ids = ids.astype(np.int64, copy=False)
    sims[ids < 0] = -np.inf
    return sims, ids
