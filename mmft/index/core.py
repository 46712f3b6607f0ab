"""FAISS search indexes over unit-norm embeddings, saved with a manifest that pins the model.

    index = build_index(emb, "runs/x/index", index_cfg=IndexConfig())   # image gallery of `emb`
    scores, ids = index.search_text(["a red apple"], model, tokenizer, k=5)   # (1, 5) each
    index = load_index("runs/x/index", model=model)   # refuses a model that embeds differently

Inner product on L2-normalised vectors (= cosine). A saved index is a directory: `index.faiss` (always
the CPU form), `ids.json` and `manifest.json` (written last, so its presence marks a complete index).
The manifest (mmft.index.manifest) pins the base-model identity, the adapter sha256 and the LoRA scale:
an index queried with another model returns silently wrong neighbours, so loading refuses it in a sentence.
faiss is imported on first use; GPU FAISS is used when installed and a GPU is visible.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmft.config import IndexConfig
from mmft.index.faiss_backend import (  # noqa: F401  (re-exported: the FAISS helpers belong to the index API)
    FLAT_MAX,
    apply_fp16,
    apply_search_defaults,
    default_factory,
    default_nlist,
    default_nprobe,
    extract_ivf,
    faiss_module,
    new_faiss_index,
    resolve_factory,
    set_search_params,
    to_cpu,
    to_gpu,
    unit_rows,
)
from mmft.index.manifest import (  # noqa: F401  (re-exported: the manifest's errors and names)
    HELDOUT_FILE,
    IDS_FILE,
    INDEX_FILE,
    INDEX_FORMAT,
    MANIFEST_FILE,
    IndexLoadError,
    StaleIndexError,
    check_fingerprint,
    fingerprint_of,
    index_manifest,
    read_ids,
    read_manifest,
    write_manifest,
)
from mmft.index.versions import current_version, drop_versions, remove_old_versions
from mmft.io import atomic_path


@dataclass(repr=False)
class Index:
    """A FAISS index with the id of every row and the manifest describing how it was built."""

    index: Any  # faiss index (CPU or GPU)
    ids: np.ndarray  # (N,) str: gallery ids in row order
    manifest: dict
    path: Path | None = None
    heldout: Any = None  # a tuned index's mmft.index.heldout.HeldOut (saved as heldout.npz)

    def __repr__(self) -> str:
        m = self.manifest
        probe = f", nprobe {m['nprobe']}" if m.get("nprobe") else ""
        kind = "" if m.get("modality") in (None, "vectors") else f"{m['modality']} "
        return (f"Index({self.ntotal:,} {kind}vectors of dim {self.dim}, "
                f"{m.get('factory')}{probe}, {self.path or 'in memory'})")

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def check_model(self, model) -> None:
        """Raise StaleIndexError unless `model` embeds as the model this index was built with."""
        from mmft.embeddings import model_fingerprint

        check_fingerprint(self.manifest, model_fingerprint(model), str(self.path or "memory"))

    def search(self, queries: np.ndarray, k: int = 10, *, nprobe: int | None = None,
               ef_search: int | None = None, batch_size: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query row (Q, D) -> (scores (Q, k) float32, ids (Q, k) str; '' / -inf past the
        end)."""
        if nprobe or ef_search:
            set_search_params(self.index, nprobe=nprobe, ef_search=ef_search)
        scores, rows = self.search_rows(queries, k, batch_size=batch_size)
        ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)] if len(self.ids) else "", "")
        return scores, ids

    def search_rows(self, queries: np.ndarray, k: int, *,
                    batch_size: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
        """Like `search` but returns gallery row numbers (Q, k) int64 (-1 and -inf past the end)."""
        queries = np.atleast_2d(np.asarray(queries))
        if queries.shape[1] != self.dim:
            where = self.path or "memory"
            raise ValueError(f"queries have dimension {queries.shape[1]} but the index in {where} "
                             f"holds {self.dim}-d vectors: embed queries with the model the index was "
                             "built with")
        k = int(k)
        scores = np.empty((len(queries), k), np.float32)  # (Q, k)
        rows = np.empty((len(queries), k), np.int64)  # (Q, k)
        for s in range(0, len(queries), batch_size):
            scores[s:s + batch_size], rows[s:s + batch_size] = self.index.search(
                unit_rows(queries[s:s + batch_size]), k)
        scores[rows < 0] = -np.inf
        return scores, rows

    def search_text(self, texts: list[str] | str, model, tokenizer,
                    k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Embed query texts with `model` (checked against the manifest) and search: (Q, k) scores and ids."""
        from mmft.embeddings import encode_texts

        self.check_model(model)
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.search(encode_texts(model, tokenizer, texts), k)

    def search_image(self, images, model, preprocess=None, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Embed query images (tensor, PIL images or paths) with `model` (checked) and search."""
        from mmft.embeddings import encode_images

        self.check_model(model)
        return self.search(encode_images(model, images, preprocess=preprocess), k)

    def save(self, out_dir: str | Path) -> Path:
        """Write index.faiss (CPU form), ids.json, then manifest.json, each atomically."""
        faiss = faiss_module()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        replaced = drop_versions(out_dir)  # a rebuild supersedes the versions appends wrote
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # a half-replaced index must not load
        with atomic_path(out_dir / INDEX_FILE) as tmp:
            faiss.write_index(to_cpu(self.index), str(tmp))
        with atomic_path(out_dir / IDS_FILE) as tmp:
            tmp.write_text(json.dumps([str(i) for i in self.ids]))
        if self.heldout is not None:
            self.heldout.save(out_dir / HELDOUT_FILE)
        else:
            (out_dir / HELDOUT_FILE).unlink(missing_ok=True)
        write_manifest(out_dir, self.manifest)
        if replaced:
            remove_old_versions(out_dir)
        self.path = out_dir
        return out_dir


def caption_ids(image_ids, caption_image) -> list[str]:
    """Gallery ids of caption rows: caption j of image `image_ids[i]` is "<image id>/j".

    caption_image (M,) gives each caption's image row; j counts that image's captions in row order.
    """
    seen: dict[int, int] = {}
    out = []
    for i in np.asarray(caption_image).tolist():
        seen[i] = seen.get(i, -1) + 1
        out.append(f"{image_ids[i]}/{seen[i]}")
    return out


def _gallery(source, ids, modality: str | None) -> tuple[np.ndarray, np.ndarray, str, dict | None]:
    """(vectors (N, D), ids (N,), modality, fingerprint or None) from Embeddings or a plain array."""
    from mmft.embeddings import Embeddings

    if isinstance(source, Embeddings):
        modality = modality or "image"
        if modality not in ("image", "text"):
            raise ValueError(f"modality={modality!r}: an Embeddings gallery is 'image' or 'text'")
        vectors = source.image if modality == "image" else source.text
        if ids is None:
            ids = source.keys if modality == "image" else caption_ids(source.keys, source.caption_image)
        fp = fingerprint_of(source.meta) if source.meta else None
        return vectors, ids, modality, fp
    vectors = np.asarray(source) if not isinstance(source, np.memmap) else source
    if vectors.ndim != 2:
        raise ValueError(f"index vectors must be a 2-d array (N, D), got shape {vectors.shape}")
    return vectors, ids, modality or "vectors", None


def build_index(source, out_dir: str | Path | None = None, *, ids=None, model=None,
                index_cfg: IndexConfig | None = None, modality: str | None = None,
                ef_search: int | None = None, seed: int = 0, progress: bool = False,
                extra: dict | None = None, queries=None) -> Index:
    """Build a FAISS index over Embeddings (image rows by default, or modality="text") or vectors (N, D).

    The manifest pins the model: taken from the Embeddings, or from `model` for plain vectors (a model
    given with Embeddings must match them). index_cfg.factory "" picks `default_factory(N)`;
    index_cfg.fp16 stores float16; IVF/PQ train on index_cfg.train_sample rows; saved when out_dir is set.
    index_cfg.target_recall > 0 tunes the factory and its search parameter on held-out queries
    (mmft.index.tuning): drawn from `queries` (M, D), else the Embeddings' other modality, else the gallery.
    """
    from mmft.embeddings import model_fingerprint

    cfg = index_cfg or IndexConfig()
    vectors, ids, modality, fp = _gallery(source, ids, modality)
    n, dim = vectors.shape
    if n == 0 or dim == 0:
        raise ValueError(f"cannot build an index over an empty {modality} gallery (shape {vectors.shape}); "
                         "embed the gallery with that modality first")
    ids = np.asarray([str(i) for i in ids] if ids is not None else [str(i) for i in range(n)])
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} vectors: give exactly one id per gallery row")
    if model is not None:
        current = model_fingerprint(model)
        if fp is not None and fp.get("model") is not None:
            check_fingerprint(fp, current, "these embeddings")
        fp = current
    factory = resolve_factory(cfg.factory, n, cfg.fp16)
    start = time.time()
    nprobe, held = cfg.nprobe, None
    if cfg.target_recall and cfg.factory != "Flat":
        from mmft.index.heldout import default_queries
        from mmft.index.tuning import tune_for_config

        kind = {"image": "captions", "text": "images"}.get(modality, "queries")
        pool, kind = (queries, kind) if queries is not None else default_queries(source, modality)
        tuned = tune_for_config(vectors, cfg, queries=pool, source=kind, seed=seed, progress=progress)
        index, factory, held = tuned.index, tuned.factory, tuned.held
        nprobe, ef_search = tuned.nprobe, tuned.ef_search
        extra = {**(extra or {}), "tuning": tuned.record}
    else:
        index = new_faiss_index(vectors, factory, train_sample=cfg.train_sample, seed=seed,
                                use_gpu=cfg.use_gpu, progress=progress)
    return finish_index(index, ids, factory=factory, fingerprint=fp, modality=modality, start=start,
                        nprobe=nprobe, ef_search=ef_search, extra=extra, out_dir=out_dir, heldout=held)


def finish_index(index, ids, *, factory: str, fingerprint: dict | None, modality: str, start: float,
                 nprobe: int = 0, ef_search: int | None = None, extra: dict | None = None,
                 out_dir: str | Path | None = None, heldout=None) -> Index:
    """The last step of every builder: search defaults, the manifest, and a save when out_dir is set.

    index: a trained and filled FAISS index; ids (N,) its gallery ids; start: time.time() at the start.
    """
    nprobe, ef_search = apply_search_defaults(index, factory, nprobe, ef_search)
    manifest = index_manifest(fingerprint, dim=index.d, count=index.ntotal, factory=factory, nprobe=nprobe,
                              ef_search=ef_search, modality=modality, build_seconds=time.time() - start,
                              extra=extra)
    out = Index(index=index, ids=np.asarray(ids), manifest=manifest, heldout=heldout)
    if out_dir is not None:
        out.save(out_dir)
    return out


def load_index(path: str | Path, model=None, *, use_gpu: str = "auto", mmap: bool = False) -> Index:
    """Open a saved index; with `model`, refuse (StaleIndexError) one built with another model/adapter/scale.

    mmap=True memory-maps the vectors (flat codes, IVF lists) read-only, so processes share one copy.
    """
    faiss = faiss_module()
    path = current_version(Path(path))  # the version CURRENT names (mmft.index.versions), else the folder
    manifest = read_manifest(path)
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    if mmap:  # flat codes and IVF lists take different flags; CPU only
        flags = (faiss.IO_FLAG_MMAP if "IVF" in str(manifest.get("factory")) else faiss.IO_FLAG_MMAP_IFC)
        use_gpu = "never"
    try:
        # IO_FLAG_ONDISK_SAME_DIR: an on-disk merged index finds index.ivfdata beside it, wherever moved
        index = faiss.read_index(str(path / INDEX_FILE), flags)
    except RuntimeError as e:
        reason = str(e).strip().split("Error: ")[-1][:120]  # FAISS's own words, after its C++ location
        raise IndexLoadError(f"{path / INDEX_FILE} is not a readable FAISS index ({reason}); rebuild it with "
                             "`mmft index build`") from None
    ids = np.asarray(read_ids(path, manifest))
    if not (index.ntotal == len(ids) == manifest.get("count")) or index.d != manifest.get("dim"):
        raise IndexLoadError(
            f"index in {path} is inconsistent: {INDEX_FILE} holds {index.ntotal} vectors of dim {index.d}, "
            f"{IDS_FILE} lists {len(ids)} ids, the manifest says {manifest.get('count')} of dim "
            f"{manifest.get('dim')}; rebuild it with `mmft index build`")
    out = Index(index=index, ids=ids, manifest=manifest, path=path)
    if model is not None:
        out.check_model(model)
    out.index = index if manifest.get("ondisk") else to_gpu(index, use_gpu)  # on-disk lists stay on disk
    set_search_params(out.index, nprobe=manifest.get("nprobe"), ef_search=manifest.get("ef_search"))
    return out


# ---------------------------------------------------------------- one call per CLI verb


def build_index_from_model(model, shards, out_dir: str | Path, *, tokenizer=None, preprocess=None,
                           index_cfg: IndexConfig | None = None, data_cfg=None, modality: str = "image",
                           batch_size: int = 128, keep_embeddings: bool = False, progress: bool = True,
                           extra: dict | None = None) -> Index:
    """Embed the gallery `shards` with `model` at index_cfg.lora_scale and save an index in `out_dir`.

    Vectors stream to out_dir/embeddings (kept with keep_embeddings, else removed after the build).
    The model's LoRA scale is restored afterwards.
    """
    import shutil

    from mmft.embeddings import embed
    from mmft.model.lora import has_adapter, lora_scale

    cfg = index_cfg or IndexConfig()
    out_dir = Path(out_dir)
    emb_dir = out_dir / "embeddings"
    try:
        with lora_scale(model, cfg.lora_scale if has_adapter(model) else None):
            emb = embed(model, shards, tokenizer=tokenizer, preprocess=preprocess, data_cfg=data_cfg,
                        batch_size=batch_size, fp16=cfg.fp16, out_dir=emb_dir, progress=progress,
                        modality="both" if cfg.target_recall else modality)  # tuning holds out captions
        specs = [shards] if isinstance(shards, (str, Path)) else shards
        is_specs = isinstance(specs, (list, tuple)) and all(isinstance(s, (str, Path)) for s in specs)
        source = {"shards": [str(s) for s in specs] if is_specs else "in-memory batches"}
        index = build_index(emb, out_dir, index_cfg=cfg, modality=modality, progress=progress,
                            extra={"source": {**source, **(extra or {})}})
        if is_specs and cfg.thumbnails:  # what a search page shows, so serving needs no shards
            from mmft.index.thumbnails import write_thumbnails

            write_thumbnails(specs, out_dir, size=cfg.thumbnails, data_cfg=data_cfg)
    finally:
        if not keep_embeddings:
            shutil.rmtree(emb_dir, ignore_errors=True)
    return index


def build_index_from_run(run_dir: str | Path, shards, out_dir: str | Path | None = None,
                         index_cfg: IndexConfig | None = None, *, data_cfg=None, modality: str = "image",
                         batch_size: int = 128, keep_embeddings: bool = False,
                         progress: bool = True) -> Index:
    """`mmft index build`: load base + adapter from a training run, embed `shards`, save the index.

    out_dir defaults to run_dir/index. The manifest records run_dir so `query_index` can find the model.
    """
    from mmft.model.adapter import load_model
    from mmft.rundir import RunDir

    model, preprocess, tokenizer = load_model(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else RunDir(run_dir).index_dir
    return build_index_from_model(model, shards, out_dir, tokenizer=tokenizer, preprocess=preprocess,
                                  index_cfg=index_cfg, data_cfg=data_cfg, modality=modality,
                                  batch_size=batch_size,
                                  keep_embeddings=keep_embeddings, progress=progress,
                                  extra={"run_dir": str(Path(run_dir).resolve())})


def _model_for(index_dir: Path, manifest: dict, model):
    """(model, preprocess, tokenizer) from a model triple/object, a run directory, or the manifest's
    run_dir."""
    if model is None:
        model = (manifest.get("source") or {}).get("run_dir")
        if model is None:
            raise ValueError(f"index in {index_dir} records no run directory: pass the run directory or "
                             "model that built it")
    if isinstance(model, (str, Path)):
        from mmft.model.adapter import adapter_digest, load_model
        from mmft.model.lora import has_adapter, set_lora_scale

        m, preprocess, tokenizer = load_model(model)
        # A freshly loaded run sits at scale 1; the same adapter at the index's scale embeds as the index did.
        if manifest.get("adapter_sha256") is None and has_adapter(m):
            set_lora_scale(m, 0.0)
        elif manifest.get("adapter_sha256") == adapter_digest(m):
            set_lora_scale(m, manifest["lora_scale"])
        return m, preprocess, tokenizer
    if isinstance(model, tuple):
        return model
    return model, None, None


def query_index(index_dir: str | Path, model=None, *, text=None, image=None, vector=None, k: int = 10,
                tokenizer=None, preprocess=None, index_cfg: IndexConfig | None = None) -> list[list[dict]]:
    """`mmft index query`: top-k gallery ids for text(s), image path(s)/PIL image(s) or vector(s).

    model: a run directory (loaded at the index's LoRA scale), a model (checked against the manifest),
    a (model, preprocess, tokenizer) triple, or None to load the run directory recorded in the manifest.
    index_cfg: its use_gpu, and its nprobe when not 0 (else the manifest's). Returns one list per query
    of {"rank", "id", "score"}.
    """
    cfg = index_cfg or IndexConfig()
    index_dir = Path(index_dir)
    given = sum(x is not None for x in (text, image, vector))
    if given != 1:
        raise ValueError("query_index takes exactly one of text=, image= or vector=")
    if vector is not None:
        index = load_index(index_dir, use_gpu=cfg.use_gpu)
        scores, ids = index.search(np.atleast_2d(np.asarray(vector, dtype=np.float32)), k, nprobe=cfg.nprobe)
    else:
        m, pre, tok = _model_for(index_dir, read_manifest(index_dir), model)
        index = load_index(index_dir, model=m, use_gpu=cfg.use_gpu)
        set_search_params(index.index, nprobe=cfg.nprobe)
        if text is not None:
            scores, ids = index.search_text(text, m, tokenizer or tok, k)
        else:
            # a (B, 3, S, S) tensor passes as is; one path or PIL image becomes a list of one
            images = image if hasattr(image, "shape") or isinstance(image, (list, tuple)) else [image]
            scores, ids = index.search_image(images, m, preprocess or pre, k)
    return [[{"rank": r + 1, "id": str(i), "score": float(s)} for r, (i, s) in enumerate(zip(row_i, row_s))
             if i != ""] for row_i, row_s in zip(ids, scores)]
