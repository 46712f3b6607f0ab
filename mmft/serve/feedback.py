"""The feedback loop: POST /feedback appends judgements to a JSONL file; `feedback_pairs` makes them a table.

    POST /feedback {"tenant": "tuned", "query": "a red fox", "key": "000123", "relevant": true}
      -> one line in feedback.path (JSONL, appended with O_APPEND, so worker processes can share it)
    mmft serve --config serve.yaml --feedback-pairs data/feedback-table
      -> data/feedback-table/pairs.jsonl + images/ (each relevant query with its gallery image)
    mmft shards data/feedback-table/pairs.jsonl data/feedback --group-col group --splits train=0.9,val=0.1
      -> shards for the next fine-tune (add them to data.train beside the original training shards)

Only "relevant": true judgements of text queries become pairs (the query becomes a caption of the
image the person marked); "relevant": false ones stay in the JSONL for later use as hard negatives. The
image's key is its group, so several queries for one image are never each other's negatives.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path


class FeedbackLog:
    """Append-only JSONL of feedback records."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}, ensure_ascii=False) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())  # one write: lines of concurrent writers never interleave
            finally:
                os.close(fd)


def read_feedback(path: str | Path) -> list[dict]:
    """The records of a feedback file (lines that are not JSON objects are skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:120]


def feedback_pairs(feedback_path: str | Path, out_dir: str | Path,
                   gallery_shards: dict[str, list[str]]) -> dict:
    """Write out_dir/pairs.jsonl and out_dir/images/ from relevant feedback: one row per judged image.

    A row is {"image": path relative to the table, "caption": [the queries judged relevant to it],
    "group": its key, "tenant"}; `mmft shards` reads every query as one caption of the image.

    gallery_shards: tenant name -> the shards its gallery index was built from (its manifest's
    source.shards). Returns counts: pairs written, judgements skipped and why.
    """
    from mmft.data.epochs import expand_specs
    from mmft.data.stages import IMAGE_EXTS, SkipStats, read_shards

    out_dir = Path(out_dir)
    records = read_feedback(feedback_path)
    wanted: dict[str, dict[str, list[str]]] = {}  # tenant -> key -> queries
    skipped = {"not_relevant": 0, "not_text": 0, "unknown_tenant": 0, "image_not_found": 0}
    for rec in records:
        if rec.get("relevant") is not True:
            skipped["not_relevant"] += 1
        elif rec.get("query_kind", "text") != "text" or not isinstance(rec.get("query"), str):
            skipped["not_text"] += 1
        elif rec.get("tenant") not in gallery_shards:
            skipped["unknown_tenant"] += 1
        else:
            queries = wanted.setdefault(rec["tenant"], {}).setdefault(str(rec["key"]), [])
            if rec["query"] not in queries:
                queries.append(rec["query"])
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for tenant, keys in wanted.items():
        found = set()
        for sample in read_shards(expand_specs(gallery_shards[tenant]), SkipStats()):
            key = sample["__key__"]
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if key not in keys or key in found or ext is None:
                continue
            found.add(key)
            name = f"images/{_safe_name(tenant)}-{_safe_name(key)}.{ext}"
            (out_dir / name).write_bytes(sample[ext])
            rows.append({"image": name, "caption": keys[key], "group": key, "tenant": tenant})
        skipped["image_not_found"] += sum(len(q) for k, q in keys.items() if k not in found)
    with open(out_dir / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return {"pairs": sum(len(r["caption"]) for r in rows), "images": len(rows), "skipped": skipped,
            "table": str(out_dir / "pairs.jsonl")}
