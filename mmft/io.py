"""Small file helpers shared by every stage that writes artifacts."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it over `path`.

    A crash or kill mid-write leaves the previous file intact (rename is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; artifacts are shared like any other file
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically, pretty-printed."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_json_object(path: str | Path, fields: dict[str, tuple[type, ...]],
                     error: type[Exception] = ValueError, fix: str = "write it again") -> dict:
    """The JSON object in `path`, each of `fields` present with one of its Python types (int excludes bool).

    Anything else raises `error` with one sentence naming the file, the field and `fix`: a file a reader
    trusts is checked before any value is used, so damage never surfaces as a KeyError deep inside.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} is missing; {fix}") from None
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise error(f"{path} is not readable JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {_json_type(data)} where an object is expected; {fix}")
    for name, types in fields.items():
        value = data.get(name)
        ok = name in data and isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            got = "missing" if name not in data else f"a {_json_type(value)} ({str(value)[:40]!r})"
            want = " or ".join(dict.fromkeys(_json_type(t()) if t is not type(None) else "null"
                                             for t in types))
            raise error(f"{path}: field '{name}' is {got}, expected {want}; {fix}")
    return data
