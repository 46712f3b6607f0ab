"""`mmft serve`: a search service over built indexes; adapters on one shared base; a page to look at results.

- config: the serve config schema (tenants, batching, limits, auth, server) and the start-up check;
- encoders: the query-encoder interface (torch here, ONNX in mmft.bundle) and the backend choice;
- torch_encoder: one base model, each tenant's LoRA factors and projections swapped in by reference;
- tenants: a tenant's adapter slot, galleries, thumbnails and token; reload as one atomic swap;
- batching: concurrent queries gathered for a few milliseconds and run as one batch per tenant;
- state, app, routes: what a worker holds, the FastAPI app, the routes over it (page in static/);
- inputs, auth, metrics, feedback: request checks, bearer tokens, Prometheus + access log, feedback JSONL;
- server: `mmft serve`, uvicorn with N workers.

Importing mmft.serve loads neither torch nor FastAPI; torch loads only with the torch backend.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "create_app": "app",
    "ServeConfig": "config",
    "load_serve_config": "config",
    "check_config": "config",
    "Encoder": "encoders",
    "build_encoder": "encoders",
    "TorchEncoder": "torch_encoder",
    "serve": "server",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the names above, lazily imported)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mmft.serve' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"mmft.serve.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
