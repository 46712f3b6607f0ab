"""Deployment bundles: ONNX encoders for both towers, tokenizer, image transform, index, model card, manifest.

- writer: `mmft export --format onnx` (export_bundle / write_bundle), the only part that needs torch,
  with onnx_export (the towers as ONNX graphs), quantize (int8), measure (the card's figures) and card;
- runtime: `mmft.load_bundle(path)` -> encoders on ONNX Runtime alone, refusing altered files;
- encoder: the "onnx" backend of `mmft serve` (one bundle per tenant slot);
- manifest, preprocess, tokenizer: the files a bundle holds and how a client reproduces them.
runtime, encoder, manifest, preprocess and tokenizer never import torch: a search service runs from the
`serve-onnx` extra.
"""
