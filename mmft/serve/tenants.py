"""Tenants: an adapter slot of the shared base, its galleries, thumbnails and token; reloaded as one swap.

A `Tenant` is immutable once built: a request takes the current one from `Registry.tenants` and
finishes on it even if a reload replaces it meanwhile. A reload builds the new version completely
(adapter slot, indexes, the manifest check against the new slot's fingerprint) before one dict
assignment makes it current; a failed build leaves the old version serving. The old slot is dropped
from the encoder only after a grace period longer than any request may run.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmft.serve.config import BASELINE, ServeConfig, TenantConfig, resolve_secret, tenant_adapter

logger = logging.getLogger("mmft.serve")


@dataclass
class Tenant:
    name: str
    version: int
    slot: str  # the encoder's adapter slot: "<name>@<version>"
    fingerprint: dict
    images: object | None  # mmft.index.Index of the image gallery (text/image -> image)
    texts: object | None  # Index of the caption gallery (image -> text), ids "<image key>/<j>"
    thumbs: object | None  # mmft.index.thumbnails.ThumbnailStore
    token_digest: bytes | None  # sha256 of the bearer token; None = open
    source: dict = field(default_factory=dict)  # where the adapter and indexes came from
    loaded_at: float = field(default_factory=time.time)
    _rows: dict | None = None

    def has_key(self, key: str) -> bool:
        """True when `key` is an image of this tenant's gallery."""
        if self._rows is None:
            ids = self.images.ids if self.images is not None else []
            self._rows = {str(k): i for i, k in enumerate(ids)}
        return key in self._rows

    def caption(self, gallery_id: str) -> str | None:
        """The caption shown with a result: caption j for "<key>/<j>", the first caption for an image key."""
        if self.thumbs is None:
            return None
        key, _, j = gallery_id.partition("/")
        caps = self.thumbs.captions(key)
        i = int(j) if j.isdigit() else 0
        return caps[i] if i < len(caps) else None

    def info(self) -> dict:
        """What GET /tenants shows about this tenant."""
        def gallery(index):
            if index is None:
                return None
            m = index.manifest
            return {"vectors": index.ntotal, "dim": index.dim, "factory": m.get("factory"),
                    "created": m.get("created"), "path": str(index.path) if index.path else "memory"}
        fp = self.fingerprint
        return {"name": self.name, "version": self.version, "baseline": self.name == BASELINE,
                "lora_scale": fp.get("lora_scale") or 0.0, "adapter_sha256": fp.get("adapter_sha256"),
                "base_model": (fp.get("model") or {}).get("name"), "images": gallery(self.images),
                "captions": gallery(self.texts), "thumbnails": self.thumbs is not None,
                "protected": self.token_digest is not None, "loaded_at": self.loaded_at}


def tenant_specs(cfg: ServeConfig) -> dict[str, TenantConfig]:
    """Tenant name -> TenantConfig, the baseline (the base at LoRA scale 0) first when enabled."""
    out = dict(cfg.tenants)
    if cfg.baseline.enabled:
        b = cfg.baseline
        out = {BASELINE: TenantConfig(lora_scale=0.0, index=b.index, text_index=b.text_index, token=b.token),
               **out}
    return out


def token_digest(token: str) -> bytes | None:
    return hashlib.sha256(token.encode()).digest() if token else None


