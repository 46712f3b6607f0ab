"""The query-encoder interface of `mmft serve`, and the choice of backend.

The service never touches a model directly: it asks an *encoder* for unit query vectors. An encoder
holds one base model and any number of adapter *slots*; a slot is a name the service chooses
(`"<tenant>@<version>"`, so a reloaded tenant gets a fresh slot while requests in flight finish on the
old one). Two backends implement it:

- "torch" (mmft.serve.torch_encoder.TorchEncoder): the open_clip model with LoRA layers whose A/B
  factors and projections are swapped in by reference per batch;
- "onnx" (mmft.bundle): an exported bundle run by onnxruntime, no torch in the process.

An encoder is an object with:

    dim: int                 width D of the vectors it returns
    tenants: list[str]       the slots loaded now

    load_tenant(slot: str, adapter: str | None, lora_scale: float) -> None
        Load (or replace) a slot. `adapter` is an adapter folder of the base (None = the base itself;
        for the onnx backend, whatever folder its bundle format names); `lora_scale` scales the
        fine-tuning delta (0 = the base). Raises ValueError (a sentence) for an adapter of another base.
    drop_tenant(slot: str) -> None
        Forget a slot (no error when it is already gone).
    encode_text(texts: list[str], tenant: str) -> np.ndarray
        (n, D) float32, rows L2-normalised, encoded by slot `tenant`; n = len(texts) >= 1.
    encode_image(images: list[PIL.Image.Image], tenant: str) -> np.ndarray
        (n, D) float32 unit rows of RGB PIL images (the encoder applies its own preprocessing).
    fingerprint(tenant: str) -> dict
        {"model": base identity dict, "adapter_sha256": str | None, "lora_scale": float | None}, the
        same fields `mmft.embeddings.model_fingerprint` gives for the equivalent torch model (adapter and
        scale are None at LoRA scale 0), so `mmft.index.manifest.check_fingerprint(manifest, fp, where)`
        accepts exactly the indexes built by that slot's model.

Calls come from one worker thread at a time per encoder (the service serialises batches), so an
implementation need not be thread-safe, but load_tenant/drop_tenant may run in another thread while
a batch is being encoded: keep a slot's state in its own object and register it in one assignment.
Encoders of a batch all use one slot; the service splits mixed batches by slot.
"""
from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import numpy as np

# backend -> "module:factory"; the factory takes (serve config) and returns an Encoder
BACKENDS = {
    "torch": "mmft.serve.torch_encoder:TorchEncoder.from_config",
    "onnx": "mmft.bundle.encoder:OnnxEncoder.from_config",
}


@runtime_checkable
class Encoder(Protocol):
    dim: int

    @property
    def tenants(self) -> list[str]: ...

    def load_tenant(self, slot: str, adapter: str | None, lora_scale: float) -> None: ...

    def drop_tenant(self, slot: str) -> None: ...

    def encode_text(self, texts: list[str], tenant: str) -> np.ndarray: ...

    def encode_image(self, images: list, tenant: str) -> np.ndarray: ...

    def fingerprint(self, tenant: str) -> dict: ...


def build_encoder(cfg) -> Encoder:
    """The encoder of `cfg.base.backend` for a ServeConfig (its base model loaded, no slot yet)."""
    target = BACKENDS[cfg.base.backend]
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        extra = "serve-onnx" if cfg.base.backend == "onnx" else "serve"
        raise ImportError(f"the '{cfg.base.backend}' serving backend needs {module_name} ({e}); "
                          f"`pip install mmft[{extra}]`") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part)
    return factory(cfg)
