"""Run a bundle on ONNX Runtime alone: `mmft.load_bundle(path)` -> encoders, no torch anywhere.

    bundle = mmft.load_bundle("runs/demo/bundle")          # refuses files that do not match the manifest
    q = bundle.encode_text(["a red apple"])                # (1, D) float32 unit rows
    g = bundle.encode_image([PIL.Image.open("x.png")])     # (1, D)

This module and everything it imports (numpy, onnxruntime, tokenizers, Pillow, mmft.bundle.manifest /
preprocess / tokenizer, mmft.io) stay free of torch, so a search service runs from the `serve-onnx`
install extra; a test imports it with torch made unimportable. `mmft.bundle.encoder.OnnxEncoder` serves
bundles (one per tenant) behind `mmft serve`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mmft.bundle.manifest import BundleError, read_manifest
from mmft.bundle.preprocess import preprocess_batch, read_preprocess
from mmft.bundle.tokenizer import BundleTokenizer


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session, every graph optimisation on; `threads` intra-op threads (None = all)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _open_image(im):
    if isinstance(im, (str, Path)):
        from PIL import Image

        if not Path(im).is_file():
            raise FileNotFoundError(f"image file '{im}' does not exist")
        with Image.open(im) as f:
            return f.convert("RGB")
    return im


class Bundle:
    """A loaded bundle: both encoders on ONNX Runtime, the tokenizer and the image transform."""

    def __init__(self, path: Path, manifest: dict, precision: str, threads: int | None = None):
        encoders = manifest["encoders"]
        if precision not in encoders["files"]:
            raise BundleError(f"bundle {path} has no {precision!r} encoders (it has "
                              f"{sorted(encoders['files'])}); export it with --quantize int8 for int8")
        self.path, self.manifest, self.precision = path, manifest, precision
        files = encoders["files"][precision]
        self.image_session = session(path / files["image"], threads)
        self.text_session = session(path / files["text"], threads)
        self.image_input, self.text_input = encoders["image"]["input"], encoders["text"]["input"]
        self.dim = int(encoders["dim"])
        self.preprocess = read_preprocess(path)
        self.tokenizer = BundleTokenizer(path / manifest["tokenizer"]["file"], manifest["tokenizer"])

    def __repr__(self) -> str:
        fp = self.fingerprint()
        base = (fp.get("model") or {}).get("name")
        return (f"Bundle({self.path}, {base}, dim {self.dim}, {self.precision}, "
                f"LoRA scale {self.manifest.get('lora_scale')})")

    @property
    def index_dir(self) -> Path | None:
        """The FAISS index folder shipped in the bundle, or None."""
        rel = self.manifest.get("index")
        return self.path / rel if rel else None

    def fingerprint(self) -> dict:
        """The model fingerprint (base identity, adapter sha256, LoRA scale) indexes are pinned to."""
        return dict(self.manifest["fingerprint"])

    def embed_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(N, 3, H, W) float32 preprocessed images -> (N, D) float32 unit rows."""
        pixels = np.asarray(pixels, np.float32)
        parts = [self.image_session.run(None, {self.image_input: pixels[s:s + batch_size]})[0]
                 for s in range(0, len(pixels), batch_size)]
        return _unit_rows(np.concatenate(parts)) if parts else np.zeros((0, self.dim), np.float32)

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """(N, L) int64 token ids -> (N, D) float32 unit rows."""
        out = self.text_session.run(None, {self.text_input: np.asarray(ids, np.int64)})[0]  # (N, D)
        return _unit_rows(out)

    def encode_text(self, texts, batch_size: int = 64) -> np.ndarray:
        """Texts -> (N, D) float32 unit rows."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        parts = [self.embed_tokens(self.tokenizer(texts[s:s + batch_size]))
                 for s in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def encode_image(self, images, batch_size: int = 32) -> np.ndarray:
        """PIL images, (H, W, 3) uint8 arrays or file paths -> (N, D) float32 unit rows."""
        images = list(images)
        parts = [self.embed_pixels(preprocess_batch([_open_image(i) for i in images[s:s + batch_size]],
                                                    self.preprocess))
                 for s in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


def load_bundle(path: str | Path, *, precision: str | None = None, verify: bool = True,
                threads: int | None = None) -> Bundle:
    """Open a bundle written by `mmft export --format onnx`; refuses (BundleError) files that do not match
    the sha256 in its manifest. precision: "fp32" or "int8" (default: the one the bundle was exported for).
    """
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    return Bundle(path, manifest, precision or manifest["encoders"]["default_precision"], threads)

