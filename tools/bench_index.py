#!/usr/bin/env python
"""Benchmark tuned FAISS indexes against exact search on data with realistic neighbour structure.

    python tools/bench_index.py                                   # three sets at 100k, then 1M
    python tools/bench_index.py --sets overlapping --sizes 100000 --targets 0.95

Sets (D=256, unit vectors):
  separated   2,000 centres on the sphere plus noise of norm 1: a query's true neighbours lie in its
              own cluster (the easy case behind the old "~24x at no recall loss" figure);
  overlapping the same centres with noise of norm 2: clusters overlap, neighbours spread out;
  captions    mmft-mini text embeddings of captions composed from the demo data's vocabulary (titles,
              keywords and categories of the openclipart shards under data/demo/openclipart, else of
              /usr/share/openclipart), embedded once and cached under data/bench/.
For each set and size the library's tuner (mmft.index.tuning) builds its default candidates once,
sweeps them on 1,000 tuning queries and picks, for each target, the fastest point whose recall@10
bound meets it (`choose`, what `mmft index build --target-recall` keeps); that point is then measured
on 1,000 other queries it never saw, against exact Flat measured in the same run.
Timing: the machine is shared, so queries/s is from process CPU time per FAISS thread (= wall time on
an idle machine); the load average is printed beside the table.
--gpu adds, where FAISS sees a GPU, rows for exact Flat and each chosen IVF index copied to GPU 0 (HNSW
has no GPU form), timed by wall clock after a warm-up search, beside the CPU rows of the same run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmft.index.faiss_backend import new_faiss_index, set_search_params, to_gpu
from mmft.index.heldout import exact_topk, held_out_sample, recall_at_k
from mmft.index.tuning import (
    candidate_factories,
    choose,
    describe_point,
    estimate_memory,
    format_bytes,
    measure_factory,
)

DIM, CENTRES = 256, 2000


# ---------------------------------------------------------------- data


def clustered(n: int, sigma: float, seed: int) -> np.ndarray:
    """(n, DIM) unit rows: CENTRES fixed centres on the sphere plus Gaussian noise of norm `sigma`."""
    cen = np.random.default_rng(12345).standard_normal((CENTRES, DIM)).astype(np.float32)
    cen /= np.linalg.norm(cen, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    for s in range(0, n, 100_000):
        b = min(100_000, n - s)
        noise = rng.standard_normal((b, DIM), np.float32) * (sigma / math.sqrt(DIM))  # (b, D), norm ~sigma
        x = cen[rng.integers(0, CENTRES, b)] + noise
        out[s:s + b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def demo_vocabulary() -> tuple[list[str], list[str], list[str]]:
    """(titles, keywords, categories) of the openclipart demo shards, else of the Debian SVGs."""
    import tarfile

    titles, keywords, cats = set(), set(), set()
    tars = sorted((ROOT / "data/demo/openclipart").glob("*/*.tar"))
    for t in tars:
        with tarfile.open(t) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    titles.add(meta["title"])
                    keywords.update(meta.get("keywords") or [])
                    cats.add(meta.get("category", "").replace("_", " "))
    if not tars:  # the demo data is not built: the same cleaning over the Debian package's SVGs
        from collections import Counter

        from mmft.demo.datasets import clipart_records

        for r in clipart_records("/usr/share/openclipart/svg", Counter()):
            titles.add(r["title"])
            keywords.update(r.get("keywords") or [])
            cats.add(r.get("category", "").replace("_", " "))
    return sorted(titles), sorted(keywords), sorted(c for c in cats if c)


TEMPLATES = ("{t}", "{t} with {k}", "{t} and {u}", "a {k} {t}", "clip art of {t}", "{t}, {k}, {k2}",
             "drawing of {t} next to {u}", "{c} icon: {t}", "{t} on a {k} background", "{k} {k2} {t}")


def compose_captions(n: int, seed: int = 0) -> list[str]:
    """n distinct captions composed from the demo vocabulary by a few templates (seeded)."""
    titles, keywords, cats = demo_vocabulary()
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        m = 2 * (n - len(out)) + 100
        t, u = rng.integers(0, len(titles), m), rng.integers(0, len(titles), m)
        k, k2 = rng.integers(0, len(keywords), m), rng.integers(0, len(keywords), m)
        c = rng.integers(0, len(cats), m)
        for i, tpl in enumerate(rng.integers(0, len(TEMPLATES), m)):
            out[TEMPLATES[tpl].format(t=titles[t[i]], u=titles[u[i]], k=keywords[k[i]], k2=keywords[k2[i]],
                                      c=cats[c[i]])] = None
            if len(out) == n:
                break
    order = rng.permutation(n)  # the gallery/query split must not follow the generation order
    texts = list(out)
    return [texts[i] for i in order]


def caption_embeddings(n: int, cache_dir: Path, seed: int = 0) -> np.ndarray:
    """(n, 256) mmft-mini text embeddings of `compose_captions(n)`, cached under cache_dir."""
    texts = compose_captions(n, seed)
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    path = cache_dir / f"captions-{n}-{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    import torch

    from mmft.config import ModelConfig
    from mmft.embeddings import encode_texts
    from mmft.model.factory import create_model

    torch.manual_seed(0)  # mmft-mini's projections are freshly initialised: fix them
    model, _, _, tok = create_model(ModelConfig(name="mmft-mini"))
    by_len = np.argsort([len(t) for t in texts], kind="stable")  # batches of similar length pad less
    out = np.empty((n, 256), np.float32)
    start, step = time.time(), 8192
    for s in range(0, n, step):
        rows = by_len[s:s + step]
        out[rows] = encode_texts(model, tok, [texts[i] for i in rows], batch_size=512)
        print(f"# embedded {min(n, s + step):,}/{n:,} captions ({time.time() - start:.0f} s)", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    (cache_dir / f"captions-{n}-{key}.json").write_text(json.dumps(texts))
    return out


def make_set(name: str, n: int, nq: int, args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery (n, D), tuning queries (nq, D), evaluation queries (nq, D)) of one set."""
    if name in ("separated", "overlapping"):
        sigma = 1.0 if name == "separated" else 2.0
        return clustered(n, sigma, seed=1), clustered(nq, sigma, seed=2), clustered(nq, sigma, seed=3)
    x = caption_embeddings(args.caption_pool, ROOT / args.cache)
    if n + 2 * nq > len(x):
        raise SystemExit(f"the caption pool holds {len(x):,} captions, fewer than {n + 2 * nq:,}: "
                         "raise --caption-pool")
    return np.asarray(x[:n]), np.asarray(x[n:n + nq]), np.asarray(x[n + nq:n + 2 * nq])


