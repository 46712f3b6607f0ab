"""Hard-negative mining: for each training pair, the k most similar other images and captions.

    mine("runs/domain-lora", "data/train-{0000..0003}.tar", "mined.jsonl", k=8, data_cfg=cfg.data)
    mine(None, shards, "mined.jsonl", model_cfg=cfg.model)        # mine with the base model

The training set is embedded with the run's model (or the base: `mmft.embeddings.embed`) and searched
with mmft's FAISS index code (`mmft.index.core.build_index`: exact below 250k vectors, IVF above), so
mining scales with the index, not with a Python double loop. A neighbour is skipped when it is the pair
itself, in the pair's group (the same product, class or duplicate: it would be a false negative), the
same caption string, or a near-duplicate (same-modality cosine above `threshold`). Neighbours come by
the same modality (`by="same"`: images near the pair's image, captions near its captions; look-alikes
the towers must tell apart) or across (`by="cross"`: images near its caption, captions near its image;
the confusions retrieval makes now). The file (mmft.mining.format) records which model mined it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from mmft.mining.format import write_mined

logger = logging.getLogger("mmft.mining")

BY = ("same", "cross")
_BATCH_FLOATS = 1 << 24  # queries filtered at once: their (queries, candidates, D) gather stays <= 64 MB


def mine(run=None, shards=None, out="mined.jsonl", *, k: int = 8, model_cfg=None, data_cfg=None,
         index_cfg=None, threshold: float = 0.95, by: str = "same", batch_size: int = 128,
         progress: bool = True) -> Path:
    """`mmft mine`: load the model of run directory `run` (or build model_cfg's base when run is None),
    embed `shards` (default data_cfg.train) and write the mined negatives to `out`. Returns out."""
    from mmft.config import DataConfig, ModelConfig

    data_cfg = data_cfg or DataConfig()
    specs = shards or data_cfg.train
    if not specs:
        raise ValueError("no shards to mine: pass --shards or set data.train in the config")
    if run is not None:
        from mmft.model.adapter import load_model

        model, preprocess, tokenizer = load_model(run)
        source = {"run": str(Path(run).resolve())}
    else:
        from mmft.model.factory import create_model

        model_cfg = model_cfg or ModelConfig()
        model, _, preprocess, tokenizer = create_model(model_cfg)
        source = {"base": model_cfg.name, "pretrained": model_cfg.pretrained}
    return mine_with_model(model, preprocess, tokenizer, specs, out, k=k, data_cfg=data_cfg,
                           index_cfg=index_cfg, threshold=threshold, by=by, batch_size=batch_size,
                           progress=progress, source=source)


def mine_with_model(model, preprocess, tokenizer, shards, out, *, k: int = 8, data_cfg=None, index_cfg=None,
                    threshold: float = 0.95, by: str = "same", batch_size: int = 128, progress: bool = True,
                    source: dict | None = None) -> Path:
    """Mine with a model already in memory (what re-mining during training calls); see `mine`."""
    from mmft.embeddings import embed, model_fingerprint

    _check_args(k, threshold, by)
    start = time.time()
    specs = [str(shards)] if isinstance(shards, (str, Path)) else [str(s) for s in shards]
    emb = embed(model, specs, tokenizer=tokenizer, preprocess=preprocess, data_cfg=data_cfg,
                batch_size=batch_size, progress=progress)
    records = mine_embeddings(emb, k=k, threshold=threshold, by=by, index_cfg=index_cfg)
    header = {"model": model_fingerprint(model), "source": source or {}, "shards": specs,
              "pairs": len(records), "k": k, "threshold": threshold, "by": by,
              "group_field": getattr(data_cfg, "group_field", ""), "seconds": round(time.time() - start, 3)}
    path = write_mined(out, header, records)
    short = sum(len(r["images"]) < k or len(r["texts"]) < k for r in records)
    logger.info("mined %d negatives per pair for %d pairs into %s (%d pairs with fewer)", k, len(records),
                path, short)
    return path


def _check_args(k, threshold, by) -> None:
    if k < 1:
        raise ValueError(f"k={k}: mine at least one negative per pair")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold} is a cosine similarity: give a value in [-1, 1] (e.g. 0.95)")
    if by not in BY:
        raise ValueError(f"by={by!r} is not one of {BY}")


def mine_embeddings(emb, *, k: int = 8, threshold: float = 0.95, by: str = "same",
                    index_cfg=None) -> list[dict]:
    """One record per image of `emb` (mmft.embeddings.Embeddings) with its k mined image and caption
    negatives, as mmft.mining.format writes them. Pairs with too few valid candidates get fewer."""
    _check_args(k, threshold, by)
    img = _unit(emb.image)  # (N, D)
    txt = _unit(emb.text)  # (C, D)
    owner = np.asarray(emb.caption_image, dtype=np.int64)  # (C,) image row of each caption
    n = len(emb.keys)
    groups = [g if g is not None else key for key, g in zip(emb.keys, emb.groups or [None] * n)]
    gcode = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1]  # (N,)
    ccode = np.unique(np.asarray([_norm(c) for c in emb.captions], dtype=object).astype(str),
                      return_inverse=True)[1] if len(emb.captions) else np.zeros(0, np.int64)  # (C,)
    cap_mean = _caption_means(txt, owner, n)  # (N, D)
    own_codes = _own_codes(ccode, owner, n)  # (N, m) caption codes of each pair, -1 padded
    img_q, txt_q = (img, cap_mean) if by == "same" else (cap_mean, img)
    img_pick = _neighbours(img_q, img, k, index_cfg, reject=lambda q, rows: (
        (rows == q[:, None]) | (gcode[rows] == gcode[q][:, None])
        | (np.einsum("qd,qkd->qk", img[q], img[rows]) > threshold)))
    txt_pick = _neighbours(txt_q, txt, k, index_cfg, unique=ccode, reject=lambda q, rows: (
        (owner[rows] == q[:, None]) | (gcode[owner[rows]] == gcode[q][:, None])
        | (ccode[rows][:, :, None] == own_codes[q][:, None, :]).any(-1)
        | (np.einsum("qd,qkd->qk", cap_mean[q], txt[rows]) > threshold)))
    return [_record(i, emb, groups, img_pick[i], txt_pick[i], owner) for i in range(n)]


def _record(i, emb, groups, img_pick, txt_pick, owner) -> dict:
    key = emb.keys[i]
    return {"key": key, "group": None if groups[i] == key else groups[i],
            "images": [emb.keys[j] for j, _ in img_pick], "image_scores": [round(s, 4) for _, s in img_pick],
            "texts": [emb.captions[c] for c, _ in txt_pick],
            "text_keys": [emb.keys[owner[c]] for c, _ in txt_pick],
            "text_scores": [round(s, 4) for _, s in txt_pick]}


def _neighbours(queries, gallery, k, index_cfg, reject, unique=None) -> list[list[tuple[int, float]]]:
    """For each query row, the first k gallery rows by similarity that `reject(q, rows)` lets through
    (and, with `unique` codes, no two with the same code): [(row, score)] per query.

    Candidates come from the FAISS index, 4k + 16 at first; queries left short search again with 4x as
    many, until they have k or the whole gallery was seen (at most log4(N) rounds)."""
    from mmft.index.core import build_index

    if not len(gallery) or not len(queries):
        return [[] for _ in range(len(queries))]
    index = build_index(gallery, index_cfg=index_cfg)
    out: list[list[tuple[int, float]]] = [[] for _ in range(len(queries))]
    todo, fetch = np.arange(len(queries)), 4 * k + 16
    while len(todo):
        fetch = min(fetch, len(gallery))
        short, step = [], max(1, _BATCH_FLOATS // (fetch * gallery.shape[1]))
        for s in range(0, len(todo), step):
            q = todo[s:s + step]
            scores, rows = index.search_rows(queries[q], fetch)  # (q, fetch) each
            ok = (rows >= 0) & ~reject(q, np.maximum(rows, 0))
            for r, qi in enumerate(q):
                out[qi] = _take(rows[r][ok[r]], scores[r][ok[r]], k, unique)
                if len(out[qi]) < k and fetch < len(gallery):
                    short.append(qi)
        todo, fetch = np.asarray(short, dtype=np.int64), fetch * 4
    return out


def _take(rows, scores, k, unique) -> list[tuple[int, float]]:
    picked, seen = [], set()
    for row, score in zip(rows.tolist(), scores.tolist()):
        if unique is not None:
            code = int(unique[row])
            if code in seen:
                continue
            seen.add(code)
        picked.append((row, score))
        if len(picked) == k:
            break
    return picked


def _unit(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12) if a.size else a


def _norm(caption: str) -> str:
    """A caption for duplicate checks: case and runs of whitespace do not make it another caption."""
    return " ".join(str(caption).lower().split())


def _caption_means(txt, owner, n) -> np.ndarray:
    """(N, D) unit mean of each image's caption vectors (zeros for an image without captions)."""
    mean = np.zeros((n, txt.shape[1] if txt.size else 1), np.float32)
    np.add.at(mean, owner, txt)
    return _unit(mean)


def _own_codes(ccode, owner, n) -> np.ndarray:
    """(N, m) caption-string codes of each pair's own captions, -1 padded (m = most captions of a pair)."""
    counts = np.bincount(owner, minlength=n) if len(owner) else np.zeros(n, np.int64)
    out = np.full((n, max(1, int(counts.max(initial=0)))), -1, np.int64)
    slot = np.zeros(n, np.int64)
    for c, i in enumerate(owner.tolist()):
        out[i, slot[i]] = ccode[c]
        slot[i] += 1
    return out
