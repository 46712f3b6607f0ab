"""The held-out sample an index is measured on: queries, their exact neighbours, recall@k.

An index's recall is only known against exact answers, so the queries kept for measuring it are
saved with their exact top neighbours (heldout.npz in the index folder). An append extends those
neighbours with the new rows alone, so recall is re-measured without the old vectors. `exact_topk`
(FAISS brute-force kNN per block) sits beside `exact_topk_reference` (numpy), and tests compare them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from mmft.index.faiss_backend import faiss_module, unit_rows

K = 10  # recall@K is what a recall target means
KEEP = 2 * K  # exact neighbours saved per query: enough to accept ties at the K-th score
_BLOCK = 65_536


# ---------------------------------------------------------------- exact neighbours


def _gallery_blocks(gallery, block: int = _BLOCK):
    """(start, unit rows (b, D) float32) over a gallery: an array, memory map or anything sliceable."""
    for s in range(0, len(gallery), block):
        yield s, unit_rows(np.asarray(gallery[s:s + block]))


def _merge_topk(scores: np.ndarray, rows: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The `keep` best (highest score) of each row of (Q, m) candidates, best first."""
    if scores.shape[1] > keep:
        part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]  # (Q, keep)
        scores, rows = np.take_along_axis(scores, part, 1), np.take_along_axis(rows, part, 1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def exact_topk_reference(queries: np.ndarray, gallery, keep: int = KEEP, *, exclude=None,
                         offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`keep` by inner product with numpy: (scores (Q, keep) float32, rows (Q, keep) int64).

    exclude (Q,): a gallery row each query may not return (itself), -1 for none; rows are numbered from
    `offset`. Missing entries (a gallery smaller than keep) are -inf / -1.
    """
    q = unit_rows(queries)  # (Q, D)
    best_s = np.full((len(q), keep), -np.inf, np.float32)  # (Q, keep)
    best_r = np.full((len(q), keep), -1, np.int64)
    for s, g in _gallery_blocks(gallery):
        sc = q @ g.T  # (Q, b)
        if exclude is not None:
            hit = (exclude >= offset + s) & (exclude < offset + s + len(g))
            sc[np.flatnonzero(hit), exclude[hit] - offset - s] = -np.inf
        rows = np.broadcast_to(np.arange(offset + s, offset + s + len(g)), sc.shape)
        best_s, best_r = _merge_topk(np.hstack([best_s, sc]), np.hstack([best_r, rows]), keep)
    best_r[~np.isfinite(best_s)] = -1
    return best_s, best_r


def exact_topk(queries: np.ndarray, gallery, keep: int = KEEP, *, exclude=None,
               offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`exact_topk_reference` through FAISS's brute-force kNN (heaps instead of a full sort per block)."""
    faiss = faiss_module()
    q = unit_rows(queries)  # (Q, D)
    extra = 1 if exclude is not None else 0  # one more, so that dropping the query itself leaves `keep`
    best_s = np.full((len(q), keep), -np.inf, np.float32)
    best_r = np.full((len(q), keep), -1, np.int64)
    for s, g in _gallery_blocks(gallery):
        kk = min(keep + extra, len(g))
        sc, ix = faiss.knn(q, g, kk, metric=faiss.METRIC_INNER_PRODUCT)  # (Q, kk) each
        rows = np.where(ix >= 0, ix + offset + s, -1)
        if exclude is not None:
            sc = np.where(rows == exclude[:, None], -np.inf, sc).astype(np.float32)
        best_s, best_r = _merge_topk(np.hstack([best_s, sc]), np.hstack([best_r, rows]), keep)
    best_r[~np.isfinite(best_s)] = -1
    return best_s, best_r


def recall_at_k(found: np.ndarray, exact_rows: np.ndarray, exact_scores: np.ndarray, k: int = K,
                tol: float = 1e-5) -> np.ndarray:
    """(Q,) recall@k of found rows (Q, >= k) against the exact neighbours (Q, KEEP), best first.

    A found row counts when it is among the exact neighbours scoring at least the k-th exact score
    (minus tol): ties at the k-th place are accepted, whichever of them an index returns.
    """
    kth = exact_scores[:, k - 1:k] - tol  # (Q, 1)
    ok = np.where(exact_scores >= kth, exact_rows, -2)  # (Q, KEEP): acceptable rows, -2 elsewhere
    hits = (found[:, :k, None] == ok[:, None, :]).any(2) & (found[:, :k] >= 0)  # (Q, k)
    want = np.minimum(k, (exact_rows >= 0).sum(1))  # a gallery smaller than k
    return hits.sum(1) / np.maximum(want, 1)


# ---------------------------------------------------------------- the held-out sample


@dataclasses.dataclass
class HeldOut:
    """Queries kept for measuring recall, with their exact neighbours in the gallery."""

    queries: np.ndarray  # (Q, D) float32 unit rows
    scores: np.ndarray  # (Q, KEEP) float32 exact scores, best first (-inf past the end)
    rows: np.ndarray  # (Q, KEEP) int64 gallery rows of those neighbours (-1 past the end)
    self_rows: np.ndarray  # (Q,) int64 the gallery row a query was taken from (-1: a caption)
    source: str  # "captions", "images", "queries" or "gallery rows"

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def exclude(self) -> np.ndarray | None:
        return self.self_rows if (self.self_rows >= 0).any() else None

    def extend(self, vectors, offset: int) -> HeldOut:
        """The sample after appending `vectors` (m, D) as gallery rows offset.. offset+m-1."""
        s, r = exact_topk(self.queries, vectors, self.rows.shape[1], exclude=self.exclude, offset=offset)
        scores, rows = _merge_topk(np.hstack([self.scores, s]), np.hstack([self.rows, r]), self.rows.shape[1])
        rows[~np.isfinite(scores)] = -1
        return dataclasses.replace(self, scores=scores, rows=rows)

    def save(self, path: str | Path) -> None:
        from mmft.io import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, queries=self.queries, scores=self.scores, rows=self.rows, self_rows=self.self_rows,
                     source=np.asarray(self.source))

    @classmethod
    def load(cls, path: str | Path) -> HeldOut:
        with np.load(path) as z:
            return cls(queries=z["queries"], scores=z["scores"], rows=z["rows"], self_rows=z["self_rows"],
                       source=str(z["source"]))


def held_out_sample(gallery, queries=None, *, size: int = 1000, seed: int = 0, source: str = "queries",
                    keep: int = KEEP) -> HeldOut:
    """A seeded sample of `size` queries and their exact neighbours in `gallery` (N, D).

    queries: where to draw them (captions of an image gallery: any sliceable (M, D)); None or empty =
    gallery rows, each excluded from its own neighbours.
    """
    rng = np.random.default_rng(seed)
    if queries is not None and len(queries):
        pick = np.sort(rng.choice(len(queries), size=min(size, len(queries)), replace=False))
        q, self_rows = unit_rows(np.asarray(queries[pick])), np.full(len(pick), -1, np.int64)
    else:
        pick = np.sort(rng.choice(len(gallery), size=min(size, len(gallery)), replace=False))
        q, self_rows, source = unit_rows(np.asarray(gallery[pick])), pick.astype(np.int64), "gallery rows"
    exclude = self_rows if source == "gallery rows" else None
    scores, rows = exact_topk(q, gallery, keep, exclude=exclude)
    return HeldOut(queries=q, scores=scores, rows=rows, self_rows=self_rows, source=source)


def default_queries(source, modality: str):
    """The held-out queries' pool of an Embeddings gallery: the other modality's vectors, else None."""
    other = getattr(source, "text" if modality == "image" else "image", None)
    if other is None or not len(other) or np.asarray(other[:1]).shape[-1] == 0:
        return None, "gallery rows"
    return other, ("captions" if modality == "image" else "images")
