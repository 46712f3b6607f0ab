"""Write image-text shards in the img2dataset layout that `mmft.data.stream` reads.

Per sample: `<key>.jpg|png` (image), `<key>.txt` (captions, one per line) and `<key>.json`
({"caption": [...], "group": ..., "key": ..., "source": ..., extra metadata}); shards
`<prefix>-00000.tar...` with a `sizes.json` and a `stats.json` beside them.

The pipeline is a chain of generator stages over dict records, each testable on a list:

    iter_folder | iter_table | iter_class_folders -> require_captions -> assign_splits
      -> load_images (missing files, exact duplicates) -> prepare_images (decode, resize, encode)
      -> write_shards

A record: {"key", "source", "captions": [str], "group": str | None, "meta": dict, "split": str,
"path": Path (before load_images), "image": bytes and "ext": "jpg" | "png" (after prepare_images)}.
Dropped records are counted by reason in a `collections.Counter` that every stage receives.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from mmft.data.stages import too_many_pixels
from mmft.io import atomic_path, write_json

SHARD_DIGITS = 5
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLS = ("image", "filepath", "image_path", "path", "file", "filename", "img")
CAPTION_COLS = ("caption", "captions", "text", "title", "txt")


class ShardError(ValueError):
    """Bad shard-writing input or option; the message names the value and what to do."""


def _key(index: int) -> str:
    return f"{index:08d}"


def _as_captions(value) -> list[str]:
    """A caption cell (str with one caption per line, list, or None) -> stripped non-empty captions."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).splitlines()
    return [" ".join(str(c).split()) for c in items if str(c).strip()]


def _dedup_keep_order(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def iter_folder(root: str | Path) -> Iterator[dict]:
    """Images under `root` (recursively, sorted) with same-stem `.txt` and/or `.json` captions.

    The .json may hold "caption" (str or list), "group" and any other metadata, which is kept.
    """
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"input folder {root} does not exist; pass a folder of images with .txt captions")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    for i, path in enumerate(paths):
        captions: list[str] = []
        meta: dict = {}
        txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
        if txt.is_file():
            captions += _as_captions(txt.read_text(encoding="utf-8", errors="replace"))
        if js.is_file():
            try:
                meta = json.loads(js.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            captions += _as_captions(meta.pop("caption", None))
        group = meta.pop("group", None)
        for k in ("key", "source"):
            meta.pop(k, None)
        yield {"key": _key(i), "path": path, "source": path.relative_to(root).as_posix(),
               "captions": _dedup_keep_order(captions), "group": group, "meta": meta}


def _read_rows(path: Path, skipped: Counter) -> Iterator[dict]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if isinstance(row, dict):
                    yield row
                else:
                    skipped["bad_row"] += 1
        return
    import csv

    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f, delimiter=delimiter)


def _pick_column(columns, wanted, candidates, what: str, path: Path) -> list[str]:
    if wanted:
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise ShardError(f"{path} has no {what} column {missing[0]!r} (columns: {', '.join(columns)})")
        return list(wanted)
    found = [c for c in candidates if c in columns]
    if not found:
        raise ShardError(f"{path} has no {what} column among {', '.join(columns)}; name it with the "
                         f"{what} column option")
    return found[:1]


