"""KNN at scale: build + search time and recall@5 against the exact answer for flat / IVF / HNSW (issue 6).

    OMP_NUM_THREADS=1 python -m benchmarks.knn --sizes 10000 100000 1000000 --max-queries 2000 --threads 1

Simulated global features: ``n`` 384-d float32 vectors from min(1000, n // 100) Gaussian clusters (unit centres,
isotropic noise of norm ``--spread``), L2-normalised. As in ``plan_refinement``, 10 % of them are the queries
(uncertain images) and the other 90 % are indexed (certain images); queries are capped at ``--max-queries`` (a random
subset) to bound the exact reference, and the time for all 10 % is extrapolated linearly. The exact reference is
the flat index itself. An HNSW build that runs past ``--hnsw-budget-s`` is stopped: its partial size and time, a
linear extrapolation (an underestimate: HNSW insertion is ~log n per vector) and its recall against the exact top-5
over the same partial set are reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import faiss
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bundle"))

from scripts.knn_index import build_index, search

D, K = 384, 5


def simulated_features(n: int, clusters: int, spread: float, seed: int, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, D), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, D), dtype=np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = centres[rng.integers(clusters, size=e - s)]
        x += (spread / np.sqrt(D)) * rng.standard_normal((e - s, D), dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / exact.shape[1] for a, e in zip(approx, exact)]))


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def hnsw_with_budget(base: np.ndarray, budget_s: float, chunk: int = 10_000, **kw):
    """build_index(kind="hnsw") on a first chunk, then add the rest chunk by chunk until the time budget is spent."""
    t0 = time.perf_counter()
    index = build_index(base[:chunk], kind="hnsw", **kw)
    while index.ntotal < len(base) and time.perf_counter() - t0 < budget_s:
        index.add(base[index.ntotal : index.ntotal + chunk])
    return index, time.perf_counter() - t0


def run_size(n: int, args) -> list[dict]:
    clusters = args.clusters or min(1000, max(1, n // 100))
    x = simulated_features(n, clusters, args.spread, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    perm = rng.permutation(n)
    n_query_pool = n // 10
    base = np.ascontiguousarray(x[np.sort(perm[n_query_pool:])])
    queries = np.ascontiguousarray(x[np.sort(perm[:n_query_pool][: args.max_queries])])
    del x
    nq, scale = len(queries), n_query_pool / len(queries)
    print(f"n={n}: {len(base)} indexed, {nq} of {n_query_pool} queries, {clusters} clusters", flush=True)
    rows = []

    def row(kind, params, build_s, search_s, recall, note=""):
        r = {"n": n, "indexed": len(base), "queries": nq, "kind": kind, "params": params, "build_s": build_s}
        r |= {"search_s": search_s, "search_all_s": search_s * scale, "recall": recall, "note": note}
        print("  ", r, flush=True)
        rows.append(r)

    index, build_s = timed(build_index, base, kind="flat")
    (_, exact), search_s = timed(search, index, queries, K)
    row("flat", "IndexFlatIP", build_s, search_s, 1.0, "exact reference")
    del index

    index, build_s = timed(build_index, base, kind="ivf")
    for nprobe in args.nprobe:  # search-time knob: one build, one row per value
        index.nprobe = min(nprobe, index.nlist)
        (_, ids), search_s = timed(search, index, queries, K)
        row("ivf", f"nlist={index.nlist}, nprobe={index.nprobe}", build_s, search_s, recall_at_k(ids, exact))
    del index

    index, build_s = hnsw_with_budget(base, args.hnsw_budget_s, hnsw_m=args.hnsw_m)
    note = ""
    if index.ntotal < len(base):  # partial build: exact reference over the same first ntotal vectors
        _, exact = search(build_index(base[: index.ntotal], kind="flat"), queries, K)
        est = build_s * len(base) / index.ntotal
        note = (
            f"STOPPED after {index.ntotal:,} of {len(base):,} vectors; full build >= ~{est:.0f} s (linear "
            "extrapolation); search time and recall on the partial index"
        )
    for ef in args.ef_search:
        index.hnsw.efSearch = ef
        (_, ids), search_s = timed(search, index, queries, K)
        params = f"M={args.hnsw_m}, efC={index.hnsw.efConstruction}, efSearch={ef}"
        row("hnsw", params, build_s, search_s, recall_at_k(ids, exact), note)
    return rows


def to_markdown(rows: list[dict], args, command: str, total_s: float) -> str:
    lines = [
        "# KNN index benchmark (issue 6)",
        "",
        f"Command: `{command}`",
        "",
        (
            f"Threads: **{args.threads}** (`faiss.omp_set_num_threads({args.threads})`, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}). Machine: {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores shared with other long benchmark runs, so times are indicative (the same case varied up to ~2x between runs). "
            f"faiss {faiss.__version__}, numpy {np.__version__}. Total wall time {total_s:.0f} s."
        ),
        "",
        (
            f"Data: {D}-d float32, {args.clusters or 'min(1000, n/100)'} Gaussian clusters around random unit centres, isotropic noise of "
            f"norm {args.spread}, L2-normalised (seed {args.seed}). 10 % of n are queries, the other 90 % indexed "
            f"(as uncertain vs certain images in `plan_refinement`); queries capped at {args.max_queries}. "
            f"`search (10 %)` extrapolates the measured search linearly to all n/10 queries. recall@{K} is against the "
            f"exact IndexFlatIP top-{K}. build = train + add. `default_nlist(n)` = min(4 sqrt(n), n/39)."
        ),
        "",
        f"| n | indexed | queries | index | parameters | build s | search s | search (10 %) s | recall@{K} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        mark = ""
        if r["note"] and r["note"] != "exact reference":
            if r["note"] not in notes:
                notes.append(r["note"])
            mark = f" [{notes.index(r['note']) + 1}]"
        lines.append(
            f"| {r['n']:,} | {r['indexed']:,} | {r['queries']:,} | {r['kind']}{mark} | {r['params']} | "
            f"{r['build_s']:.2f} | {r['search_s']:.2f} | {r['search_all_s']:.1f} | {r['recall']:.3f} |"
        )
    lines += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--max-queries", type=int, default=2_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clusters", type=int, default=0, help="0: min(1000, n // 100)")
    parser.add_argument("--spread", type=float, default=0.7)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16], help="IVF lists probed (several: a sweep)")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64], help="HNSW efSearch (several: a sweep)")
    parser.add_argument("--hnsw-budget-s", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results_knn.md"))
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = [r for n in args.sizes for r in run_size(n, args)]
    command = " ".join(["python -m benchmarks.knn"] + (sys.argv[1:] if argv is None else list(argv)))
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {command}"
    md = to_markdown(rows, args, command, time.perf_counter() - t0)
    with open(args.out, "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
