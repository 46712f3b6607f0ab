"""The "onnx" backend of `mmft serve`: each tenant slot is one exported bundle, run on ONNX Runtime.

    base:    {backend: onnx, bundle: runs/demo/bundle-base}      # the baseline tenant (LoRA scale 0)
    tenants: {tuned: {adapter: runs/demo/bundle, lora_scale: 1.0, index: runs/demo/bundle/index}}

A bundle has its adapter merged in at one LoRA scale, so a tenant's `lora_scale` must be the one its
bundle was exported at (a sentence says so otherwise), and the baseline slot takes `base.bundle`, a
bundle of the base without its adapter (`mmft export --format onnx --lora-scale 0`). Fingerprints come
from the bundle manifests, so the service's index checks accept exactly the indexes the torch model at
that scale would. No torch is imported here or below (mmft.bundle.runtime).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mmft.bundle.manifest import read_manifest
from mmft.bundle.runtime import Bundle, load_bundle
from mmft.model.identity import same_base


class OnnxEncoder:
    """Encoder (mmft.serve.encoders) whose slots are bundles; slots of one bundle folder share sessions."""

    def __init__(self, base_bundle: str | Path | None = None, *, precision: str | None = None,
                 threads: int | None = None, dim: int | None = None):
        self.precision, self.threads = precision, threads or None
        self.base_path = Path(base_bundle) if base_bundle else None
        self.base = None
        if base_bundle:
            self.base = load_bundle(self.base_path, precision=precision, threads=self.threads)
        self.dim = self.base.dim if self.base is not None else dim  # the service reads it before any slot
        self._slots: dict[str, Bundle] = {}

    @classmethod
    def from_config(cls, cfg) -> OnnxEncoder:
        """From a ServeConfig: base.bundle (may be empty when the baseline is off) and base.threads; without
        base.bundle the dimension comes from the first tenant's bundle manifest."""
        dim = None
        first = next((t.adapter for t in cfg.tenants.values() if t.adapter), None)
        if not cfg.base.bundle and first:
            dim = int(read_manifest(first, verify=False)["encoders"]["dim"])
        return cls(cfg.base.bundle or None, threads=cfg.base.threads or None, dim=dim)

    @property
    def tenants(self) -> list[str]:
        return list(self._slots)

    def _open(self, adapter: str | None) -> Bundle:
        if adapter is None:
            if self.base is None:
                raise ValueError("the onnx backend serves the base model from base.bundle, which is not set: "
                                 "export one with `mmft export --format onnx --lora-scale 0` or turn the "
                                 "baseline off")
            return self.base
        path = Path(adapter)
        if self.base_path is not None and path.resolve() == self.base_path.resolve():
            return self.base
        return load_bundle(path, precision=self.precision, threads=self.threads)

    def _check(self, bundle: Bundle, adapter: str | None, lora_scale: float) -> None:
        fp = bundle.fingerprint()
        exported = fp.get("lora_scale") or 0.0
        if adapter is None and fp.get("adapter_sha256") is not None:
            raise ValueError(f"base.bundle {bundle.path} carries an adapter at LoRA scale {exported:g}; the "
                             "baseline needs the base itself: export it with --lora-scale 0")
        if not math.isclose(exported, float(lora_scale), abs_tol=1e-9):
            raise ValueError(f"bundle {bundle.path} was exported at LoRA scale {exported:g} but the tenant "
                             f"asks for {lora_scale:g}: set lora_scale to {exported:g} or export the bundle "
                             f"again with --lora-scale {lora_scale:g}")
        if self.base is not None and not same_base(fp.get("model"), self.base.fingerprint().get("model")):
            raise ValueError(f"bundle {bundle.path} was exported from another base model than base.bundle "
                             f"{self.base.path}: one service shares one base; serve it from a second service")
        if self.dim is not None and bundle.dim != self.dim:
            raise ValueError(f"bundle {bundle.path} embeds to {bundle.dim} dimensions, the service to "
                             f"{self.dim}")

    def load_tenant(self, slot: str, adapter: str | None, lora_scale: float) -> None:
        bundle = self._open(adapter)
        self._check(bundle, adapter, lora_scale)
        if self.dim is None:
            self.dim = bundle.dim
        self._slots[slot] = bundle  # one assignment: a batch in flight keeps the bundle it took

    def drop_tenant(self, slot: str) -> None:
        self._slots.pop(slot, None)

    def _bundle(self, slot: str) -> Bundle:
        bundle = self._slots.get(slot)
        if bundle is None:
            raise KeyError(f"no encoder slot {slot!r} (loaded: {', '.join(self._slots) or 'none'})")
        return bundle

    def encode_text(self, texts: list[str], tenant: str) -> np.ndarray:
        return self._bundle(tenant).encode_text(texts)

    def encode_image(self, images: list, tenant: str) -> np.ndarray:
        return self._bundle(tenant).encode_image(images)

    def fingerprint(self, tenant: str) -> dict:
        return self._bundle(tenant).fingerprint()