def iter_table(path: str | Path, skipped: Counter, *, image_col: str | None = None,
               caption_cols: list[str] | None = None, group_col: str | None = None) -> Iterator[dict]:
    """Rows of a CSV/TSV/JSONL file: an image path (relative to the file) and one or more caption columns.

    Other columns are kept as metadata. Columns are guessed ("image"/"filepath", "caption"/"text")
    unless named.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"input table {path} does not exist; pass a .csv, .tsv or .jsonl file")
    image_cols = caption_names = None
    for i, row in enumerate(_read_rows(path, skipped)):
        if image_cols is None:
            wanted = [image_col] if image_col else None
            image_cols = _pick_column(list(row), wanted, IMAGE_COLS, "image", path)
            caption_names = _pick_column(list(row), caption_cols, CAPTION_COLS, "caption", path)
        rel = row.get(image_cols[0])
        captions = [c for name in caption_names for c in _as_captions(row.get(name))]
        used = set(image_cols) | set(caption_names) | {group_col}
        meta = {k: v for k, v in row.items() if k not in used and k not in ("key", "source")}
        yield {"key": _key(i), "path": (path.parent / str(rel)) if rel else None,
               "source": str(rel or ""), "captions": _dedup_keep_order(captions),
               "group": row.get(group_col) if group_col else None, "meta": meta}


def clean_label(name: str) -> str:
    """Class folder name -> caption text: underscores become spaces, whitespace collapsed."""
    return " ".join(name.replace("_", " ").split())


def iter_class_folders(root: str | Path, templates: list[str], *,
                       class_templates: dict[str, list[str]] | None = None) -> Iterator[dict]:
    """Images under `root/<class>/` (recursively); captions from templates ("a photo of a {label}").

    `class_templates` maps a class folder name to its own caption list (which may use {label});
    the class folder name is the group id.
    """
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"class folder root {root} does not exist; pass a folder with one sub-folder "
                         "per class")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ShardError(f"{root} has no class sub-folders; expected {root}/<class>/<image>.jpg")
    i = 0
    for cls in classes:
        label = clean_label(cls.name)
        chosen = (class_templates or {}).get(cls.name, templates)
        try:
            captions = _dedup_keep_order([t.format(label=label) for t in chosen])
        except (KeyError, IndexError):
            raise ShardError(f"caption templates {chosen!r} may only use the field {{label}}") from None
        for path in sorted(p for p in cls.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
            yield {"key": _key(i), "path": path, "source": path.relative_to(root).as_posix(),
                   "captions": list(captions), "group": cls.name, "meta": {"label": label}}
            i += 1


def require_captions(records: Iterable[dict], skipped: Counter) -> Iterator[dict]:
    """Drop records with no non-empty caption (counted as "empty_caption")."""
    for rec in records:
        rec["captions"] = _as_captions(rec.get("captions"))
        if rec["captions"]:
            yield rec
        else:
            skipped["empty_caption"] += 1



def _unit(seed: int, ident: str) -> float:
    """Deterministic uniform number in [0, 1) from a seed and an id (stable across runs and machines)."""
    digest = hashlib.sha1(f"{seed}\0{ident}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def parse_splits(splits: dict[str, float] | str | None) -> dict[str, float]:
    """`{"train": .8, "val": .1, "test": .1}` or "train=0.8,val=0.1,test=0.1" -> normalised fractions."""
    if splits is None or splits == "" or (isinstance(splits, dict) and list(splits) == [""]):
        return {"": 1.0}  # one unsplit set
    if isinstance(splits, str):
        try:
            splits = {k.strip(): float(v) for k, v in (part.split("=") for part in splits.split(","))}
        except ValueError:
            raise ShardError(f"split spec {splits!r} is not like 'train=0.8,val=0.1,test=0.1'") from None
    total = sum(splits.values())
    if total <= 0 or any(v < 0 for v in splits.values()) or any(not k or "." in k for k in splits):
        raise ShardError(f"split fractions {splits!r} need non-empty names without dots and positive values")
    return {k: v / total for k, v in splits.items()}


def assign_splits(records: Iterable[dict], splits: dict[str, float], *, by: str = "sample",
                  seed: int = 0) -> Iterator[dict]:
    """Set record["split"] deterministically from a seeded hash.

    by="sample": hash of the record's source id; by="group": hash of its group id (records
    without a group fall back to their source), so a group never spans two splits;
    by="stratified": exact fractions within each group (class), which buffers the records.
    """
    names, cum, acc = list(splits), [], 0.0
    for name in names:
        acc += splits[name]
        cum.append(acc)
    if by == "stratified":
        yield from _stratified(list(records), splits, seed)
        return
    if by not in ("sample", "group"):
        raise ShardError(f"split_by={by!r} is not one of 'sample', 'group', 'stratified'")
    for rec in records:
        ident = (rec.get("group") if by == "group" else None) or rec["source"]
        u = _unit(seed, str(ident))
        rec["split"] = next((n for n, c in zip(names, cum) if u < c), names[-1])
        yield rec


def _stratified(records: list[dict], splits: dict[str, float], seed: int) -> Iterator[dict]:
    by_group: dict[str, list[dict]] = {}
    for rec in records:
        by_group.setdefault(str(rec.get("group")), []).append(rec)
    for members in by_group.values():
        members.sort(key=lambda r: _unit(seed, r["source"]))
        start, acc = 0, 0.0
        for name, frac in splits.items():
            acc += frac
            end = round(acc * len(members))
            for rec in members[start:end]:
                rec["split"] = name
            start = end
    yield from records  # input order, so keys stay in order inside each shard


def load_images(records: Iterable[dict], skipped: Counter, *, dedup: bool = True) -> Iterator[dict]:
    """Read image bytes (unless the record already has them); drop missing files and exact duplicates."""
    seen: set[str] = set()
    for rec in records:
        if "image" not in rec:
            try:
                rec["image"] = Path(rec["path"]).read_bytes()
            except (OSError, TypeError):  # TypeError: a table row without an image path
                skipped["missing_image"] += 1
                continue
        if dedup:
            digest = hashlib.sha1(rec["image"]).hexdigest()
            if digest in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(digest)
        yield rec


def prepare_images(records: Iterable[dict], skipped: Counter, *, image_format: str = "auto",
                   max_side: int | None = None, quality: int = 90, verify: bool = True) -> Iterator[dict]:
    """Check each image decodes, downscale it to `max_side` pixels (aspect kept) and pick its encoding.

    image_format: "auto" keeps JPEG as .jpg and writes images with alpha, palettes or PNG input as
    .png (alpha flattened onto white); "jpg" or "png" force one. Source bytes are copied unchanged
    whenever no resize or conversion is needed, so JPEGs are never re-compressed for nothing.
    """
    if image_format not in ("auto", "jpg", "png"):
        raise ShardError(f"image_format={image_format!r} is not one of 'auto', 'jpg', 'png'")
    from PIL import Image

    for rec in records:
        try:
            im = Image.open(io.BytesIO(rec["image"]))
            if too_many_pixels(im):  # a decompression bomb: a small file that decodes to gigabytes
                skipped["oversized_image"] += 1
                continue
            if verify:
                im.load()  # full decode: catches truncated files that open() alone accepts
            rec["image"], rec["ext"] = _encode(im, rec["image"], image_format, max_side, quality)
        except Exception:  # noqa: BLE001 (PIL raises many types for corrupt data: all mean "unusable")
            skipped["undecodable"] += 1
            continue
        yield rec


def _encode(im, raw: bytes, image_format: str, max_side: int | None, quality: int) -> tuple[bytes, str]:
    from PIL import Image

    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    ext = image_format
    if ext == "auto":
        ext = "jpg" if im.format == "JPEG" else ("png" if has_alpha or im.format in ("PNG", "GIF") else "jpg")
    too_big = bool(max_side) and max(im.size) > max_side
    same_format = (ext == "jpg" and im.format == "JPEG") or (ext == "png" and im.format == "PNG")
    if same_format and not too_big and not has_alpha and im.mode in ("RGB", "L"):
        return raw, ext
    if has_alpha:
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        im = flat
    elif im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    if too_big:
        im = im.copy()
        im.thumbnail((max_side, max_side), Image.LANCZOS)
    buf = io.BytesIO()
    if ext == "jpg":
        im.save(buf, format="JPEG", quality=quality)
    else:
        im.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), ext


def shard_base(prefix: str, split: str) -> str:
    """File-name stem of a split's shards: "train", "mydata-train", or "mydata" without splits."""
    return "-".join(p for p in (prefix, split) if p) or "shard"


