"""mmft: fine-tune CLIP-style dual encoders on a domain with LoRA and ship the result as a search index.

Pipeline (one package per stage, data flowing one way):
config -> data -> model (+LoRA) -> loss -> training -> run directory -> embeddings -> index ->
evaluation -> bundle / serve.
Heavy modules load on first use, so `import mmft` stays cheap on a bare CPU box.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Config": "config",
    "load_config": "config",
    "create_model": "model.factory",
    "model_identity": "model.factory",
    "apply_lora": "model.lora",
    "merge_lora": "model.lora",
    "set_lora_scale": "model.lora",
    "trainable_summary": "model.lora",
    "save_adapter": "model.adapter",
    "load_adapter": "model.adapter",
    "export": "model.adapter",
    "load_model": "model.adapter",
    "contrastive_loss": "loss.contrastive",
    "sigmoid_loss": "loss.contrastive",
    "train": "training.trainer",
    "embed": "embeddings",
    "build_index": "index.core",
    "load_index": "index.core",
    "evaluate": "evaluation.core",
    "load_bundle": "bundle.runtime",
}

__all__ = sorted(_EXPORTS) + ["__version__"]  # noqa: PLE0605 (the names above, lazily imported)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mmft' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"mmft.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
