"""Mining stage: hard negatives for each training pair, found with mmft's own embeddings and index.

- core: `mine` (the `mmft mine` verb: a run's model or the base, training shards in, mined.jsonl out)
  and `mine_embeddings` (the search and the filters, on embeddings already computed);
- format: mined.jsonl, written and read only there (`write_mined`, `read_mined`).
The data stage (mmft.data.negatives) attaches the mined negatives to training batches.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"mine": "core", "mine_with_model": "core", "mine_embeddings": "core", "read_mined": "format",
            "write_mined": "format", "Mined": "format", "MinedError": "format"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mmft.mining.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mmft.mining' has no attribute {name!r}")
