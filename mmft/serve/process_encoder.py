"""An encoder in a child process, so the model never holds the serving process's GIL.

A torch forward pass of a small text tower is largely Python (module calls, Hugging Face glue) holding
the GIL, which the event loop of the HTTP process then waits for. `ProcessEncoder` runs the real
encoder (`encoders.build_encoder`) in a spawned child and forwards every call of the Encoder interface
over a pipe: the HTTP process keeps its GIL for HTTP (and imports no torch), the child runs the model,
and a batch costs one round trip (texts out, an (n, D) array back). Measured on the demo at 32 clients
(tools/bench_serve.py's client, same run, a shared 2-core machine): encoder in a thread 61 queries/s,
p99 732 ms, 11 queries per batch; in a child process 67 queries/s, p99 612 ms, 12 per batch; the
offline limit 68. Calls are serialised (one lock); the child dies with its parent.
"""
from __future__ import annotations

import multiprocessing
import threading

import numpy as np

_ATTRIBUTES = ("dim", "tenants")


def _serve(conn, cfg) -> None:
    """Child process: build the encoder, then answer (method, args) messages until 'close'."""
    from mmft.serve.encoders import build_encoder

    try:
        encoder = build_encoder(cfg)
    except Exception as e:  # noqa: BLE001 (reported to the parent, which raises it)
        conn.send((False, _picklable(e)))
        return
    conn.send((True, None))
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            return
        if method == "close":
            conn.send((True, None))
            return
        try:
            value = getattr(encoder, method)
            value = value if method in _ATTRIBUTES else value(*args)
            conn.send((True, value))
        except Exception as e:  # noqa: BLE001
            conn.send((False, _picklable(e)))


def _picklable(e: Exception) -> Exception:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


class ProcessEncoder:
    """The Encoder interface (mmft.serve.encoders), served by `build_encoder(cfg)` in a child process."""

    def __init__(self, cfg, *, start_timeout_s: float = 600.0):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, cfg), daemon=True, name="mmft-encoder")
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        if not self._conn.poll(start_timeout_s):
            self.close()
            raise RuntimeError(f"the encoder process did not start within {start_timeout_s:g} s")
        ok, error = self._conn.recv()
        if not ok:
            self._proc.join(timeout=10)
            raise error
        self.dim = int(self._call("dim"))

    def _call(self, method: str, *args):
        with self._lock:
            if not self._proc.is_alive():
                raise RuntimeError(f"the encoder process exited (code {self._proc.exitcode}); "
                                   "restart the server")
            self._conn.send((method, args))
            ok, value = self._conn.recv()
        if not ok:
            raise value
        return value

    @property
    def tenants(self) -> list[str]:
        return self._call("tenants")

    def load_tenant(self, slot: str, adapter: str | None, lora_scale: float) -> None:
        self._call("load_tenant", slot, adapter, lora_scale)

    def drop_tenant(self, slot: str) -> None:
        self._call("drop_tenant", slot)

    def encode_text(self, texts: list[str], tenant: str) -> np.ndarray:
        return self._call("encode_text", list(texts), tenant)

    def encode_image(self, images: list, tenant: str) -> np.ndarray:
        return self._call("encode_image", list(images), tenant)

    def fingerprint(self, tenant: str) -> dict:
        return self._call("fingerprint", tenant)

    def close(self) -> None:
        """Stop the child (bounded waits; it is a daemon, so it also dies with this process)."""
        try:
            with self._lock:
                if self._proc.is_alive():
                    self._conn.send(("close", ()))
                    self._conn.poll(10)
        except (OSError, EOFError):
            pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=10)