# ---------------------------------------------------------------- measuring


def cpu_ms(index, queries: np.ndarray, k: int, threads: int, repeat: int = 3) -> tuple[float, np.ndarray]:
    """(best CPU ms per query per FAISS thread over `repeat` searches, found rows (Q, k))."""
    best = math.inf
    for _ in range(repeat):
        c = time.process_time()
        _, found = index.search(queries, k)
        best = min(best, time.process_time() - c)
        if best > 5:
            break
    return 1000 * best / threads / len(queries), found


def bench(name: str, n: int, args, threads: int) -> list[dict]:
    """Rows of one set and size: exact Flat, then the tuned index at each target, on unseen queries."""
    gallery, tune_q, eval_q = make_set(name, n, args.queries, args)
    t = time.time()
    held = held_out_sample(gallery, tune_q, size=args.queries, seed=0)
    exact_s, exact_r = exact_topk(eval_q, gallery)  # the answers the unseen queries should get
    exact_time = time.time() - t
    t = time.time()
    flat = new_faiss_index(gallery, "Flat")
    flat_build = time.time() - t
    flat_ms, found = cpu_ms(flat, eval_q, 10, threads)
    base = {"set": name, "n": n, "build_s": flat_build, "memory": estimate_memory("Flat", n, DIM),
            "device": "cpu", "flat_ms": flat_ms}
    rows = [{**base, "target": None, "index": "Flat (exact)", "factory": "Flat", "nprobe": None,
             "ms": flat_ms, "tuning_s": None, "recall": float(recall_at_k(found, exact_r, exact_s).mean()),
             "tuned_recall": 1.0}]
    print(_row(rows[0], flat_ms), flush=True)
    # the tuner's candidates, each built once and swept up to the highest target (CPU time per query)
    factories = [f for f in candidate_factories(n, DIM, hnsw_max=args.hnsw_max) if f != "Flat"]
    built, curve, tuning_s = {}, [], exact_time
    for f in factories:
        t = time.time()
        index, points = measure_factory(gallery, f, held, stop_at=max(args.targets), slowest_ms=flat_ms,
                                        train_sample=args.train_sample)
        tuning_s += time.time() - t
        built[f], curve = index, curve + points
        if args.verbose:
            for p in points:
                print(f"#   {describe_point(p)}: recall {p['recall']:.3f} (bound {p['recall_low']:.3f}), "
                      f"{p['ms']:.4f} ms", flush=True)
    exact_point = {"factory": "Flat", "nprobe": None, "ef_search": None, "recall": 1.0, "recall_low": 1.0,
                   "ms": flat_ms, "memory": base["memory"], "build_s": flat_build}
    for target in args.targets:
        p = choose(curve + [exact_point], target)
        index = built.get(p["factory"], flat)
        set_search_params(index, nprobe=p["nprobe"], ef_search=p["ef_search"])
        ms, found = cpu_ms(index, eval_q, 10, threads)
        label = describe_point(p) if p is not exact_point else "Flat (nothing faster meets it)"
        recall = float(recall_at_k(found, exact_r, exact_s).mean())
        rows.append({**base, "target": target, "index": label, "factory": p["factory"], "nprobe": p["nprobe"],
                     "build_s": p["build_s"], "memory": p["memory"],
                     "ms": ms, "tuning_s": tuning_s, "recall": recall, "tuned_recall": p["recall"]})
        print(_row(rows[-1], flat_ms), flush=True)
    if args.gpu:
        rows += bench_gpu(rows, built, flat, eval_q, exact_r, exact_s)
    return rows


