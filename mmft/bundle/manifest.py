"""manifest.json of a bundle: what the encoders are (base, adapter, LoRA scale, opset, dims) and the
sha256 of every other file in the folder.

The manifest is deleted first and written last, so its presence marks a complete bundle; loading
re-hashes every file and refuses a bundle whose files differ from what the manifest records (a
half-copied model, an index swapped in from another model, a card edited after the fact). No torch here:
the runtime reads it.
"""
from __future__ import annotations

import json
from pathlib import Path

from mmft.io import sha256_file, write_json

MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
BUNDLE_FORMAT = "mmft-bundle-1"


class BundleError(ValueError):
    """A bundle folder that is missing, incomplete, altered or of another format; the message says what to do.
    """


def bundle_files(bundle_dir: Path) -> list[str]:
    """Every regular file under the bundle (relative POSIX paths, sorted), the manifest left out."""
    out = []
    for p in sorted(bundle_dir.rglob("*")):
        rel = p.relative_to(bundle_dir).as_posix()
        if p.is_file() and rel != MANIFEST_FILE and not p.name.startswith(".") and "/." not in rel:
            out.append(rel)
    return out


def file_table(bundle_dir: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of every file in the bundle."""
    return {rel: {"sha256": sha256_file(bundle_dir / rel), "bytes": (bundle_dir / rel).stat().st_size}
            for rel in bundle_files(bundle_dir)}


def write_manifest(bundle_dir: str | Path, meta: dict) -> dict:
    """Hash every file of the bundle and write manifest.json (atomically, last). Returns the manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = {"format": BUNDLE_FORMAT, **meta, "files": file_table(bundle_dir)}
    write_json(bundle_dir / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(bundle_dir: str | Path, *, verify: bool = True) -> dict:
    """manifest.json of a bundle; with verify, refuse (BundleError) any file not hashing as recorded."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise BundleError(f"no bundle at {bundle_dir}: the folder does not exist; write one with "
                          "`mmft export --format onnx`")
    if not path.is_file():
        raise BundleError(f"no complete bundle in {bundle_dir}: {MANIFEST_FILE} is missing (an interrupted "
                          "export?); export it again with `mmft export --format onnx`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is corrupt ({e}); export the bundle again") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{bundle_dir} holds format {manifest.get('format')!r}, not {BUNDLE_FORMAT}: "
                          "export it again with this mmft or upgrade mmft")
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest


def verify_files(bundle_dir: Path, manifest: dict) -> None:
    """Refuse a bundle whose files are missing, extra, resized or re-hashed relative to its manifest."""
    recorded = manifest.get("files") or {}
    present = set(bundle_files(bundle_dir))
    missing = sorted(set(recorded) - present)
    extra = sorted(present - set(recorded))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"not in the manifest {extra[:3]}"
        raise BundleError(f"bundle {bundle_dir} does not match its manifest ({what}): it was altered or "
                          "half-copied; copy or export it again")
    for rel, entry in recorded.items():
        f = bundle_dir / rel
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise BundleError(f"bundle file {f} does not match the sha256 in {bundle_dir / MANIFEST_FILE}: "
                              "the bundle was altered or damaged; copy or export it again")
