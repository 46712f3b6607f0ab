"""Indexes tuned to a recall target on the user's own vectors, measured rather than guessed.

Whether an approximate index loses recall depends on the gallery: on 1M well-separated clustered
vectors IVF-Flat probing one or two lists finds nearly every true neighbour, on 100k overlapping ones
(noise of norm 2) IVF1024 probing 32 lists finds 54% of them (tools/bench_index.py), and nobody knows
where a user's gallery sits until it is measured. So the tuner holds out a sample of real queries
(the gallery's own captions when it has them, else gallery rows, each excluded from its own answers),
computes their exact top-k once, builds each candidate factory once, sweeps its search parameter
(nprobe, efSearch) upwards, and keeps the point of lowest latency whose recall@10 meets the target
within the memory and latency budgets. When none does, the index is exact `Flat`, and the result
says so. On the benchmark's 100k caption embeddings that is HNSW32 at efSearch 96 for 0.95, 11x
faster than exact search, and 96.4% on queries the tuner never saw (docs/benchmarks.md).

A point meets the target when its recall's lower bound (mean minus two standard errors over the
held-out queries) does, so the chosen point also holds on queries it was not tuned on. Latency is
process CPU time per query divided by FAISS's thread count: the wall time of an idle machine, and
steady on a shared one. The held-out queries and their exact neighbours are saved beside the index
(heldout.npz), so an append (mmft.index.append) re-measures recall without the old vectors.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import time

import numpy as np

from mmft.index.faiss_backend import (
    apply_fp16,
    default_nlist,
    extract_ivf,
    faiss_module,
    new_faiss_index,
    set_search_params,
)
from mmft.index.heldout import HeldOut, K, held_out_sample, recall_at_k

logger = logging.getLogger("mmft.index.tuning")

Z = 2.0  # standard errors between a point's mean recall and the bound that must meet the target
HNSW_MAX = 2_000_000  # above this many vectors HNSW is not tried by default (build time, 2-core CPU)
_NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
            3072, 4096, 6144, 8192, 12288, 16384)
_EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


# ---------------------------------------------------------------- candidates and their memory


def parse_memory(text: str | int | None) -> int | None:
    """'2GB', '512MB', '1.5GiB' or a byte count -> bytes; '' / 0 / None -> None (no budget)."""
    if text in (None, "", 0, "0"):
        return None
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if m is None:
        raise ValueError(f"index.max_memory={text!r} is not a size: write it like '2GB', '512MB' or a "
                         "byte count")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _codec_ladder(dim: int, fp16: bool, graph: bool) -> list[str]:
    """Vector codes from the largest to the smallest: fp32, fp16, 8-bit scalar, product quantisation."""
    ladder = ["Flat", "SQfp16", "SQ8"] + ([] if graph else [f"PQ{m}" for m in (dim // 4, dim // 8)
                                                          if m >= 1 and dim % m == 0 and m > 0])
    return ladder[1:] if fp16 else ladder


def _with_codec(structure: str, codec: str) -> str:
    if structure == "":
        return codec
    if structure.startswith("HNSW") and codec == "Flat":
        return structure
    return f"{structure},{codec}"


def estimate_memory(factory: str, n: int, dim: int) -> int:
    """Bytes an index of `factory` over n dim-d vectors takes (codes, ids, centroids, graph links)."""
    codec = factory.split(",")[-1] if "," in factory or not factory.startswith("HNSW") else "Flat"
    if codec == "Flat":
        per, fixed = 4 * dim, 0
    elif codec == "SQfp16":
        per, fixed = 2 * dim, 0
    elif codec == "SQ8":
        per, fixed = dim, 8 * dim
    elif (m := re.fullmatch(r"PQ(\d+)(?:x(\d+))?", codec)) is not None:
        bits = int(m.group(2) or 8)
        per, fixed = math.ceil(int(m.group(1)) * bits / 8), 4 * dim * (1 << bits)
    else:
        per, fixed = 4 * dim, 0  # unknown: as if uncompressed
    if (ivf := re.match(r"IVF(\d+)", factory)) is not None:
        nlist = int(ivf.group(1))
        per, fixed = per + 8, fixed + nlist * (4 * dim + 48)  # ids; centroids and list headers
    if (hnsw := re.match(r"HNSW(\d+)", factory)) is not None:
        links = int(hnsw.group(1))
        per += 4 * 2 * links + 4 * links / (links - 1) + 12  # level 0, upper levels, offsets + levels
    return int(n * per + fixed)


def candidate_factories(n: int, dim: int, *, factory: str = "", fp16: bool = False,
                        max_memory: int | None = None, hnsw_max: int = HNSW_MAX) -> list[str]:
    """Factories the tuner builds for n dim-d vectors, exact Flat first.

    factory: tune only its search parameter. Default: Flat, IVF at ~4*sqrt(n) and a quarter as many
    lists (at least 39 vectors per list, k-means' minimum), HNSW32 up to hnsw_max vectors; with a memory
    budget each structure takes the largest code that fits (fp16, SQ8, then PQ), else its smallest.
    """
    if factory:
        return [apply_fp16(factory) if fp16 else factory]
    cap = 2 ** int(math.log2(max(n // 39, 1)))
    nlists = sorted({min(default_nlist(n), cap), min(default_nlist(n) // 4, cap)} - {0, 1, 2, 4})
    structures = [f"IVF{x}" for x in nlists if x < n // 8] + (["HNSW32"] if n <= hnsw_max else [])
    out = ["SQfp16" if fp16 else "Flat"]
    if max_memory is not None and estimate_memory(out[0], n, dim) > max_memory:
        structures.insert(0, "")  # exact search does not fit: try a smaller brute-force code too
    for s in structures:
        ladder = [_with_codec(s, c) for c in _codec_ladder(dim, fp16, s.startswith("HNSW"))]
        fits = [f for f in ladder if max_memory is None or estimate_memory(f, n, dim) <= max_memory]
        out.append(fits[0] if fits else ladder[-1])
    return out


# ---------------------------------------------------------------- measuring and choosing


def _drop_self(found: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) of found rows (Q, k + 1) without each query's own gallery row (the last one when absent)."""
    own = found == self_rows[:, None]  # (Q, k + 1)
    order = np.argsort(own, axis=1, kind="stable")  # the query's own row moves to the end
    return np.take_along_axis(found, order, 1)[:, :k]


def measure_point(index, held: HeldOut, *, nprobe: int | None = None, ef_search: int | None = None,
                  repeat: int = 3, budget_s: float = 2.0) -> dict:
    """Recall@K (mean and lower bound) and CPU ms per query of `index` searched with these parameters.

    The fastest of `repeat` or more timed searches of the whole sample counts (the least disturbed one).
    """
    faiss = faiss_module()
    set_search_params(index, nprobe=nprobe, ef_search=ef_search)
    k = K + (1 if held.exclude is not None else 0)
    best, spent = math.inf, 0.0
    for i in range(10):  # at least `repeat` searches and 0.05 s, at most 10 searches or budget_s
        c = time.process_time()
        _, found = index.search(held.queries, k)  # (Q, k)
        took = time.process_time() - c
        best, spent = min(best, took), spent + took
        if spent > budget_s or (i + 1 >= repeat and spent > 0.05):
            break
    if held.exclude is not None:
        found = _drop_self(found, held.self_rows, K)
    r = recall_at_k(found, held.rows, held.scores)  # (Q,)
    low = float(r.mean() - Z * r.std() / math.sqrt(max(len(r) - 1, 1)))
    ms = 1000 * best / max(faiss.omp_get_max_threads(), 1) / max(len(held), 1)
    return {"nprobe": nprobe, "ef_search": ef_search, "recall": round(float(r.mean()), 4),
            "recall_low": round(min(low, float(r.mean())), 4), "ms": round(ms, 5)}


def sweep_values(index) -> tuple[str | None, list[int | None]]:
    """The search parameter of `index` and the values the sweep tries, smallest (fastest) first."""
    ivf = extract_ivf(index)
    if ivf is not None:
        return "nprobe", [p for p in _NPROBES if p < ivf.nlist] + [int(ivf.nlist)]
    try:
        faiss_module().ParameterSpace().set_index_parameter(index, "efSearch", 16)
    except RuntimeError:
        return None, [None]
    return "ef_search", list(_EF_SEARCH)


def sweep(index, factory: str, held: HeldOut, *, stop_at: float, slowest_ms: float | None = None,
          extra: dict | None = None) -> list[dict]:
    """Points of `index` over its search parameter, up to the first whose recall bound reaches stop_at
    or whose latency exceeds slowest_ms (exact search's: slower than exact is never worth it)."""
    key, values = sweep_values(index)
    points = []
    for v in values:
        pt = {"factory": factory, **measure_point(index, held, **({key: v} if key else {})), **(extra or {})}
        points.append(pt)
        logger.info("  %s %s=%s: recall@%d %.3f, %.4f ms/query", factory, key, v, K, pt["recall"], pt["ms"])
        if pt["recall_low"] >= stop_at or (slowest_ms is not None and pt["ms"] > slowest_ms):
            break
    return points


def choose(points: list[dict], target: float, *, max_memory: int | None = None,
           max_latency_ms: float | None = None) -> dict | None:
    """The lowest-latency point whose recall bound meets `target` within the budgets, else None."""
    ok = [p for p in points if p["recall_low"] >= target
          and (max_memory is None or p["memory"] <= max_memory)
          and (max_latency_ms is None or p["ms"] <= max_latency_ms)]
    return min(ok, key=lambda p: p["ms"]) if ok else None


def measure_factory(vectors, factory: str, held: HeldOut, *, stop_at: float, slowest_ms: float | None = None,
                    train_sample: int = 100_000, seed: int = 0, use_gpu: str = "never",
                    progress: bool = False):
    """Build `factory` over `vectors` (N, D) once and sweep it: (faiss index, its points)."""
    n, dim = vectors.shape
    start = time.time()
    index = new_faiss_index(vectors, factory, train_sample=train_sample, seed=seed, use_gpu=use_gpu,
                            progress=progress)
    extra = {"memory": estimate_memory(factory, n, dim), "build_s": round(time.time() - start, 2)}
    logger.info("tuning: built %s over %d vectors in %.1f s", factory, n, extra["build_s"])
    return index, sweep(index, factory, held, stop_at=stop_at, slowest_ms=slowest_ms, extra=extra)


# ---------------------------------------------------------------- the tuner


@dataclasses.dataclass
class Tuned:
    """What the tuner chose: the built index, its factory and search parameters, and the record."""

    index: object  # faiss index, filled, search parameters set
    factory: str
    nprobe: int | None
    ef_search: int | None
    held: HeldOut
    record: dict  # for the manifest: target, budgets, curve, chosen point, fallback, note


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB', 2 * 2**30 -> '2.0 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _budget_text(max_memory: int | None, max_latency_ms: float | None) -> str:
    parts = ([format_bytes(max_memory)] if max_memory else []) + (
        [f"{max_latency_ms:g} ms per query"] if max_latency_ms else [])
    return f" within {' and '.join(parts)}" if parts else ""


def describe_point(p: dict) -> str:
    """'HNSW32 efSearch 96' / 'IVF1024,Flat nprobe 24' / 'Flat'."""
    param = (f" nprobe {p['nprobe']}" if p.get("nprobe") else "") + (
        f" efSearch {p['ef_search']}" if p.get("ef_search") else "")
    return f"{p['factory']}{param}"


def _note(chosen: dict, exact: dict, fallback: bool, target: float, held: HeldOut, curve: list[dict],
          max_memory: int | None, max_latency_ms: float | None) -> str:
    """One sentence saying what was chosen and why."""
    sample = f"{len(held)} held-out {held.source}"
    if fallback:
        approx = [p for p in curve if p is not exact and p["factory"] != exact["factory"]]
        best = max(approx, key=lambda p: p["recall"], default=None)
        seen = f" (best approximate: {describe_point(best)}, {best['recall']:.3f})" if best else ""
        over = [w for w, bad in (("memory", max_memory and exact["memory"] > max_memory),
                                 ("latency", max_latency_ms and exact["ms"] > max_latency_ms)) if bad]
        over_text = f", although it exceeds the {' and '.join(over)} budget" if over else ""
        return (f"no approximate index meets recall@{K} {target:g}{_budget_text(max_memory, max_latency_ms)} "
                f"on {sample}{seen}: using exact {exact['factory']}{over_text}")
    if chosen["factory"] == exact["factory"] and not chosen.get("nprobe") and not chosen.get("ef_search"):
        return (f"exact {exact['factory']} is the fastest index meeting recall@{K} {target:g} on {sample} "
                f"({chosen['ms']:.3f} ms per query)")
    speed = exact["ms"] / max(chosen["ms"], 1e-9)
    return (f"{describe_point(chosen)} meets recall@{K} {target:g} on {sample} (measured "
            f"{chosen['recall']:.3f}, lower bound {chosen['recall_low']:.3f}) at {chosen['ms']:.3f} ms per "
            f"query, {speed:.1f}x faster than exact {exact['factory']}")


def tune_index(vectors, held: HeldOut, target: float, *, factories: list[str] | None = None,
               max_memory: int | None = None, max_latency_ms: float | None = None, fp16: bool = False,
               train_sample: int = 100_000, seed: int = 0, use_gpu: str = "never",
               hnsw_max: int = HNSW_MAX, progress: bool = False) -> Tuned:
    """Build the candidates over `vectors` (N, D), measure them on `held` and keep the best one.

    factories: the candidates, exact first (default `candidate_factories`); only the index holding the
    best point so far stays in memory. Falls back to the first (exact) factory when nothing meets
    `target` within the budgets, and says so in record["note"].
    """
    start = time.time()
    n, dim = vectors.shape
    factories = factories or candidate_factories(n, dim, fp16=fp16, max_memory=max_memory, hnsw_max=hnsw_max)
    kw = {"train_sample": train_sample, "seed": seed, "use_gpu": use_gpu, "progress": progress}
    best_index, exact_pts = measure_factory(vectors, factories[0], held, stop_at=target, **kw)
    exact = exact_pts[-1]
    best = choose(exact_pts, target, max_memory=max_memory, max_latency_ms=max_latency_ms)
    exact_ok = best is not None
    curve, skipped = list(exact_pts), []
    for f in factories[1:]:
        if max_memory is not None and estimate_memory(f, n, dim) > max_memory:
            skipped.append(f)
            continue
        # slower than exact search is never worth it, unless exact search breaks a budget
        slowest = exact["ms"] if exact_ok else None
        index, pts = measure_factory(vectors, f, held, stop_at=target, slowest_ms=slowest, **kw)
        curve += pts
        p = choose(pts, target, max_memory=max_memory, max_latency_ms=max_latency_ms)
        if p is not None and (best is None or p["ms"] < best["ms"]):
            best, best_index = p, index
        del index
    fallback = best is None
    if fallback:  # best_index is still the exact one
        best = exact
    set_search_params(best_index, nprobe=best.get("nprobe"), ef_search=best.get("ef_search"))
    note = _note(best, exact, fallback, target, held, curve, max_memory, max_latency_ms)
    logger.info("tuning: %s", note)
    record = {"target_recall": target, "k": K, "z": Z, "max_memory": max_memory,
              "max_latency_ms": max_latency_ms,
              "heldout": {"count": len(held), "source": held.source}, "curve": curve, "chosen": best,
              "exact": exact, "fallback": fallback, "met": True, "skipped_over_memory": skipped, "note": note,
              "seconds": round(time.time() - start, 1)}
    return Tuned(index=best_index, factory=best["factory"], nprobe=best.get("nprobe"),
                 ef_search=best.get("ef_search"), held=held, record=record)


def tune_for_config(vectors, cfg, *, queries=None, source: str = "queries", seed: int = 0,
                    progress: bool = False) -> Tuned:
    """`tune_index` with an IndexConfig's target, budgets and sample size (what build_index calls).

    queries: the pool the held-out sample is drawn from (captions of an image gallery), or None for
    gallery rows. cfg.factory, when set, is the only candidate besides exact Flat (its search
    parameter is tuned).
    """
    if not 0 < cfg.target_recall <= 1:
        raise ValueError(f"index.target_recall={cfg.target_recall} must lie in (0, 1], e.g. 0.95")
    held = held_out_sample(vectors, queries, size=cfg.heldout, seed=seed, source=source)
    n, dim = vectors.shape
    max_memory = parse_memory(cfg.max_memory)
    factories = candidate_factories(n, dim, fp16=cfg.fp16, max_memory=max_memory)
    if cfg.factory:
        factories = [factories[0]] + candidate_factories(n, dim, factory=cfg.factory, fp16=cfg.fp16)
    return tune_index(vectors, held, cfg.target_recall, factories=factories, max_memory=max_memory,
                      max_latency_ms=cfg.max_latency_ms or None, fp16=cfg.fp16, train_sample=cfg.train_sample,
                      seed=seed, use_gpu=cfg.use_gpu, progress=progress)


def tune_search(index, factory: str, held: HeldOut, target: float, *, max_latency_ms: float | None = None,
                exact_ms: float | None = None) -> dict:
    """Tune only the search parameter of a built index (an on-disk merged one): the manifest record.

    When no value meets `target`, the index keeps its most accurate value and the note says so.
    """
    start = time.time()
    curve = sweep(index, factory, held, stop_at=target, extra={"memory": None})
    best = choose(curve, target, max_latency_ms=max_latency_ms)
    sample = f"{len(held)} held-out {held.source}"
    if best is None:
        best = max(curve, key=lambda p: p["recall"])
        within = _budget_text(None, max_latency_ms)
        note = (f"no search parameter of {factory} meets recall@{K} {target:g}{within} on {sample}: using "
                f"{describe_point(best)} (recall {best['recall']:.3f}); rebuild with another index.factory "
                "(more lists, a Flat code) or in memory")
    else:
        speed = f", {exact_ms / max(best['ms'], 1e-9):.1f}x faster than exact search" if exact_ms else ""
        note = (f"{describe_point(best)} meets recall@{K} {target:g} on {sample} (measured "
                f"{best['recall']:.3f}) at {best['ms']:.3f} ms per query{speed}")
    set_search_params(index, nprobe=best.get("nprobe"), ef_search=best.get("ef_search"))
    logger.info("tuning: %s", note)
    return {"target_recall": target, "k": K, "z": Z, "max_memory": None, "max_latency_ms": max_latency_ms,
            "heldout": {"count": len(held), "source": held.source}, "curve": curve, "chosen": best,
            "exact": None, "fallback": False, "met": best["recall_low"] >= target, "skipped_over_memory": [],
            "note": note,
            "seconds": round(time.time() - start, 1)}
