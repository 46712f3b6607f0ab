"""Index stage: FAISS indexes over embeddings, with a manifest that pins the model that made them.

- core: `Index`, `build_index`, `load_index` and the run-directory helpers;
- manifest: the manifest's fields, the model fingerprint check and the stale-index refusal;
- faiss_backend: factories, training samples, search parameters, GPU transfer;
- distributed: embedding parts under torchrun and their merge (in memory or on disk).

Importing this package loads neither torch nor faiss, so a search-only process can use it without
torch; faiss loads when an index is built or opened, torch when a model embeds.
"""
from mmft.index.core import Index, build_index, build_index_from_run, load_index
from mmft.index.manifest import IndexLoadError, StaleIndexError

__all__ = ["Index", "IndexLoadError", "StaleIndexError", "build_index", "build_index_from_run", "load_index"]
