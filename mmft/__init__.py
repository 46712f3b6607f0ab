"""mmft: fine-tune CLIP-style dual encoders on a domain with LoRA and ship the result as a search index.

Pipeline (one module per stage, data flowing one way):
config -> data -> models (+lora) -> loss -> train -> adapter -> embed -> index -> evaluate.
Heavy modules load on first use, so `import mmft` stays cheap on a bare CPU box.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Config": "config",
    "load_config": "config",
    "create_model": "models",
    "model_identity": "models",
    "apply_lora": "lora",
    "merge_lora": "lora",
    "set_lora_scale": "lora",
    "trainable_summary": "lora",
    "save_adapter": "adapter",
    "load_adapter": "adapter",
    "export": "adapter",
    "load_model": "adapter",
    "contrastive_loss": "loss",
    "sigmoid_loss": "loss",
    "train": "trainer",
    "embed": "embeddings",
    "build_index": "index",
    "load_index": "index",
    "evaluate": "evaluation",
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