def brace_pattern(base: str, count: int) -> str:
    """`train-{00000..00003}.tar` for 4 shards (the form webdataset expands)."""
    if count <= 1:
        return f"{base}-{0:0{SHARD_DIGITS}d}.tar"
    return f"{base}-{{{0:0{SHARD_DIGITS}d}..{count - 1:0{SHARD_DIGITS}d}}}.tar"


class _SplitWriter:
    """Rotating TarWriter for one split; shards are written under a temporary name and renamed when full."""

    def __init__(self, out_dir: Path, base: str, per_shard: int):
        self.out_dir, self.base, self.per_shard = out_dir, base, per_shard
        self.sizes: dict[str, int] = {}
        self._writer = self._file = self._name = None

    def write(self, sample: dict) -> None:
        import webdataset as wds

        if self._writer is None:
            self._name = f"{self.base}-{len(self.sizes):0{SHARD_DIGITS}d}.tar"
            self._file = open(self.out_dir / f".{self._name}.partial", "wb")  # noqa: SIM115 (closed in close())
            # encoder=False: every field is already bytes; mtime fixed so shards are reproducible
            self._writer = wds.TarWriter(self._file, encoder=False, mtime=0)
            self.sizes[self._name] = 0
        self._writer.write(sample)
        self.sizes[self._name] += 1
        if self.sizes[self._name] >= self.per_shard:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            (self.out_dir / f".{self._name}.partial").replace(self.out_dir / self._name)
            self._writer = self._file = None


