"""A small thumbnail store beside an index, so a search page can show results without the shards.

    write_thumbnails(["data/test-{00000..00003}.tar"], "runs/x/index")   # at index-build time
    add_thumbnails("runs/x/index")          # an index built before: reads the shards its manifest names
    extend_thumbnails(old_version, new_shards, new_version)  # an append: old JPEGs + the new images
    store = open_thumbnails("runs/x/index") # None when the index has none
    store.jpeg("000123"), store.captions("000123")

Two files: `thumbs.bin` holds the JPEGs back to back and `thumbs.json` (written last, so its presence
marks a complete store) maps each image key to its byte range and captions. The service memory-maps
thumbs.bin, so worker processes share one copy. Small JPEGs (128 px, quality 80) cost ~3-5 kB per image:
a 100k-image gallery needs ~400 MB, and writing them decodes each image once (~2,500 images/s per core).
Reading needs neither torch nor faiss.
"""
from __future__ import annotations

import io
import json
import mmap
from pathlib import Path

from mmft.io import atomic_path, write_json

THUMBS_FORMAT = 1
THUMBS_BIN, THUMBS_JSON = "thumbs.bin", "thumbs.json"


class ThumbnailError(ValueError):
    """A thumbnail store that is missing, damaged, or cannot be written; the message says what to do."""


def _thumbnail_jpeg(image, size: int, quality: int) -> bytes:
    """An RGB PIL image -> JPEG bytes whose longer side is at most `size` pixels."""
    from PIL import Image

    im = image.copy()
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _gallery_samples(shards, data_cfg):
    """(key, RGB image or None, captions) of every sample of `shards`, in shard order."""
    from mmft.data.epochs import expand_specs
    from mmft.data.stages import SkipSample, SkipStats, decode_image, parse_captions, read_shards

    caption_key = getattr(data_cfg, "caption_key", "txt")
    caption_field = getattr(data_cfg, "caption_field", "caption")
    specs = [str(shards)] if isinstance(shards, (str, Path)) else [str(s) for s in shards]
    for sample in read_shards(expand_specs(specs), SkipStats()):
        try:
            captions = parse_captions(sample, caption_key, caption_field)
        except SkipSample:
            captions = []
        try:
            image = decode_image(sample, draft_size=256)
        except SkipSample:
            image = None
        yield sample["__key__"], image, captions


def write_thumbnails(shards, out_dir: str | Path, *, size: int = 128, quality: int = 80, data_cfg=None,
                     keys=None) -> dict:
    """Write thumbs.bin + thumbs.json for the images of `shards` into `out_dir` (an index folder).

    keys: only these image keys (e.g. the ids of the index); None = every sample. Samples whose image
    cannot be decoded keep their captions but get no thumbnail. Returns the store's summary.
    """
    if size <= 0:
        raise ThumbnailError(f"thumbnail size {size} must be a positive number of pixels")
    return _write_store(shards, Path(out_dir), size, quality, data_cfg, keys, base=None)


def extend_thumbnails(old_dir: str | Path, shards, new_dir: str | Path, *, data_cfg=None,
                      keys=None) -> dict | None:
    """Write into `new_dir` the store of `old_dir` plus the images of `shards` (an index append).

    The old JPEGs are copied byte for byte and keep their entries; new images get the old store's size
    and quality. keys: as for write_thumbnails. Returns the new store's summary, or None (and writes
    nothing) when `old_dir` has no store.
    """
    old = open_thumbnails(old_dir)
    if old is None:
        return None
    return _write_store(shards, Path(new_dir), old.size, old.quality, data_cfg, keys, base=old)