def bench_gpu(cpu_rows: list[dict], built: dict, flat, queries, exact_r, exact_s) -> list[dict]:
    """GPU rows: exact Flat and each distinct chosen IVF index on GPU 0, wall ms per query."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        print(f"# no GPU rows: FAISS {faiss.__version__} has no GPU support or sees no GPU", flush=True)
        return []
    rows, seen = [], set()
    for r in cpu_rows:
        factory = r["factory"]
        if (factory, r["nprobe"]) in seen or not (factory == "Flat" or factory.startswith("IVF")):
            continue
        seen.add((factory, r["nprobe"]))
        cpu_index = built.get(factory, flat)
        set_search_params(cpu_index, nprobe=r["nprobe"])  # the copy keeps it
        t = time.perf_counter()
        index = to_gpu(cpu_index, "always")
        copy_s = time.perf_counter() - t
        index.search(queries[:10], 10)  # warm-up: kernels load, memory is allocated
        t = time.perf_counter()
        _, found = index.search(queries, 10)
        ms = 1000 * (time.perf_counter() - t) / len(queries)
        recall = float(recall_at_k(found, exact_r, exact_s).mean())
        rows.append({**r, "device": "gpu", "index": f"{r['index']} [GPU]", "build_s": copy_s, "ms": ms,
                     "tuning_s": None, "recall": recall})
        print(_row(rows[-1], r["flat_ms"]), flush=True)
    return rows


HEADER = ("| set | N | target | chosen index | build s (tuning s) | memory | q/s (CPU) | vs Flat | "
          "recall@10 tuning / unseen |\n|---|---:|---:|---|---:|---:|---:|---:|---:|")


def _row(r: dict, flat_ms: float) -> str:
    target = "exact" if r["target"] is None else f"{r['target']:.2f}"
    build = f"{r['build_s']:.1f}" + (f" ({r['tuning_s']:.0f})" if r["tuning_s"] else "")
    met = "" if r["target"] is None else (" ✓" if r["recall"] >= r["target"] else " ✗")
    return (f"| {r['set']} | {r['n']:,} | {target} | {r['index']} | {build} | {format_bytes(r['memory'])} | "
            f"{1000 / r['ms']:,.0f} | {flat_ms / r['ms']:.1f}x | {100 * r['tuned_recall']:.1f} / "
            f"{100 * r['recall']:.1f}{met} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["separated", "overlapping", "captions"],
                   choices=["separated", "overlapping", "captions"])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--targets", type=float, nargs="+", default=[0.90, 0.95, 0.99])
    p.add_argument("--queries", type=int, default=1000, help="tuning queries, and as many unseen ones")
    p.add_argument("--caption-pool", type=int, default=102_000, help="captions embedded for the captions set")
    p.add_argument("--cache", default="data/bench", help="where caption embeddings are cached")
    p.add_argument("--train-sample", type=int, default=100_000)
    p.add_argument("--hnsw-max", type=int, default=2_000_000, help="no HNSW candidate above this size")
    p.add_argument("--gpu", action="store_true", help="add GPU rows when FAISS sees a GPU")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="print every point of the tuning curves")
    args = p.parse_args(argv)
    import faiss

    threads = faiss.omp_get_max_threads()
    print(f"# FAISS {faiss.__version__}, {threads} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; D={DIM}, {args.queries} tuning + {args.queries} unseen queries\n")
    print(HEADER, flush=True)
    rows = []
    for n in args.sizes:
        for name in args.sets:
            rows += bench(name, n, args, threads)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
