"""build_index / search: exact top-k, approximate recall on clustered data, the auto switch, missing results."""

import faiss
import numpy as np
import pytest

from scripts.knn_index import HNSW_EF_SEARCH, IVF_NPROBE, build_index, default_nlist, search


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n, d=64, clusters=50, spread=0.7, seed=0):
    """Gaussian clusters around random unit centres, then L2-normalised (a stand-in for DINOv2 global features)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, d)))
    x = centres[rng.integers(clusters, size=n)] + spread / np.sqrt(d) * rng.standard_normal((n, d))
    return _unit(x)


def _brute_force(base, queries, k):
    sims = queries @ base.T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def _recall(approx_ids, exact_ids):
    k = exact_ids.shape[1]
    return np.mean([len(set(a) & set(e)) / k for a, e in zip(approx_ids, exact_ids)])


def test_flat_index_is_the_exact_top_k():
    rng = np.random.default_rng(1)
    base, queries = _unit(rng.standard_normal((500, 32))), _unit(rng.standard_normal((40, 32)))
    index = build_index(base)
    assert isinstance(index, faiss.IndexFlatIP)
    sims, ids = search(index, queries, 7)
    exact_sims, exact_ids = _brute_force(base, queries, 7)
    assert ids.dtype == np.int64 and sims.dtype == np.float32
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(sims, exact_sims, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_reach_recall_at_5(kind):
    x = _clustered(5_500)
    base, queries = x[:5_000], x[5_000:]
    index = build_index(base, kind=kind)
    sims, ids = search(index, queries, 5)
    _, exact_ids = _brute_force(base, queries, 5)
    assert _recall(ids, exact_ids) >= 0.9
    assert (ids >= 0).all()
    # stored vectors are uncompressed: each returned similarity is the true cosine with that id
    np.testing.assert_allclose(sims, np.einsum("md,mkd->mk", queries, base[ids]), atol=1e-5)


def test_auto_is_exact_up_to_the_limit_and_ivf_past_it():
    x = _clustered(2_000)
    assert isinstance(build_index(x, exact_limit=2_000), faiss.IndexFlatIP)
    ivf = build_index(x, exact_limit=1_999)
    assert isinstance(ivf, faiss.IndexIVFFlat)
    assert ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    assert ivf.nlist == default_nlist(2_000) == 2_000 // 39  # 4 sqrt(n) = 179 lists would be under-trained
    assert ivf.nprobe == IVF_NPROBE == 16 and ivf.ntotal == 2_000
    assert default_nlist(1_000_000) == 4_000
    hnsw = build_index(x, kind="hnsw", hnsw_m=16)
    assert hnsw.metric_type == faiss.METRIC_INNER_PRODUCT and hnsw.hnsw.efSearch == HNSW_EF_SEARCH == 64
    assert faiss.downcast_index(hnsw).hnsw.nb_neighbors(1) == 16  # M links per node above level 0
    with pytest.raises(ValueError):
        build_index(x, kind="lsh")


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_fewer_than_k_results_are_minus_one_and_minus_inf_at_the_end(kind):
    base = _clustered(3, d=16)
    sims, ids = search(build_index(base, kind=kind), base, 5)
    assert ids.shape == sims.shape == (3, 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()
    assert sorted(ids[0, :3]) == [0, 1, 2] and ids[0, 0] == 0 and sims[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_ivf_probing_too_few_lists_pads_with_minus_one():
    # 400 points in 10 lists, probing 1 list per query: asking for k > list size must leave -1 slots, never junk ids
    x = _clustered(400, d=16, clusters=10, spread=0.05)
    index = build_index(x, kind="ivf", nlist=10)
    index.nprobe = 1  # the search-time knob is the index's own attribute
    sizes = faiss.extract_index_ivf(index).invlists
    k = max(sizes.list_size(i) for i in range(10)) + 1
    sims, ids = search(index, x[:20], k)
    assert (ids == -1).any(axis=1).all()
    missing = ids < 0
    assert np.isneginf(sims[missing]).all() and np.isfinite(sims[~missing]).all()
    assert (np.diff(missing.astype(int), axis=1) >= 0).all()  # -1 only trail the real results


def test_degenerate_inputs():
    x = _clustered(10, d=8)
    sims, ids = search(build_index(x), x[:0], 3)
    assert ids.shape == sims.shape == (0, 3)
    sims, ids = search(build_index(x[:0]), x[:2], 3)
    assert (ids == -1).all() and np.isneginf(sims).all()
    assert search(build_index(x), x[:2], 0)[1].shape == (2, 0)
    with pytest.raises(ValueError):
        search(build_index(x), x[:, :4], 3)
