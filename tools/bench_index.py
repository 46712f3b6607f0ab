#!/usr/bin/env python
"""Benchmark FAISS index types on unit vectors: build time, queries/s and recall@10 vs exact search.

    python tools/bench_index.py                          # 100k and 1M, random + clustered, D=256
    python tools/bench_index.py --sizes 100000 --data clustered --indexes flat ivf default
    python tools/bench_index.py --sizes 1000000 --data clustered --sigma 1 --indexes default --gpu --json ix.jsonl

Data: "random" = uniform on the sphere (no structure: the worst case for any ANN index);
"clustered" = a Gaussian mixture (--centres centres on the sphere, noise of norm --sigma), normalised,
queries drawn from the same mixture. recall@10 = |top-10 found ∩ exact top-10| / 10, averaged.
Timing: the machine may be shared, so queries/s is given both from wall time and from process CPU time
divided by the FAISS thread count (= wall time on an idle machine); speedups use the CPU-time figure.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmft.index.core import (
    default_factory,
    default_nlist,
    default_nprobe,
    new_faiss_index,
    set_search_params,
)


def make_data(kind: str, n: int, nq: int, dim: int, centres: int, sigma: float, seed: int):
    """(gallery (n, dim), queries (nq, dim)) float32 unit rows, generated in chunks."""
    rng = np.random.default_rng(seed)
    cen = rng.standard_normal((centres, dim)).astype(np.float32)
    cen /= np.linalg.norm(cen, axis=1, keepdims=True)

    def draw(m):
        out = np.empty((m, dim), np.float32)
        for s in range(0, m, 100_000):
            b = min(100_000, m - s)
            x = rng.standard_normal((b, dim)).astype(np.float32)
            if kind == "clustered":
                x = cen[rng.integers(0, centres, b)] + x * (sigma / math.sqrt(dim))
            out[s:s + b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(nq)


def candidates(n: int, dim: int, wanted: list[str]) -> list[tuple[str, str, dict]]:
    """(label, factory, search params) rows to measure for a gallery of n vectors."""
    nlist = default_nlist(n)
    m = dim // 8
    rows = []
    if "ivf" in wanted:
        rows += [(f"IVF-Flat nprobe={p}", f"IVF{nlist},Flat", {"nprobe": p}) for p in (8, 16, 32, 64)]
    if "ivfpq" in wanted:
        rows += [(f"IVF-PQ{m} nprobe={p}", f"IVF{nlist},PQ{m}", {"nprobe": p}) for p in (16, 64)]
    if "hnsw" in wanted:
        rows += [(f"HNSW32 efSearch={e}", "HNSW32", {"ef_search": e}) for e in (64, 128)]
    if "default" in wanted:
        f = default_factory(n)
        params = {"nprobe": default_nprobe(int(f[3:].split(",")[0].split("_")[0]))} if f.startswith("IVF") else {}
        rows.append((f"default ({f}, nprobe={params.get('nprobe', '-')})", f, params))
    return rows


def timed(fn, threads: int, repeat: int = 1):
    """(result, best wall s, best CPU s / threads) over `repeat` runs (the best is the least disturbed)."""
    best_w = best_c = float("inf")
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        best_w, best_c = min(best_w, time.perf_counter() - w), min(best_c, (time.process_time() - c) / threads)
    return out, best_w, best_c


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found[:, :10], exact[:, :10])]))


def bench_one(kind: str, sigma: float, n: int, args, threads: int) -> list[dict]:
    import faiss

    x, q = make_data(kind, n, args.queries, args.dim, args.centres, sigma, args.seed)
    label = f"clustered σ={sigma:g}" if kind == "clustered" else kind
    results = []
    flat, build_w, _ = timed(lambda: new_faiss_index(x, "Flat"), threads)
    flat.search(q[:10], 10)  # warm up
    (_, exact), w, c = timed(lambda: flat.search(q, 10), threads, args.repeat)
    flat_qps = len(q) / c
    results.append({"data": label, "n": n, "index": "Flat (exact)", "device": "cpu", "build": build_w,
                    "qps_wall": len(q) / w, "qps_cpu": len(q) / c, "recall": 1.0, "flat_qps_cpu": flat_qps})
    print(_row(results[-1], flat_qps), flush=True)
    wanted = args.indexes
    built: dict[str, object] = {}
    build_s: dict[str, float] = {}
    for name, factory, params in candidates(n, args.dim, wanted):
        if factory.startswith("HNSW") and n > args.hnsw_max:
            continue
        if factory not in built:
            built[factory], build_s[factory], _ = timed(
                lambda f=factory: new_faiss_index(x, f, train_sample=args.train_sample), threads)
            build_time = build_s[factory]
        else:  # the same index with other search parameters: its build time shows on the default row only
            build_time = build_s[factory] if name.startswith("default") else float("nan")
        index = built[factory]
        set_search_params(index, **params)
        index.search(q[:10], 10)
        (_, found), w, c = timed(lambda ix=index: ix.search(q, 10), threads, args.repeat)
        results.append({"data": label, "n": n, "index": name, "device": "cpu", "build": build_time,
                        "qps_wall": len(q) / w, "qps_cpu": len(q) / c, "recall": recall_at_10(found, exact),
                        "flat_qps_cpu": flat_qps})
        print(_row(results[-1], flat_qps), flush=True)
    if args.gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        results += bench_gpu(label, n, x, q, exact, flat_qps, args)
    elif args.gpu:
        print(f"# no GPU rows: this FAISS ({faiss.__version__}) has no GPU support or sees no GPU", flush=True)
    return results


def bench_gpu(kind, n, x, q, exact, flat_qps, args) -> list[dict]:
    rows = []
    nlist = default_nlist(n)
    for label, factory, params in [("Flat (exact)", "Flat", {}), ("IVF-Flat nprobe=16", f"IVF{nlist},Flat",
                                                                  {"nprobe": 16})]:
        t = time.perf_counter()
        index = new_faiss_index(x, factory, train_sample=args.train_sample, use_gpu="always")
        build = time.perf_counter() - t
        set_search_params(index, **params)
        index.search(q[:10], 10)
        t = time.perf_counter()
        _, found = index.search(q, 10)
        w = time.perf_counter() - t
        rows.append({"data": kind, "n": n, "index": label, "device": "gpu", "build": build,
                     "qps_wall": len(q) / w, "qps_cpu": len(q) / w, "recall": recall_at_10(found, exact),
                     "flat_qps_cpu": flat_qps})
        print(_row(rows[-1], flat_qps), flush=True)
    return rows


HEADER = ("| data | N | index | device | build s | queries/s (wall) | queries/s (CPU) | speedup vs Flat | "
          "recall@10 |\n|---|---|---|---|---|---|---|---|---|")


def _row(r: dict, flat_qps_cpu: float) -> str:
    """A Markdown table row; speedup = CPU-time throughput over that of exact Flat on the same data."""
    build = "" if math.isnan(r["build"]) else f"{r['build']:.1f}"
    return (f"| {r['data']} | {r['n']:,} | {r['index']} | {r['device']} | {build} | {r['qps_wall']:,.0f} | "
            f"{r['qps_cpu']:,.0f} | {r['qps_cpu'] / flat_qps_cpu:.1f}x | {100 * r['recall']:.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--data", nargs="+", default=["random", "clustered"], choices=["random", "clustered"])
    p.add_argument("--indexes", nargs="+", default=["ivf", "ivfpq", "hnsw", "default"],
                   choices=["ivf", "ivfpq", "hnsw", "default"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--centres", type=int, default=2000)
    p.add_argument("--sigma", type=float, nargs="+", default=[1.0, 1.5],
                   help="noise norm around a centre (clustered data); several values = several data sets")
    p.add_argument("--train-sample", type=int, default=100_000)
    p.add_argument("--hnsw-max", type=int, default=1_000_000, help="skip HNSW above this size (slow builds)")
    p.add_argument("--gpu", action="store_true", help="add GPU rows when FAISS sees a GPU")
    p.add_argument("--repeat", type=int, default=3, help="time each search this many times, keep the best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every row as JSON lines to this file")
    args = p.parse_args(argv)
    import faiss

    threads = faiss.omp_get_max_threads()
    print(f"# FAISS {faiss.__version__}, {threads} threads, D={args.dim}, {args.queries} queries, "
          f"clustered: {args.centres} centres, noise norm σ = {args.sigma}\n")
    print(HEADER, flush=True)
    rows = []
    for kind in args.data:
        for sigma in args.sigma if kind == "clustered" else [0.0]:
            for n in args.sizes:
                rows += bench_one(kind, sigma, n, args, threads)
                if args.json:  # after each data set, so a run cut short keeps what it measured
                    Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
