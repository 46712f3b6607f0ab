"""What every fault case shares: the outcome it reports, how a refusal is judged, tiny inputs.

A case injects `injected` faults and counts how many mmft `survived` as promised (a damaged file
refused in one sentence naming it; a bad sample skipped and counted exactly once; a bad input to the
shard writer a non-zero exit with a sentence), how much good data was lost on the way, and how many
times something escaped as an unexpected exception or a traceback (`crashes`).
"""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A tiny open_clip ViT/transformer pair: builds in a second on a CPU.
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass
class Outcome:
    """What one case measured; `notes` keeps the messages mmft gave (the first few go to the docs)."""

    injected: int = 0
    survived: int = 0
    data_lost: int = 0
    crashes: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, other: Outcome) -> Outcome:
        self.injected += other.injected
        self.survived += other.survived
        self.data_lost += other.data_lost
        self.crashes += other.crashes
        self.notes += other.notes
        return self


@dataclass(frozen=True)
class Case:
    """One row of the table. `run` is None for a case that is planned but not yet written."""

    name: str
    group: str
    promise: str
    run: Callable[[Path], Outcome] | None = None
    fast: bool = True  # also runs in the test suite (tests/test_fault_suite.py)
    pending: str = ""  # why it does not run yet


class PicklePayload:
    """Unpickling it calls open(marker, "w"): the file's existence proves that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def folder_digest(path: Path) -> str:
    """sha256 over the names and bytes of every file under `path` (to show a reader changed nothing)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def expect_refusal(load: Callable[[], object], error: type[BaseException], where: Path,
                   label: str) -> Outcome:
    """Load a damaged `where`: survived = `error` raised in one line naming `where`, its files untouched."""
    out = Outcome(injected=1)
    before = folder_digest(where)
    try:
        load()
    except error as e:
        message = str(e)
        if "\n" not in message and str(where) in message:
            out.survived = 1
            out.notes.append(f"{label}: {message}")
        else:
            out.notes.append(f"{label}: refused, but not in one line naming {where}: {message[:300]!r}")
    except Exception as e:  # noqa: BLE001 (anything else escaping is what this suite counts)
        out.crashes = 1
        out.notes.append(f"{label}: {type(e).__name__} escaped: {str(e)[:300]}")
    else:
        out.notes.append(f"{label}: loaded without complaint")
    if folder_digest(where) != before:
        out.data_lost = 1
        out.notes.append(f"{label}: the reader changed {where}")
    return out


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m mmft ARGS` in a child process (the exit status and stderr a user sees)."""
    return subprocess.run([sys.executable, "-m", "mmft", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, check=False)


# ---------------------------------------------------------------- tiny inputs


def image_bytes(seed: int, size: int = 20, fmt: str = "PNG") -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def good_sample(key: str, seed: int) -> list[tuple[str, bytes]]:
    """Members of one good sample: image, caption lines and JSON metadata."""
    meta = json.dumps({"caption": [f"a photo of {key}"]}).encode()
    caption = f"a photo of {key}".encode()
    return [(f"{key}.png", image_bytes(seed)), (f"{key}.txt", caption), (f"{key}.json", meta)]


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height pixels: kilobytes on disk, width*height pixels decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, z = bytes(1 + (width + 7) // 8), zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def tokenize(texts: list[str]):
    """A stand-in tokenizer for data cases: words hashed to ids, padded to 6."""
    import torch

    rows = [[int(hashlib.md5(w.encode()).hexdigest(), 16) % 997 + 1 for w in t.split()][:6] for t in texts]
    return torch.tensor([r + [0] * (6 - len(r)) for r in rows])


def preprocess():
    from torchvision import transforms as T

    return T.Compose([T.Resize((16, 16)), T.ToTensor()])
