"""`mmft index add`: append vectors to a built index without rebuilding it, as a new version.

    add_to_index("runs/index", ["data/new-00000.tar"])        # embeds with the run the manifest records

The new vectors must come from the model the index pins (the stale-index check refuses others). They
go into a copy of the current version, reusing its trained quantiser (IVF lists, HNSW graph, codes),
and the copy is written as versions/v000n beside the old one, then made current atomically
(mmft.index.versions), so a search service's reload picks it up while the old version keeps serving.
A tuned index re-measures recall@10 on its saved held-out queries (their exact neighbours extended
with the new rows): the quantiser was trained on the old vectors only, so when recall falls below the
target the result says a rebuild is due.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from mmft.index.core import Index, caption_ids, load_index, set_search_params
from mmft.index.faiss_backend import extract_ivf, faiss_module, unit_rows
from mmft.index.heldout import HeldOut
from mmft.index.manifest import HELDOUT_FILE, check_fingerprint, fingerprint_of
from mmft.index.tuning import measure_point
from mmft.index.versions import current_version, next_version_dir, switch_version, version_number

logger = logging.getLogger("mmft.index.append")
_ADD_CHUNK = 65_536


@dataclasses.dataclass
class AddResult:
    """What an append did: the new version, its size, the re-measured recall and whether to rebuild."""

    index: Index
    added: int
    version: int
    recall: float | None  # recall@10 on the held-out sample after the append (None: not tuned)
    rebuild_due: bool
    note: str


def _new_ids(index: Index, ids) -> np.ndarray:
    new = np.asarray([str(i) for i in ids])
    clash = np.intersect1d(new, index.ids)
    if len(clash) or len(np.unique(new)) != len(new):
        values, counts = np.unique(new, return_counts=True)
        example = str(clash[0] if len(clash) else values[np.argmax(counts > 1)])
        raise ValueError(f"id {example!r} is already in the index in {index.path} (or given twice): an "
                         "append adds new items only; give them other keys or rebuild the index")
    return new


def _add_rows(index: Index, vectors: np.ndarray, version_dir: Path) -> object:
    """The faiss index holding the old rows and `vectors`, in memory, or on disk beside version_dir."""
    if index.manifest.get("ondisk"):
        return _add_ondisk(index, vectors, version_dir)
    out = index.index  # loaded from disk: adding changes this copy only, never the old version's files
    for s in range(0, len(vectors), _ADD_CHUNK):
        out.add(unit_rows(vectors[s:s + _ADD_CHUNK]))
    return out


def _empty_like(path: Path):
    """The trained index of `path` (quantiser, codebooks) with empty in-memory lists."""
    faiss = faiss_module()
    index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA)  # the lists are not read
    ivf = extract_ivf(index)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns them now
    index.ntotal = ivf.ntotal = 0
    return index


def _add_ondisk(index: Index, vectors: np.ndarray, version_dir: Path):
    """An on-disk merged index: old lists + a sub-index of the new rows, merged into a new index.ivfdata."""
    from mmft.index.distributed import IVFDATA_FILE

    faiss = faiss_module()
    n = index.ntotal
    sub = _empty_like(index.path / "index.faiss")
    for s in range(0, len(vectors), _ADD_CHUNK):
        rows = np.arange(n + s, n + min(len(vectors), s + _ADD_CHUNK))  # ids continue the old rows
        sub.add_with_ids(unit_rows(vectors[s:s + _ADD_CHUNK]), rows)
    out = _empty_like(index.path / "index.faiss")
    out_ivf = extract_ivf(out)
    data = str((version_dir / IVFDATA_FILE).resolve())
    lists = faiss.OnDiskInvertedLists(out_ivf.nlist, out_ivf.code_size, data)
    parts = faiss.InvertedListsPtrVector()
    for part in (extract_ivf(index.index).invlists, extract_ivf(sub).invlists):
        parts.push_back(part)
    total = lists.merge_from_multiple(parts.data(), parts.size(), False)
    out_ivf.replace_invlists(lists, True)
    lists.this.disown()
    out.ntotal = out_ivf.ntotal = total
    return out


def _remeasure(faiss_index, manifest: dict, held: HeldOut | None, n_old: int, vectors) -> tuple:
    """(held-out sample extended with the new rows, point measured now or None, rebuild due)."""
    tuning = manifest.get("tuning")
    if held is None or not tuning:
        return None, None, False
    held = held.extend(vectors, n_old)
    point = measure_point(faiss_index, held, nprobe=manifest.get("nprobe"),
                          ef_search=manifest.get("ef_search"))
    return held, point, point["recall"] < tuning["target_recall"]


def _note(root: Path, added: int, total: int, version: int, manifest: dict, point: dict | None,
          due: bool) -> str:
    head = f"added {added:,} vectors to {root} (now {total:,}) as version {version}"
    tuning = manifest.get("tuning")
    if point is None:
        return (f"{head}; the index was built without a recall target, so recall is not re-measured "
                "(build with --target-recall to track it)")
    held = tuning["heldout"]
    measured = (f"recall@10 on {held['count']} held-out {held['source']} is {point['recall']:.3f} "
                f"(target {tuning['target_recall']:g})")
    if due:
        return (f"{head}; {measured}, below the target: rebuild the index with `mmft index build` (its "
                "quantiser was trained before these vectors were added)")
    return f"{head}; {measured}"


def append_vectors(index_dir: str | Path, vectors, ids, *, fingerprint: dict | None = None,
                   source: dict | None = None) -> AddResult:
    """Append `vectors` (m, D) with gallery `ids` (m,) to the current version of index `index_dir`.

    fingerprint: mmft.embeddings.model_fingerprint of the model that embedded them, checked against
    the manifest (StaleIndexError when it differs; None only for an index built from plain vectors).
    source: recorded with the append (e.g. {"shards": [...]}).
    """
    root = Path(index_dir)
    index = load_index(root, use_gpu="never")
    if fingerprint is not None or fingerprint_of(index.manifest)["model"] is not None:
        check_fingerprint(index.manifest, fingerprint_of(fingerprint), str(index.path))
    vectors = np.asarray(vectors) if not isinstance(vectors, np.memmap) else vectors
    if vectors.ndim != 2 or vectors.shape[1] != index.dim or len(vectors) == 0:
        raise ValueError(f"vectors of shape {vectors.shape} cannot be appended to the {index.dim}-d index in "
                         f"{index.path}: give a non-empty (m, {index.dim}) array")
    new_ids = _new_ids(index, ids)
    if len(new_ids) != len(vectors):
        raise ValueError(f"{len(new_ids)} ids for {len(vectors)} vectors: give exactly one id per new row")
    held = HeldOut.load(index.path / HELDOUT_FILE) if (index.path / HELDOUT_FILE).is_file() else None
    n_old, manifest = index.ntotal, json.loads(json.dumps(index.manifest))  # a deep copy
    version_dir = next_version_dir(root)
    try:
        faiss_index = _add_rows(index, vectors, version_dir)
        held, point, due = _remeasure(faiss_index, manifest, held, n_old, vectors)
        set_search_params(faiss_index, nprobe=manifest.get("nprobe"), ef_search=manifest.get("ef_search"))
        version = version_number(version_dir)
        manifest["count"] = int(faiss_index.ntotal)
        entry = {"version": version, "added": len(vectors), "count": manifest["count"], "source": source,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "recall": point and point["recall"],
                 "rebuild_due": due}
        manifest["appends"] = manifest.get("appends", []) + [entry]
        if manifest.get("ondisk"):
            from mmft.index.distributed import IVFDATA_FILE

            manifest["ondisk"] = {"file": IVFDATA_FILE, "bytes": (version_dir / IVFDATA_FILE).stat().st_size}
        if point is not None:
            manifest["tuning"]["now"] = {**point, "count": manifest["count"], "version": version}
        ids_now = np.concatenate([index.ids, new_ids])
        out = Index(index=faiss_index, ids=ids_now, manifest=manifest, heldout=held)
        out.save(version_dir)
    except BaseException:
        import shutil

        shutil.rmtree(version_dir, ignore_errors=True)
        raise
    switch_version(root, version_dir)  # the one atomic step: readers see the old version or this one
    note = _note(root, len(vectors), manifest["count"], version, manifest, point, due)
    logger.info("%s", note)
    return AddResult(index=out, added=len(vectors), version=version, recall=point and point["recall"],
                     rebuild_due=due, note=note)


def add_to_index(index_dir: str | Path, shards, *, model=None, tokenizer=None, preprocess=None,
                 data_cfg=None, batch_size: int = 128, progress: bool = True) -> AddResult:
    """`mmft index add`: embed `shards` with the model the index pins and append them (see append_vectors).

    model: a run directory, a model or a (model, preprocess, tokenizer) triple; None = the run directory
    the manifest records, loaded at the index's LoRA scale. A model that embeds differently is refused
    with the stale-index sentence. The thumbnail store, when the index has one, gains the new images.
    """
    from mmft.embeddings import embed, model_fingerprint
    from mmft.index.core import _model_for
    from mmft.index.manifest import read_manifest
    from mmft.index.thumbnails import extend_thumbnails

    root = Path(index_dir)
    manifest = read_manifest(root)
    modality = manifest.get("modality")
    if modality not in ("image", "text"):
        raise ValueError(f"the index in {root} was built from plain vectors, not shards: append with "
                         "mmft.index.append.append_vectors(index_dir, vectors, ids)")
    m, pre, tok = _model_for(root, manifest, model)
    check_fingerprint(manifest, model_fingerprint(m), str(current_version(root)))  # before embedding
    specs = [shards] if isinstance(shards, (str, Path)) else list(shards)
    emb = embed(m, specs, tokenizer=tokenizer or tok, preprocess=preprocess or pre, data_cfg=data_cfg,
                batch_size=batch_size, modality=modality, progress=progress)
    vectors = emb.image if modality == "image" else emb.text
    ids = emb.keys if modality == "image" else caption_ids(emb.keys, emb.caption_image)
    is_specs = all(isinstance(s, (str, Path)) for s in specs)  # else in-memory batches: no thumbnails
    source = {"shards": [str(s) for s in specs] if is_specs else "in-memory batches"}
    old_dir = current_version(root)
    result = append_vectors(root, vectors, ids, fingerprint=model_fingerprint(m), source=source)
    if modality == "image" and is_specs:
        extend_thumbnails(old_dir, source["shards"], result.index.path, data_cfg=data_cfg,
                          keys=set(emb.keys))
    return result
