"""Index stage: FAISS indexes over embeddings, with a manifest that pins the model that made them.

- core: `Index`, `build_index`, `load_index` and the run-directory helpers;
- manifest: the manifest's fields, the model fingerprint check and the stale-index refusal;
- faiss_backend: factories, training samples, search parameters, GPU transfer;
- distributed: embedding parts under torchrun and their merge (in memory or on disk).
"""