def sample_bytes(rec: dict) -> dict:
    """The webdataset sample of a prepared record: image, captions (.txt) and metadata (.json)."""
    captions = [" ".join(c.split()) for c in rec["captions"]]  # a newline would split a .txt caption
    meta = {"caption": captions, "key": rec["key"], "source": rec["source"]}
    if rec.get("group") is not None:
        meta["group"] = str(rec["group"])
    meta.update(rec.get("meta") or {})
    return {
        "__key__": rec["key"],
        rec["ext"]: rec["image"],
        "txt": "\n".join(captions).encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def write_shards(records: Iterable[dict], out_dir: str | Path, *, prefix: str = "",
                 samples_per_shard: int = 1000) -> dict:
    """Write records (with "split") into `<prefix>-<split>-NNNNN.tar` shards plus sizes.json.

    Returns {"splits": {split: {"samples", "shards", "pattern"}}, "sizes": {shard: count}}.
    """
    if samples_per_shard < 1:
        raise ShardError(f"samples_per_shard={samples_per_shard} must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[str, _SplitWriter] = {}
    try:
        for rec in records:
            split = rec.get("split", "")
            if split not in writers:
                writers[split] = _SplitWriter(out_dir, shard_base(prefix, split), samples_per_shard)
            writers[split].write(sample_bytes(rec))
    finally:
        for w in writers.values():
            w.close()
    sizes = {name: n for w in writers.values() for name, n in w.sizes.items()}
    write_json(out_dir / "sizes.json", sizes)
    splits = {
        split or "all": {"samples": sum(w.sizes.values()), "shards": list(w.sizes),
                         "pattern": brace_pattern(w.base, len(w.sizes))}
        for split, w in sorted(writers.items())
    }
    return {"splits": splits, "sizes": sizes}


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> str:
    """Write a tar holding exactly `members`, (name, bytes) pairs in order, atomically; returns its path.

    write_shards lays out well-formed samples; this writes whatever names it is given, for shards it
    cannot express (damaged samples, unsafe names: the tests and the fault suite) and benchmark data.
    Members carry mtime 0, so the same members give the same bytes.
    """
    import tarfile

    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def check_output_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse to write into a folder that already holds shards, unless overwrite (then clear them)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    old = sorted(p for p in out_dir.iterdir() if p.name.endswith(".tar") or p.name.endswith(".tar.partial"))
    if old and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(old)} shard(s) ({old[0].name}, ...); pass overwrite=True "
            "(--overwrite) to replace them, or choose another output folder")
    for p in old + [out_dir / "sizes.json", out_dir / "stats.json"]:
        p.unlink(missing_ok=True)


def make_shards(input: str | Path, out_dir: str | Path, *, input_type: str = "auto",
                image_col: str | None = None, caption_cols: list[str] | None = None,
                group_col: str | None = None, templates: list[str] | None = None,
                class_templates: dict[str, list[str]] | None = None,
                splits: dict[str, float] | str | None = None, split_by: str = "sample", seed: int = 0,
                samples_per_shard: int = 1000, max_side: int | None = None, image_format: str = "auto",
                quality: int = 90, verify: bool = True, dedup: bool = True, prefix: str = "",
                overwrite: bool = False, progress: bool = True) -> dict:
    """Write shards from a folder of captioned images, a CSV/TSV/JSONL table, or class folders.

    input_type: "folder" | "table" | "classes" | "auto" (a file is a table; a folder is class
    folders when `templates` or `class_templates` is given, else captioned images).
    splits: fractions like {"train": .8, "val": .1, "test": .1} (None = one unsplit set), assigned
    by seeded hash per sample, per group (no group spans two splits) or stratified per group.
    Bad inputs are skipped and counted by reason; returns the stats also written to stats.json.
    """
    start = time.time()
    input, out_dir = Path(input), Path(out_dir)
    fractions = parse_splits(splits)  # validate before touching the output folder
    check_output_dir(out_dir, overwrite)
    skipped: Counter = Counter()
    if input_type == "auto":
        input_type = "table" if input.is_file() else ("classes" if templates or class_templates else "folder")
    if input_type == "folder":
        records = iter_folder(input)
    elif input_type == "table":
        records = iter_table(input, skipped, image_col=image_col, caption_cols=caption_cols,
                             group_col=group_col)
    elif input_type == "classes":
        records = iter_class_folders(input, templates or ["a photo of a {label}"],
                                     class_templates=class_templates)
    else:
        raise ShardError(f"input_type={input_type!r} is not one of 'auto', 'folder', 'table', 'classes'")
    seen: dict = {"records": 0, "missing": None}
    stats = shard_records(_tally(records, seen), out_dir, skipped, splits=fractions, split_by=split_by,
                          seed=seed, samples_per_shard=samples_per_shard, max_side=max_side,
                          image_format=image_format, quality=quality, verify=verify, dedup=dedup,
                          prefix=prefix, progress=progress)
    if stats["written"] == 0:  # an empty shard set would only fail later, far from its cause
        (out_dir / "sizes.json").unlink(missing_ok=True)
        raise ShardError(_nothing_written(input, input_type, seen, stats["skipped"]))
    stats = {"input": str(input), "input_type": input_type, **stats, "seconds": round(time.time() - start, 2)}
    write_json(out_dir / "stats.json", stats)
    return stats


