"""What one worker process holds: config, encoder, tenants, batcher, metrics, logs; search and reload.

`ServeState.search` is the whole query path: a Job goes to the batcher, which calls `_process` in its
worker thread with every job of one (slot, kind, gallery): one `encode_*` call, one FAISS search for
the largest k, each job's first k rows. Reloads re-read the config file and hand it to the registry;
with several workers, a successful reload bumps a generation number in server.state_dir and the
other workers follow within server.reload_poll_s.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import numpy as np

from mmft.serve.batching import Batcher, Job
from mmft.serve.config import ServeConfig, load_serve_config, resolve_secret
from mmft.serve.inputs import ServeError
from mmft.serve.metrics import AccessLog, Metrics
from mmft.serve.tenants import Registry, token_digest

logger = logging.getLogger("mmft.serve")
GENERATION_FILE = "reload-generation"


class ServeState:
    def __init__(self, cfg: ServeConfig, *, config_path: str | None = None,
                 overrides: list[str] | None = None, encoder=None, state_dir: str | None = None):
        self.cfg, self.config_path, self.overrides = cfg, config_path, list(overrides or [])
        self.encoder = encoder
        self.registry: Registry | None = None
        self.metrics = Metrics()
        self.access_log = AccessLog(cfg.server.access_log)
        self.admin_digest = token_digest(resolve_secret(cfg.auth.admin_token, "auth.admin_token")
                                         if cfg.auth.admin_token else "")
        self.feedback = None
        if cfg.feedback.path:
            from mmft.serve.feedback import FeedbackLog

            self.feedback = FeedbackLog(cfg.feedback.path)
        bat = cfg.batching
        self.batcher = Batcher(self._process, max_batch=bat.max_batch if bat.enabled else 1,
                               max_wait_s=bat.max_wait_ms / 1000 if bat.enabled else 0.0,
                               on_batch=self.metrics.on_batch)
        state_dir = state_dir or cfg.server.state_dir
        self.state_dir = Path(state_dir) if state_dir else None
        self.generation = self._read_generation()
        self.ready = False
        self._owns_encoder = False

    # ---------------------------------------------------------------- start-up and reload

    def start(self) -> None:
        """Load the encoder (unless given) and every tenant; raises with the reason when one fails."""
        if self.encoder is None:
            from mmft.serve.encoders import build_encoder
            from mmft.serve.process_encoder import ProcessEncoder

            self.encoder = ProcessEncoder(self.cfg) if self.cfg.base.process else build_encoder(self.cfg)
            self._owns_encoder = True
        self.registry = Registry(self.encoder, self.cfg)
        self.registry.load(self.cfg)
        self.metrics.set_tenants(self.registry.tenants)

    def reload(self, names: list[str] | None = None, *, announce: bool = True) -> list:
        """Re-read the config file (when there is one) and build new versions of `names` (default all)."""
        cfg = load_serve_config(self.config_path, self.overrides) if self.config_path else self.registry.cfg
        try:
            built = self.registry.load(cfg, names)
        except BaseException:
            self.metrics.reloads.labels("failed").inc()
            raise
        self.metrics.reloads.labels("ok").inc()
        self.metrics.set_tenants(self.registry.tenants)
        if announce:
            self.generation = self._bump_generation()
        return built

    def _read_generation(self) -> int:
        if self.state_dir is None:
            return 0
        try:
            return int((self.state_dir / GENERATION_FILE).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _bump_generation(self) -> int:
        if self.state_dir is None:
            return 0
        from mmft.io import atomic_path

        gen = self._read_generation() + 1
        with atomic_path(self.state_dir / GENERATION_FILE) as tmp:
            tmp.write_text(str(gen))
        return gen

    async def watch(self) -> None:
        """Retire replaced slots, and follow reloads made by other workers (a bounded poll loop)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.server.reload_poll_s)
            self.registry.retire()
            gen = self._read_generation()
            if gen != self.generation:
                self.generation = gen
                try:
                    await loop.run_in_executor(None, lambda: self.reload(announce=False))
                except Exception as e:  # noqa: BLE001 (the old versions keep serving)
                    logger.error("reload refused, the current versions keep serving: %s", e)

    # ---------------------------------------------------------------- queries

    def tenant(self, name: str):
        t = self.registry.tenants.get(name) if self.registry is not None else None
        if t is None:
            raise ServeError(404, "unknown_tenant", f"no tenant '{name[:64]}' here (GET /tenants lists the "
                             "tenants your token can query)")
        return t

    async def search(self, tenant, kind: str, payload, k: int, target: str) -> tuple[np.ndarray, np.ndarray]:
        """(scores (k',), gallery rows (k',)) of one query, k' <= k; through the batcher."""
        gallery = tenant.images if target == "image" else tenant.texts
        if gallery is None:
            what = ("image gallery (index)" if target == "image"
                    else "caption gallery (text_index or thumbnails)")
            raise ServeError(404, "no_gallery", f"tenant '{tenant.name}' has no {what} to search; set it in "
                             "the serve config")
        timeout = self.cfg.limits.request_timeout_s
        job = Job(group=(tenant.slot, kind, target), payload=payload, k=k, context=tenant)
        try:
            return await asyncio.wait_for(self.batcher.submit(job), timeout)
        except asyncio.TimeoutError:
            raise ServeError(504, "timeout", f"the search did not finish within {timeout:g} s; try again "
                             "later or ask for fewer results") from None

    def _process(self, group, jobs: list[Job]) -> list:
        """Encode the jobs' queries as one batch and search their gallery once (worker thread)."""
        slot, kind, target = group
        tenant = jobs[0].context
        gallery = tenant.images if target == "image" else tenant.texts
        payloads = [j.payload for j in jobs]
        queries = (self.encoder.encode_text(payloads, slot) if kind == "text"
                   else self.encoder.encode_image(payloads, slot))  # (n, D)
        k = min(max(j.k for j in jobs), gallery.ntotal)
        scores, rows = gallery.search_rows(queries, k)  # (n, k) each
        return [(scores[i, :j.k], rows[i, :j.k]) for i, j in enumerate(jobs)]

    def close(self) -> None:
        self.access_log.close()
        if self._owns_encoder and hasattr(self.encoder, "close"):
            self.encoder.close()


def state_from_env() -> ServeState:
    """The state a `mmft serve` worker builds from the variables the CLI sets (see mmft.serve.server)."""
    import json

    path = os.environ.get("MMFT_SERVE_CONFIG") or None
    overrides = json.loads(os.environ.get("MMFT_SERVE_OVERRIDES") or "[]")
    cfg = load_serve_config(path, overrides)
    return ServeState(cfg, config_path=path, overrides=overrides,
                      state_dir=os.environ.get("MMFT_SERVE_STATE_DIR"))