def _write_store(shards, out_dir: Path, size: int, quality: int, data_cfg, keys, base) -> dict:
    """thumbs.bin (base's bytes first, then the new JPEGs) and thumbs.json, written last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / THUMBS_JSON).unlink(missing_ok=True)  # a half-rewritten store must not open
    wanted = None if keys is None else {str(k) for k in keys}
    items: dict[str, list] = {} if base is None else {k: list(v) for k, v in base.items.items()}
    offset = 0
    with atomic_path(out_dir / THUMBS_BIN) as tmp, open(tmp, "wb") as f:
        if base is not None and base._map is not None:
            f.write(base._map)
            offset = len(base._map)
        for key, image, captions in _gallery_samples(shards, data_cfg):
            if (wanted is not None and key not in wanted) or key in items:
                continue
            data = _thumbnail_jpeg(image, size, quality) if image is not None else b""
            f.write(data)
            items[key] = [offset, len(data), captions]
            offset += len(data)
    summary = {"format": THUMBS_FORMAT, "size": size, "quality": quality, "count": len(items),
               "bytes": offset, "missing": sum(1 for v in items.values() if v[1] == 0)}
    write_json(out_dir / THUMBS_JSON, {**summary, "items": items})
    return summary


def add_thumbnails(index_dir: str | Path, shards=None, *, size: int = 128, quality: int = 80,
                   data_cfg=None) -> dict:
    """Add a thumbnail store to an existing index folder; shards default to those its manifest records."""
    index_dir = Path(index_dir)
    manifest_path = index_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ThumbnailError(f"no complete index in {index_dir} (manifest.json is missing); build the index "
                             "first with `mmft index build`")
    manifest = json.loads(manifest_path.read_text())
    if shards is None:
        shards = (manifest.get("source") or {}).get("shards")
        if not isinstance(shards, list) or not shards:
            raise ThumbnailError(f"the index in {index_dir} records no gallery shards; pass the shards it "
                                 "was built from")
    ids = json.loads((index_dir / "ids.json").read_text())
    keys = {str(i).split("/", 1)[0] if manifest.get("modality") == "text" else str(i) for i in ids}
    return write_thumbnails(shards, index_dir, size=size, quality=quality, data_cfg=data_cfg, keys=keys)


class ThumbnailStore:
    """Read side: JPEG bytes and captions by image key, thumbs.bin memory-mapped (shared by processes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / THUMBS_JSON
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise ThumbnailError(f"{meta_path} is missing or corrupt ({e}); rewrite it with "
                                 f"`mmft index thumbnails {self.path}`") from None
        if meta.get("format", 0) > THUMBS_FORMAT:
            raise ThumbnailError(f"thumbnail store in {self.path} has format {meta.get('format')}, newer "
                                 f"than this mmft reads ({THUMBS_FORMAT}): upgrade mmft or rewrite it")
        bin_path = self.path / THUMBS_BIN
        actual = bin_path.stat().st_size if bin_path.is_file() else -1
        if actual != meta["bytes"]:
            raise ThumbnailError(f"{bin_path} has {actual} bytes but {THUMBS_JSON} records {meta['bytes']}: "
                                 "the store is damaged or half-replaced; rewrite it with "
                                 f"`mmft index thumbnails {self.path}`")
        self.size, self.items = int(meta["size"]), meta["items"]
        self.quality = int(meta.get("quality", 80))
        self._map = None
        if actual > 0:
            with open(bin_path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def jpeg(self, key: str) -> bytes | None:
        """The thumbnail of image `key` (JPEG bytes), or None when the store has none for it."""
        item = self.items.get(key)
        if item is None or item[1] == 0 or self._map is None:
            return None
        return self._map[item[0]:item[0] + item[1]]

    def captions(self, key: str) -> list[str]:
        item = self.items.get(key)
        return list(item[2]) if item is not None else []


def open_thumbnails(index_dir: str | Path) -> ThumbnailStore | None:
    """The thumbnail store of an index folder, or None when it has none."""
    index_dir = Path(index_dir)
    if not (index_dir / THUMBS_JSON).is_file():
        return None
    return ThumbnailStore(index_dir)
