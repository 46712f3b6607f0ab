"""Retrieval metrics over search results, exact ranks without an N x N matrix, and bootstrap CIs.

Relevance is label equality: query q and gallery item g are relevant to each other when
`q_labels[q] == g_labels[g]`. Instance-level text->image: a caption's label is its image row and an
image's label is its own row; image->text swaps the roles (so an image hits if ANY of its captions is
retrieved). Class-level: both sides carry the group id of their image instead.

Everything here is numpy. `search_metrics` reads top-k ids from any search (FAISS), `exact_first_ranks`
counts, block by block, the gallery items that score above the best relevant one, and
`reference_metrics` is the plain full-matrix computation the tests compare both against.
All recall/mAP values are fractions per query; reports multiply by 100.
"""
from __future__ import annotations

import numpy as np

AP_DEPTH = 10  # mAP@10


def group_codes(groups: list) -> tuple[list[str], np.ndarray]:
    """(sorted distinct group names, (N,) int64 index of each item's group in that list)."""
    names, codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return [str(n) for n in names], codes.astype(np.int64).reshape(-1)


def relevance_labels(caption_image: np.ndarray, n_images: int, groups: list | None = None,
                     relevance: str = "instance") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"t2i": (caption labels (M,), image labels (N,)), "i2t": (image labels (N,), caption labels (M,))}.

    relevance: "instance" (a caption belongs to one image) or "group" (any image of the same group).
    """
    caption_image = np.asarray(caption_image, dtype=np.int64)
    if relevance == "instance":
        img = np.arange(n_images, dtype=np.int64)
    elif relevance == "group":
        if groups is None or any(g is None for g in groups):
            raise ValueError("relevance='group' needs a group id for every image; set data.group_field "
                             "or use relevance='instance'")
        img = group_codes(groups)[1]
    else:
        raise ValueError(f"relevance={relevance!r} is not one of 'instance', 'group'")
    cap = img[caption_image]
    return {"t2i": (cap, img), "i2t": (img, cap)}


def relevant_counts(q_labels: np.ndarray, g_labels: np.ndarray) -> np.ndarray:
    """(Q,) number of gallery items relevant to each query."""
    size = int(max(q_labels.max(initial=-1), g_labels.max(initial=-1))) + 1
    return np.bincount(g_labels, minlength=size)[q_labels]


def search_metrics(top_ids: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray,
                   ks: list[int]) -> dict:
    """Per-query hits@k, AP@10 and first-hit position from top-K search results.

    top_ids: (Q, K) gallery rows best first (-1 = no result), K >= max(ks) and >= 10.
    Returns {"hits": {k: (Q,) bool}, "ap10": (Q,) float, "first": (Q,) int 0-based position of the
    first relevant result, -1 when none is in the top K}.
    """
    top_ids = np.asarray(top_ids)
    kmax = top_ids.shape[1]
    if kmax < max(max(ks), AP_DEPTH):
        raise ValueError(f"search returned {kmax} results per query, need at least {max(max(ks), AP_DEPTH)}")
    rel = (top_ids >= 0) & (g_labels[np.maximum(top_ids, 0)] == q_labels[:, None])  # (Q, K)
    any_rel = rel.any(1)
    first = np.where(any_rel, rel.argmax(1), -1)
    hits = {k: rel[:, :k].any(1) for k in ks}
    r10 = rel[:, :AP_DEPTH].astype(np.float64)  # (Q, 10)
    precision = np.cumsum(r10, 1) / np.arange(1, AP_DEPTH + 1)
    n_rel = np.minimum(relevant_counts(q_labels, g_labels), AP_DEPTH)
    ap10 = (precision * r10).sum(1) / np.maximum(n_rel, 1)
    return {"hits": hits, "ap10": ap10, "first": first}


def best_relevant_scores(queries: np.ndarray, gallery: np.ndarray, q_labels: np.ndarray,
                         g_labels: np.ndarray, pair_block: int = 65536) -> np.ndarray:
    """(Q,) max score over each query's relevant gallery items (-inf when it has none).

    Enumerates (query, relevant item) pairs in blocks, so memory is O(pair_block * D), never Q x N.
    """
    order = np.argsort(g_labels, kind="stable")
    size = int(max(q_labels.max(initial=-1), g_labels.max(initial=-1))) + 1
    starts = np.concatenate([[0], np.cumsum(np.bincount(g_labels, minlength=size))])  # (L+1,)
    lo, hi = starts[q_labels], starts[q_labels + 1]
    n_rel = hi - lo  # (Q,)
    best = np.full(len(q_labels), -np.inf, dtype=np.float32)
    q = 0
    while q < len(q_labels):
        # as many queries as fit in one block of pairs (at least one)
        cum = np.cumsum(n_rel[q:])
        end = q + max(1, int(np.searchsorted(cum, pair_block, side="right")))
        qs = np.repeat(np.arange(q, end), n_rel[q:end])  # (P,)
        offs = np.arange(len(qs)) - np.repeat(np.cumsum(n_rel[q:end]) - n_rel[q:end], n_rel[q:end])
        gs = order[lo[qs] + offs]  # (P,)
        if len(qs):
            s = np.einsum("pd,pd->p", _f32(queries[qs]), _f32(gallery[gs]))  # (P,)
            np.maximum.at(best, qs, s)
        q = end
    return best


def exact_first_ranks(queries: np.ndarray, gallery: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray,
                      *, q_block: int = 1024, g_block: int = 16384) -> np.ndarray:
    """(Q,) 1-based rank of each query's best relevant item: 1 + #other items scoring strictly higher.

    Two passes, memory O(q_block * g_block): the best relevant score by pair enumeration, then a count
    of higher-scoring non-relevant items block by block (relevant ones are left out of the count, so
    rounding differences between the two passes cannot push an item above itself). Queries without
    any relevant item get rank 0.
    """
    best = best_relevant_scores(queries, gallery, q_labels, g_labels)  # (Q,)
    higher = np.zeros(len(q_labels), dtype=np.int64)
    for qs in range(0, len(q_labels), q_block):
        qb = _f32(queries[qs:qs + q_block])  # (Qb, D)
        thr = best[qs:qs + q_block, None]  # (Qb, 1)
        ql = q_labels[qs:qs + q_block, None]  # (Qb, 1)
        for gs in range(0, len(gallery), g_block):
            s = qb @ _f32(gallery[gs:gs + g_block]).T  # (Qb, Gb)
            other = g_labels[None, gs:gs + g_block] != ql  # (Qb, Gb)
            higher[qs:qs + q_block] += ((s > thr) & other).sum(1)
    return np.where(np.isfinite(best), higher + 1, 0)


def reference_metrics(queries: np.ndarray, gallery: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray,
                      ks: list[int]) -> dict:
    """Full-matrix reference for `search_metrics` + `exact_first_ranks` (small inputs only: Q x N memory)."""
    s = _f32(queries) @ _f32(gallery).T  # (Q, N)
    rel = g_labels[None, :] == q_labels[:, None]  # (Q, N)
    order = np.argsort(-s, axis=1, kind="stable")
    rel_sorted = np.take_along_axis(rel, order, 1)  # (Q, N)
    top = order[:, :max(max(ks), AP_DEPTH)]
    out = search_metrics(top, q_labels, g_labels, ks)
    best = np.where(rel, s, -np.inf).max(1)  # (Q,)
    out["rank"] = np.where(rel.any(1), ((s > best[:, None]) & ~rel).sum(1) + 1, 0)
    out["first_sorted"] = np.where(rel_sorted.any(1), rel_sorted.argmax(1), -1)
    return out


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


# ---------------------------------------------------------------- bootstrap


def bootstrap_means(values: np.ndarray, n: int = 1000, seed: int = 0, max_elems: int = 1 << 23) -> np.ndarray:
    """(n, V) means of the V rows of `values` (V, Q) over n resamples of the Q queries.

    All rows share each resample (the same queries drawn with replacement), so differences between
    rows give a paired bootstrap. Resamples are drawn in chunks of at most `max_elems` indices.
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))  # (V, Q)
    v, q = values.shape
    if q == 0:
        return np.full((n, v), np.nan)
    rng = np.random.default_rng(seed)
    out = np.empty((n, v))
    step = max(1, max_elems // q)
    for s in range(0, n, step):
        idx = rng.integers(0, q, size=(min(step, n - s), q))  # (b, Q)
        out[s:s + len(idx)] = values[:, idx].mean(-1).T  # (b, V)
    return out


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (n,)."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_ci(values: np.ndarray, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """95% (level) percentile bootstrap CI of the mean of per-query values (Q,)."""
    return percentile_ci(bootstrap_means(values, n, seed)[:, 0], level)


def paired_delta_ci(a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float, float]:
    """(mean(b) - mean(a), lo, hi): paired bootstrap over the same queries scored two ways (Q,) each."""
    means = bootstrap_means(np.stack([a, b]), n, seed)  # (n, 2)
    lo, hi = percentile_ci(means[:, 1] - means[:, 0], level)
    return float(np.mean(b) - np.mean(a)), lo, hi
