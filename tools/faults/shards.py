"""Shard writer: input that yields nothing is an error a person can act on, never an empty success.

Run through `python -m mmft shards` in a child process: the exit status and stderr are what a user
(or a pipeline script) sees.
"""
from __future__ import annotations

from pathlib import Path

from faults.common import Outcome, image_bytes, run_cli


def _expect_error(work: Path, args: list[str], label: str, must_say: list[str]) -> Outcome:
    """Survived = non-zero exit, one line on stderr saying `must_say`, no traceback, no shard written."""
    out = Outcome(injected=1)
    proc = run_cli(["shards", *args, "--quiet"])
    err = proc.stderr.strip()
    if "Traceback" in err:
        out.crashes = 1
    missing = [s for s in must_say if s not in err]
    if proc.returncode != 0 and not missing and "\n" not in err and not out.crashes:
        out.survived = 1
    unsaid = f" (does not say {missing})" if missing else ""
    out.notes.append(f"{label}: exit {proc.returncode}: {err[:400]}{unsaid}")
    if list((work / "out").glob("*.tar")):
        out.notes.append(f"{label}: shards were written anyway")
        out.survived = 0
    return out


def table_paths_resolve_to_nothing(work: Path) -> Outcome:
    """A table in meta/ naming images/x.jpg, while the images sit beside meta/ (paths are table-relative)."""
    (work / "images").mkdir()
    (work / "meta").mkdir()
    rows = []
    for i in range(3):
        (work / "images" / f"{i}.png").write_bytes(image_bytes(i))
        rows.append(f"images/{i}.png,a photo number {i}")
    (work / "meta" / "pairs.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    return _expect_error(work, [str(work / "meta" / "pairs.csv"), str(work / "out")], "table",
                         ["read 3 row(s)", str(work / "meta"), "relative to the table's folder"])


def folder_without_images(work: Path) -> Outcome:
    (work / "src").mkdir()
    (work / "src" / "notes.txt").write_text("captions, but no image files")
    return _expect_error(work, [str(work / "src"), str(work / "out")], "folder",
                         ["found no image files", str(work / "src")])


def table_with_some_missing_images(work: Path) -> Outcome:
    """3 of 5 rows name existing images: exit 0, 3 written, 2 counted as missing_image."""
    import json

    (work / "images").mkdir()
    rows = [f"images/{i}.png,a photo number {i}" for i in range(5)]
    for i in range(3):
        (work / "images" / f"{i}.png").write_bytes(image_bytes(i))
    (work / "pairs.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    out = Outcome(injected=2)
    proc = run_cli(["shards", str(work / "pairs.csv"), str(work / "out"), "--quiet"])
    stats = json.loads((work / "out" / "stats.json").read_text()) if proc.returncode == 0 else {}
    written, skipped = stats.get("written", 0), stats.get("skipped", {})
    out.crashes = int("Traceback" in proc.stderr)
    out.survived = 2 if proc.returncode == 0 and skipped == {"missing_image": 2} else 0
    out.data_lost = 3 - written
    out.notes.append(f"partly missing: exit {proc.returncode}, wrote {written}, skipped {skipped}")
    return out
