"""Index versions: an append writes a new version beside the old one and switches to it atomically.

    runs/index/                 version 1: index.faiss, ids.json, manifest.json (as every index)
    runs/index/versions/v0002/  a complete index folder written by `mmft index add`
    runs/index/CURRENT          "versions/v0002": which version loads (absent: the folder itself)

The pointer file is replaced with os.replace, so a reader (`load_index`, the search service's reload)
sees either the old version or the new one, never half of one; a service that memory-mapped the old
files keeps them until it reloads. A folder without CURRENT is version 1, so indexes built before
versions existed load unchanged, and a rebuild into the folder (Index.save) drops the pointer and the
versions it replaces. The names and `current_version` live in mmft.index.manifest, whose
`read_manifest` follows the pointer, so every reader of an index folder reads the current version.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from mmft.index.manifest import CURRENT_FILE, VERSIONS_DIR, current_version, read_manifest

_VERSION = re.compile(r"v(\d{4,})")


def version_number(path: str | Path) -> int:
    """1 for an index folder itself, n for its versions/v000n."""
    m = _VERSION.fullmatch(Path(path).name)
    return int(m.group(1)) if m and Path(path).parent.name == VERSIONS_DIR else 1


def next_version_dir(root: str | Path) -> Path:
    """A new, empty folder for the version after the newest one of index `root` (versions/v000n)."""
    root = Path(root)
    taken = [int(m.group(1)) for p in (root / VERSIONS_DIR).glob("v*") if (m := _VERSION.fullmatch(p.name))]
    out = root / VERSIONS_DIR / f"v{max(taken + [1]) + 1:04d}"
    out.mkdir(parents=True)
    return out


def switch_version(root: str | Path, version_dir: str | Path) -> None:
    """Make `version_dir` (a complete index folder under root/versions) the one that loads, atomically."""
    from mmft.io import atomic_path

    root = Path(root)
    rel = Path(version_dir).resolve().relative_to(root.resolve())
    with atomic_path(root / CURRENT_FILE) as tmp:
        tmp.write_text(f"{rel.as_posix()}\n")


def drop_versions(root: str | Path) -> bool:
    """Before a rebuild into `root`: remove the pointer, so the rebuilt folder is what loads; True if any."""
    pointer = Path(root) / CURRENT_FILE
    had = pointer.is_file()
    pointer.unlink(missing_ok=True)
    return had


def remove_old_versions(root: str | Path) -> None:
    """After a rebuild into `root`: delete the versions it replaced (open memory maps stay valid)."""
    shutil.rmtree(Path(root) / VERSIONS_DIR, ignore_errors=True)


def _curve_lines(tuning: dict) -> list[str]:
    from mmft.index.tuning import describe_point, format_bytes

    chosen = tuning.get("chosen") or {}
    lines = [f"  {'index and search parameter':<36} {'recall@10':>9} {'bound':>7} {'ms/query':>9} "
             + f"{'memory':>10}"]
    for p in tuning.get("curve", []):
        same = all(p.get(k) == chosen.get(k) for k in ("factory", "nprobe", "ef_search"))
        mark = "  <- chosen" if same else ""
        memory = format_bytes(p["memory"]) if p.get("memory") else "-"
        lines.append(f"  {describe_point(p):<36} {p['recall']:>9.3f} {p['recall_low']:>7.3f} {p['ms']:>9.4f} "
                     f"{memory:>10}{mark}")
    return lines


def index_info(index_dir: str | Path) -> str:
    """`mmft index info`: what loads from `index_dir` (version, size, factory) and its measured curve."""
    root = Path(index_dir)
    path = current_version(root)
    m = read_manifest(path)
    probe = "".join(f", {k} {m[k]}" for k in ("nprobe", "ef_search") if m.get(k))
    kind = "" if m.get("modality") in (None, "vectors") else f"{m['modality']} "
    head = (f"{root}: version {version_number(path)} ({path}), {m['count']:,} {kind}vectors of dim "
            f"{m['dim']}, {m['factory']}{probe}")
    lines = [head]
    tuning = m.get("tuning")
    if not tuning:
        lines.append("not tuned: build with --target-recall to measure recall against exact search")
    else:
        lines.append(f"tuned in {tuning['seconds']:g} s: {tuning['note']}")
        lines += _curve_lines(tuning)
        now = tuning.get("now")
        if now:
            lines.append(f"after appends: recall@{tuning['k']} {now['recall']:.3f} at {now['ms']:.4f} ms per "
                         f"query over {now['count']:,} vectors")
    for a in m.get("appends", []):
        due = ", rebuild due" if a.get("rebuild_due") else ""
        recall = f", recall {a['recall']:.3f}" if a.get("recall") is not None else ""
        lines.append(f"append -> version {a['version']}: +{a['added']:,} vectors{recall}{due}")
    return "\n".join(lines)