def _tally(records: Iterable[dict], seen: dict) -> Iterator[dict]:
    """Count input records and remember the first image path that is not a file (for `_nothing_written`)."""
    for rec in records:
        seen["records"] += 1
        found = "image" in rec or (rec.get("path") and Path(rec["path"]).is_file())
        if seen["missing"] is None and not found:
            seen["missing"] = str(rec.get("path") or "an empty image cell")
        yield rec


def _nothing_written(input: Path, input_type: str, seen: dict, skipped: dict) -> str:
    """One sentence on why no sample was written: where mmft looked, what it read, why each was dropped."""
    n, exts = seen["records"], "/".join(e[1:] for e in IMAGE_EXTS)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
    if input_type == "table":
        if not n:
            return f"wrote no samples: the table {input} has no rows"
        hint = ""
        if skipped.get("missing_image") and seen["missing"]:
            hint = (f"; image paths are read relative to the table's folder {input.parent} "
                    f"(the first missing one: {seen['missing']})")
        return (f"wrote no samples: read {n} row(s) from {input} and dropped every one "
                f"(skipped: {reasons}){hint}")
    where = f"the class folders under {input}" if input_type == "classes" else str(input)
    if not n:
        return f"wrote no samples: found no image files ({exts}) in {where} (searched recursively)"
    return f"wrote no samples: found {n} image(s) in {where} and dropped every one (skipped: {reasons})"


def shard_records(records: Iterable[dict], out_dir: str | Path, skipped: Counter, *,
                  splits: dict[str, float] | str | None = None, split_by: str = "sample", seed: int = 0,
                  samples_per_shard: int = 1000, max_side: int | None = None, image_format: str = "auto",
                  quality: int = 90, verify: bool = True, dedup: bool = True, prefix: str = "",
                  progress: bool = True, desc: str = "shards") -> dict:
    """Run input records through captions -> split -> load/dedup -> decode/resize -> write; return stats."""
    records = assign_splits(require_captions(records, skipped), parse_splits(splits), by=split_by, seed=seed)
    records = load_images(records, skipped, dedup=dedup)
    records = prepare_images(records, skipped, image_format=image_format, max_side=max_side,
                             quality=quality, verify=verify)
    if progress:
        from tqdm.auto import tqdm

        records = tqdm(records, desc=desc, unit="img")
    written = write_shards(records, out_dir, prefix=prefix, samples_per_shard=samples_per_shard)
    return {
        "out_dir": str(out_dir), "written": sum(written["sizes"].values()),
        "skipped": dict(sorted(skipped.items())), "splits": written["splits"], "split_by": split_by,
        "seed": seed, "options": {"samples_per_shard": samples_per_shard, "max_side": max_side,
                                  "image_format": image_format, "quality": quality, "verify": verify,
                                  "dedup": dedup},
    }


def format_summary(stats: dict) -> str:
    """A small text table: samples and shards per split, then skips by reason."""
    lines = [f"{'split':<12}{'samples':>9}{'shards':>8}  pattern"]
    for name, s in stats["splits"].items():
        lines.append(f"{name:<12}{s['samples']:>9}{len(s['shards']):>8}  {s['pattern']}")
    skips = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items()) or "none"
    lines.append(f"skipped: {skips}")
    return "\n".join(lines)