class Registry:
    """The current Tenant of every name; `load` builds versions, `retire` drops slots nobody uses any more."""

    def __init__(self, encoder, cfg: ServeConfig):
        self.encoder, self.cfg = encoder, cfg
        self.tenants: dict[str, Tenant] = {}
        self._version = 0
        self._retired: list[tuple[float, str]] = []
        self._lock = threading.Lock()  # one reload at a time

    def load(self, cfg: ServeConfig | None = None, names: list[str] | None = None) -> list[Tenant]:
        """Build (a new version of) the named tenants of `cfg` (default: all) and make them current at once.

        Tenants that `cfg` no longer lists are removed when names is None. Raises (and swaps nothing) when
        any tenant fails to build.
        """
        with self._lock:
            cfg = cfg or self.cfg
            specs = tenant_specs(cfg)
            unknown = [n for n in names or [] if n not in specs]
            if unknown:
                raise KeyError(f"no tenant '{unknown[0]}' in the config (tenants: {', '.join(specs)})")
            built: list[Tenant] = []
            try:
                for name in names or list(specs):
                    built.append(self._build(name, specs[name], cfg))
            except BaseException:
                for t in built:
                    self.encoder.drop_tenant(t.slot)
                raise
            current = dict(self.tenants) if names else {n: t for n, t in self.tenants.items() if n in specs}
            old = [t for n, t in self.tenants.items() if n not in current or n in {b.name for b in built}]
            current.update({t.name: t for t in built})
            self.tenants, self.cfg = current, cfg  # the swap: one assignment
            grace = 2 * cfg.limits.request_timeout_s + 1.0
            self._retired += [(time.monotonic() + grace, t.slot) for t in old]
            return built

    def retire(self, now: float | None = None) -> None:
        """Drop the encoder slots of replaced versions whose grace period is over."""
        now = time.monotonic() if now is None else now
        due = [s for t, s in self._retired if t <= now]
        self._retired = [(t, s) for t, s in self._retired if t > now]
        for slot in due:
            self.encoder.drop_tenant(slot)

    def _build(self, name: str, spec: TenantConfig, cfg: ServeConfig) -> Tenant:
        from mmft.index import load_index
        from mmft.index.manifest import check_fingerprint
        from mmft.index.thumbnails import open_thumbnails

        self._version += 1
        slot = f"{name}@{self._version}"
        adapter = tenant_adapter(spec)
        self.encoder.load_tenant(slot, None if adapter is None else str(adapter), spec.lora_scale)
        try:
            fp = self.encoder.fingerprint(slot)
            images = texts = thumbs = None
            if spec.index:
                images = load_index(Path(spec.index).resolve(), mmap=cfg.server.mmap, use_gpu="never")
                check_fingerprint(images.manifest, fp, spec.index)
                thumbs = open_thumbnails(images.path)
            if spec.text_index:
                texts = load_index(Path(spec.text_index).resolve(), mmap=cfg.server.mmap, use_gpu="never")
                check_fingerprint(texts.manifest, fp, spec.text_index)
            elif thumbs is not None:
                texts = self._caption_gallery(slot, fp, images, thumbs, cfg.limits.max_caption_gallery)
            token = resolve_secret(spec.token, f"tenants.{name}.token") if spec.token else ""
        except BaseException:
            self.encoder.drop_tenant(slot)
            raise
        source = {"adapter": str(adapter) if adapter else None, "index": spec.index or None,
                  "text_index": spec.text_index or None}
        logger.info("tenant %s version %d loaded (%s)", name, self._version, source)
        return Tenant(name=name, version=self._version, slot=slot, fingerprint=fp, images=images, texts=texts,
                      thumbs=thumbs, token_digest=token_digest(token), source=source)

    def _caption_gallery(self, slot: str, fp: dict, images, thumbs, limit: int):
        """An in-memory Flat index of the thumbnail store's captions embedded by this slot (image -> text)."""
        from mmft.index.core import finish_index
        from mmft.index.faiss_backend import new_faiss_index

        ids, texts = [], []
        for key in images.ids:
            for j, caption in enumerate(thumbs.captions(str(key))):
                ids.append(f"{key}/{j}")
                texts.append(caption)
        if not texts or len(texts) > limit:
            if texts:
                logger.warning("%d captions is over limits.max_caption_gallery=%d: no image -> text search "
                               "without a text_index", len(texts), limit)
            return None
        start = time.time()
        vectors = np.concatenate([self.encoder.encode_text(texts[s:s + 256], slot)
                                  for s in range(0, len(texts), 256)])  # (M, D)
        index = new_faiss_index(vectors, "Flat", use_gpu="never")
        return finish_index(index, ids, factory="Flat", fingerprint=fp, modality="text", start=start)
