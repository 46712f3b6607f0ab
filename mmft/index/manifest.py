"""The index manifest: the one place that says what a saved index holds and which model made it.

Both builders (`mmft.index.core.build_index` and the distributed merge) write their manifest through
`index_manifest`, and loading reads it back through `read_manifest`; the stale-index refusal compares
the FINGERPRINT_KEYS fields with the querying model. A field added here reaches every builder, so an
index built one way can never be checked differently from one built the other way.

A saved index is a directory: index.faiss (always the CPU form), ids.json, and manifest.json written
last, so its presence marks a complete index; it records the byte size of the other files.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from mmft.io import read_json_object
from mmft.model.identity import same_base

INDEX_FORMAT = 1
INDEX_FILE, IDS_FILE, MANIFEST_FILE = "index.faiss", "ids.json", "manifest.json"
HELDOUT_FILE = "heldout.npz"  # a tuned index's held-out queries and their exact neighbours (index.heldout)
# An appended index (mmft.index.versions): CURRENT names the folder under versions/ that loads.
CURRENT_FILE, VERSIONS_DIR = "CURRENT", "versions"
# What decides a model's embeddings (mmft.embeddings.model_fingerprint): an index pins all three.
FINGERPRINT_KEYS = ("model", "adapter_sha256", "lora_scale")


class IndexLoadError(RuntimeError):
    """An index directory that is missing, corrupt or inconsistent; the message says what to do."""


class StaleIndexError(IndexLoadError):
    """An index built with another model, adapter or LoRA scale than the one querying it."""


def fingerprint_of(meta: dict | None) -> dict:
    """The FINGERPRINT_KEYS fields of a manifest or embeddings meta (None where absent)."""
    meta = meta or {}
    return {k: meta.get(k) for k in FINGERPRINT_KEYS}


def index_manifest(fingerprint: dict | None, *, dim: int, count: int, factory: str, nprobe: int | None,
                   ef_search: int | None, modality: str, build_seconds: float,
                   extra: dict | None = None) -> dict:
    """The manifest of a freshly built index (the file sizes are added when it is saved)."""
    from mmft import __version__

    return {
        "format": INDEX_FORMAT, "mmft_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fingerprint_of(fingerprint), "dim": int(dim), "count": int(count), "metric": "inner_product",
        "normalized": True, "factory": factory, "nprobe": nprobe, "ef_search": ef_search,
        "modality": modality, "dtype": "float16" if "fp16" in factory else "float32",
        "build_seconds": round(build_seconds, 3), **(extra or {}),
    }


def fingerprint_diffs(built: dict, current: dict) -> list[str]:
    """What differs between two model fingerprints, in words ("the base model", "the adapter", ...)."""
    built, current = fingerprint_of(built), fingerprint_of(current)
    diffs = [] if same_base(built["model"], current["model"]) else ["the base model"]
    if built["adapter_sha256"] != current["adapter_sha256"]:
        diffs.append("the adapter")
    elif built["lora_scale"] is not None and not math.isclose(built["lora_scale"], current["lora_scale"]):
        diffs.append("the LoRA scale")
    return diffs


def check_fingerprint(manifest: dict, current: dict, where: str) -> None:
    """Refuse (StaleIndexError) when `current` (model_fingerprint) is not what the index was built with."""
    built = fingerprint_of(manifest)
    diffs = fingerprint_diffs(built, current)
    if diffs:
        from mmft.embeddings import describe_fingerprint as describe

        raise StaleIndexError(
            f"index in {where} was built with {describe(built)}, but the model is {describe(current)} "
            f"({' and '.join(diffs)} {'differ' if len(diffs) > 1 else 'differs'}): rebuild the index with "
            "`mmft index build` or load the matching adapter and scale")


def current_version(path: str | Path) -> Path:
    """The folder of the version of index `path` that loads: the one CURRENT names, else `path` itself."""
    path = Path(path)
    pointer = path / CURRENT_FILE
    if not pointer.is_file():
        return path
    name = pointer.read_text().strip()
    target = path / name
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or not target.is_dir():
        raise IndexLoadError(f"{pointer} names version {name!r}, which is not a folder inside {path}: "
                             "point it at an existing version (e.g. versions/v0002) or rebuild the index")
    return target


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Record the sizes of index.faiss and ids.json, then write manifest.json (the last file of a save)."""
    from mmft.io import write_json

    names = (INDEX_FILE, IDS_FILE) + ((HELDOUT_FILE,) if (out_dir / HELDOUT_FILE).is_file() else ())
    manifest["files"] = {n: (out_dir / n).stat().st_size for n in names}
    write_json(out_dir / MANIFEST_FILE, manifest)


_REBUILD = "the index directory is damaged or was edited: rebuild it with `mmft index build`"
_OPTIONAL = (type(None),)
# What a reader relies on, with its JSON types: checked before any value is used.
MANIFEST_FIELDS = {"format": (int,), "dim": (int,), "count": (int,), "factory": (str,), "files": (dict,),
                   "nprobe": (int, *_OPTIONAL), "ef_search": (int, *_OPTIONAL), "model": (dict, *_OPTIONAL),
                   "adapter_sha256": (str, *_OPTIONAL), "lora_scale": (int, float, *_OPTIONAL)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_ids(path: Path, manifest: dict) -> list[str]:
    """The gallery ids of an index directory: a JSON list of `manifest["count"]` strings."""
    file = path / IDS_FILE
    try:
        ids = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexLoadError(f"{file} is missing or not readable JSON ({e}); {_REBUILD}") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise IndexLoadError(f"{file} should hold a JSON list of id strings; {_REBUILD}")
    if len(ids) != manifest["count"]:
        raise IndexLoadError(f"{file} lists {len(ids)} ids but {MANIFEST_FILE} records {manifest['count']}; "
                             f"{_REBUILD}")
    return ids


def read_manifest(path: Path) -> dict:
    """The manifest of a complete index directory, or IndexLoadError saying what is wrong and what to do.

    A folder whose CURRENT file names a version (mmft.index.versions) reads that version's manifest.
    """
    path = current_version(path)
    if not path.is_dir():
        raise IndexLoadError(f"no index at {path}: the folder does not exist; "
                             "build one with `mmft index build`")
    man = path / MANIFEST_FILE
    if not man.is_file():
        raise IndexLoadError(f"no complete index in {path}: {MANIFEST_FILE} is missing "
                             "(an interrupted build?); rebuild it with `mmft index build`")
    manifest = read_json_object(man, MANIFEST_FIELDS, IndexLoadError, _REBUILD)
    bad = [k for k, v in manifest["files"].items() if Path(k).name != k or k == ".." or not _is_int(v)]
    if bad:  # plain file names beside the manifest, with their sizes in bytes
        raise IndexLoadError(f"{man}: field 'files' lists {bad[0]!r} with {manifest['files'][bad[0]]!r}, "
                             f"expected file names in {path} with byte sizes; {_REBUILD}")
    if manifest["format"] > INDEX_FORMAT:
        raise IndexLoadError(f"index in {path} has format {manifest.get('format')}, newer than this mmft "
                             f"reads ({INDEX_FORMAT}): upgrade mmft or rebuild the index")
    for name, size in (manifest.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise IndexLoadError(f"index in {path} is incomplete: {name} is missing; rebuild it with "
                                 "`mmft index build`")
        if f.stat().st_size != size:
            raise IndexLoadError(f"{f} has {f.stat().st_size} bytes but the manifest records {size}: the "
                                 "index directory is damaged or half-replaced; rebuild it with "
                                 "`mmft index build`")
    return manifest
