"""mined.jsonl, the hard negatives `mmft mine` found: the one module that writes and reads that file.

Line 1 is a header naming what mined it (model fingerprint, run or base, shards, k, threshold,
group field), so a negatives file can always be traced to its model; every further line is one
training pair:

    {"key": "000042", "group": "apple", "images": ["000007", ...], "image_scores": [0.83, ...],
     "texts": ["a green pear", ...], "text_keys": ["000019", ...], "text_scores": [0.78, ...]}

`images` are keys of other training images (ordered by similarity), `texts` other pairs' captions with
the key of the pair each comes from; a negative's group is the `group` of its own line (None: its key).
JSON lines rather than arrays: one line per pair streams, greps and diffs, and the file is small
next to the shards (~0.5 KB per pair at k = 8). Plain json only, so the data workers read it cheaply.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mmft.io import atomic_path

MINED_FORMAT = "mmft-mined"
MINED_VERSION = 1
_RECORD_FIELDS = ("key", "images", "texts", "text_keys")


class MinedError(ValueError):
    """A mined-negatives file that is missing, damaged or does not fit the data it is used with."""


@dataclass
class Mined:
    """A read mined.jsonl: its header and one record per training pair, by sample key."""

    header: dict
    records: dict[str, dict]
    path: Path | None = None

    @property
    def k(self) -> int:
        return int(self.header.get("k", 0))

    def group(self, key: str) -> str:
        """The group a sample belongs to for exclusion: its recorded group, else its own key."""
        rec = self.records.get(key)
        group = rec.get("group") if rec is not None else None
        return key if group is None else str(group)


def write_mined(path: str | Path, header: dict, records: Iterable[dict]) -> Path:
    """Write the header line then one line per record, atomically (a crash leaves the old file)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        head = {"format": MINED_FORMAT, "version": MINED_VERSION, **header}
        f.write(json.dumps(head, sort_keys=True) + "\n")
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    return path


def read_mined(path: str | Path) -> Mined:
    """Read and check a file written by write_mined; MinedError names the file, the line and the fix."""
    path = Path(path)
    fix = "mine again with `mmft mine --run RUN --out FILE`"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MinedError(f"mined negatives file {path} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MinedError(f"mined negatives file {path} is not readable ({e}); {fix}") from None
    header = _line(path, lines[0], 1, fix) if lines else {}
    if header.get("format") != MINED_FORMAT:
        raise MinedError(f"{path} is not a mined-negatives file (its first line has no \"format\": "
                         f"\"{MINED_FORMAT}\"); {fix}")
    if header.get("version") != MINED_VERSION:
        raise MinedError(f"{path} has version {header.get('version')} but this mmft reads version "
                         f"{MINED_VERSION}; {fix}")
    records = {}
    for no, text in enumerate(lines[1:], start=2):
        rec = _line(path, text, no, fix)
        missing = [f for f in _RECORD_FIELDS if not isinstance(rec.get(f), list if f != "key" else str)]
        if missing or len(rec["texts"]) != len(rec["text_keys"]):
            bad = missing or ["text_keys"]
            raise MinedError(f"{path} line {no}: field(s) {bad} missing or malformed; {fix}")
        records[rec["key"]] = rec
    return Mined(header=header, records=records, path=path)


def _line(path: Path, text: str, no: int, fix: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise MinedError(f"{path} line {no} is not JSON ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise MinedError(f"{path} line {no} is not a JSON object; {fix}")
    return value
