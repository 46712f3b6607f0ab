"""Embed a captioned image set with a dual encoder: unit-norm image and caption vectors, streamed to disk.

    emb = embed(model, ["data/test-{00000..00003}.tar"], tokenizer=tok, preprocess=preprocess_val)
    emb.image  # (N, D) float32, one row per image;  emb.text  # (M, D), one row per caption
    emb.caption_image  # (M,) row of each caption's image

A source is shard specs (read with `mmft.data.stream.eval_loader`) or any iterable of batches
`{"image": (B, 3, S, S), "key": [str], "captions": [[str]], "group": [str] | None}`.
With `out_dir`, vectors go to disk in parts as they come and are joined at the end into
memory-mappable `image.npy` / `text.npy`, so a large gallery never sits in RAM whole.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmft.io import atomic_path, write_json

EMBEDDINGS_FORMAT = 1
_ARRAYS = ("image", "text", "caption_image")


class EmbeddingsError(ValueError):
    """Embeddings that cannot be computed or loaded; the message says what to do."""


@dataclass
class Embeddings:
    """Unit-norm embeddings of a captioned image set (arrays may be read-only memory maps)."""

    image: np.ndarray  # (N, D) float32 or float16
    text: np.ndarray  # (M, D)
    keys: list[str]  # (N,) sample key of each image
    captions: list[str]  # (M,) caption strings
    caption_image: np.ndarray  # (M,) int64 image row of each caption
    groups: list[str] | None = None  # (N,) group id of each image
    meta: dict = field(default_factory=dict)  # model fingerprint, dim, dtype, seconds

    @property
    def dim(self) -> int:
        return int(self.image.shape[1] if self.image.size else self.text.shape[1])

    def save(self, out_dir: str | Path) -> Path:
        """Write image.npy, text.npy, caption_image.npy, items.json and manifest.json (last) atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "manifest.json").unlink(missing_ok=True)  # the manifest marks a complete set
        for name in _ARRAYS:
            with atomic_path(out_dir / f"{name}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, np.asarray(getattr(self, name)))
        _write_items(out_dir, self.keys, self.captions, self.groups)
        _write_manifest(out_dir, self)
        return out_dir

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> Embeddings:
        """Read a directory written by `save` or `embed(out_dir=...)`; arrays are memory-mapped by default."""
        path = Path(path)
        man = path / "manifest.json"
        if not man.is_file():
            raise EmbeddingsError(f"no embeddings in {path}: manifest.json is missing (an interrupted run?); "
                                  "embed again with out_dir set to this folder")
        meta, items = _read_listing(path)
        arrays = {n: _load_array(path / f"{n}.npy", mmap) for n in _ARRAYS}
        _check_shapes(path, meta, arrays)
        return cls(keys=items["keys"], captions=items["captions"], groups=items["groups"],
                   meta=meta["meta"], **arrays)


_FIX = "the embeddings folder is damaged or incomplete: embed again with out_dir set to this folder"


def _read_listing(path: Path) -> tuple[dict, dict]:
    """manifest.json and items.json of an embeddings folder, their fields and lengths checked."""
    from mmft.io import read_json_object

    fields = {"format": (int,), "images": (int,), "captions": (int,), "dim": (int,), "meta": (dict,)}
    meta = read_json_object(path / "manifest.json", fields, EmbeddingsError, _FIX)
    if meta["format"] > EMBEDDINGS_FORMAT:
        raise EmbeddingsError(f"{path / 'manifest.json'} has format {meta['format']}, newer than this mmft "
                              f"reads ({EMBEDDINGS_FORMAT}): upgrade mmft or embed again")
    fields = {"keys": (list,), "captions": (list,), "groups": (list, type(None))}
    items = read_json_object(path / "items.json", fields, EmbeddingsError, _FIX)
    for name, want in (("keys", meta["images"]), ("captions", meta["captions"]), ("groups", meta["images"])):
        if items[name] is not None and len(items[name]) != want:
            raise EmbeddingsError(f"{path / 'items.json'} lists {len(items[name])} {name} but manifest.json "
                                  f"records {want}; {_FIX}")
    return meta, items


def _load_array(file: Path, mmap: bool) -> np.ndarray:
    if not file.is_file():
        raise EmbeddingsError(f"{file} is missing; {_FIX}")
    try:  # allow_pickle stays False: an .npy holding Python objects is refused, never unpickled
        return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise EmbeddingsError(f"{file} is not a readable .npy array ({str(e)[:120]}); {_FIX}") from None


def _check_shapes(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Rows and widths as the manifest records them (an unembedded modality has 0 columns or 0 rows)."""
    n_img, n_cap, dim = meta["images"], meta["captions"], meta["dim"]
    image, text, cap = arrays["image"], arrays["text"], arrays["caption_image"]
    fits = {"image": image.ndim == 2 and len(image) == n_img and image.shape[1] in (dim, 0),
            "text": text.ndim == 2 and len(text) in (n_cap, 0) and text.shape[1] in (dim, 0),
            "caption_image": cap.shape == (n_cap,) and cap.dtype.kind == "i"}
    for name, ok in fits.items():
        if not ok:
            raise EmbeddingsError(f"{path / name}.npy has shape {arrays[name].shape}, which does not fit the "
                                  f"{n_img} images, {n_cap} captions and dim {dim} that manifest.json "
                                  f"records; {_FIX}")


def _write_items(out_dir: Path, keys, captions, groups) -> None:
    with atomic_path(out_dir / "items.json") as tmp:
        tmp.write_text(json.dumps({"keys": list(keys), "captions": list(captions), "groups": groups}))


def _write_manifest(out_dir: Path, emb: Embeddings) -> None:
    write_json(out_dir / "manifest.json", {
        "format": EMBEDDINGS_FORMAT, "images": len(emb.keys), "captions": len(emb.captions),
        "dim": emb.dim, "dtype": str(emb.image.dtype), "meta": emb.meta})


# ---------------------------------------------------------------- model fingerprint


def model_fingerprint(model: torch.nn.Module) -> dict:
    """What decides a model's embeddings: base identity, adapter sha256 and LoRA scale.

    At LoRA scale 0 the model is exactly its base, so the adapter is recorded as None there.
    """
    from mmft.model.adapter import adapter_digest
    from mmft.model.lora import get_lora_scale

    ident = getattr(model, "mmft_identity", None)
    digest = adapter_digest(model)
    scale = get_lora_scale(model) if digest is not None else None
    if scale == 0.0:
        digest = scale = None
    return {"model": dict(ident) if ident is not None else None, "adapter_sha256": digest,
            "lora_scale": None if scale is None else float(scale)}


def describe_fingerprint(fp: dict) -> str:
    """A model_fingerprint in words: 'base mmft-mini (packaged-towers, sha256 1a2b3c4d…) with adapter
    sha256 9f8e7d6c5b4a… at LoRA scale 0.5'."""
    from mmft.model.factory import describe_identity

    ident = fp.get("model")
    base = f"base {describe_identity(ident)}" if ident is not None else "an unidentified base model"
    if fp.get("adapter_sha256") is None:
        return base + " with no adapter (or at LoRA scale 0)"
    return f"{base} with adapter sha256 {fp['adapter_sha256'][:12]}… at LoRA scale {fp['lora_scale']:g}"


# ---------------------------------------------------------------- encoding


def _device_of(model: torch.nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (fp16 where bf16 is missing); plain fp32 on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _encode_image_tensor(model, images: torch.Tensor, device: torch.device) -> np.ndarray:
    with _autocast(device):
        out = model.encode_image(images.to(device, non_blocking=True), normalize=True)  # (B, D)
    return F.normalize(out.float(), dim=-1).cpu().numpy()  # re-normalise: bf16 outputs are not unit


def _encode_token_batches(model, tokenizer, texts: list[str], batch_size: int, device: torch.device):
    for s in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[s:s + batch_size]).to(device)  # (n, L)
        with _autocast(device):
            out = model.encode_text(tokens, normalize=True)  # (n, D)
        yield F.normalize(out.float(), dim=-1).cpu().numpy()


def encode_texts(model, tokenizer, texts: list[str], *, batch_size: int = 256, device=None) -> np.ndarray:
    """(N, D) float32 unit vectors of `texts` (query side)."""
    if isinstance(texts, str):
        texts = [texts]
    device = _device_of(model, device)
    with _eval_mode(model):
        parts = list(_encode_token_batches(model, tokenizer, list(texts), batch_size, device))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def encode_images(model, images, *, preprocess=None, batch_size: int = 64, device=None) -> np.ndarray:
    """(N, D) float32 unit vectors of images: a (N, 3, S, S) tensor, or PIL images / file paths +
    preprocess."""
    device = _device_of(model, device)
    if not torch.is_tensor(images):
        if preprocess is None:
            raise EmbeddingsError("images given as PIL images or paths need `preprocess` (preprocess_val)")
        images = torch.stack([preprocess(_open_image(im)) for im in images])  # (N, 3, S, S)
    with _eval_mode(model):
        parts = [_encode_image_tensor(model, images[s:s + batch_size], device)
                 for s in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _open_image(im):
    from PIL import Image

    if isinstance(im, (str, Path)):
        if not Path(im).is_file():
            raise EmbeddingsError(f"image file '{im}' does not exist")
        with Image.open(im) as f:
            return f.convert("RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------- streaming


class _Sink:
    """Collects embedding rows in memory, or in parts on disk joined at the end (out_dir)."""

    def __init__(self, out_dir: Path | None, part_size: int, dtype):
        self.out_dir, self.part_size, self.dtype = out_dir, part_size, dtype
        self.buf: dict[str, list[np.ndarray]] = {n: [] for n in _ARRAYS}
        self.rows = {n: 0 for n in _ARRAYS}
        self.cols = {n: 0 for n in _ARRAYS}  # vector width per array (0 = not embedded)
        self.parts: list[Path] = []
        self.buffered = 0
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "manifest.json").unlink(missing_ok=True)
            shutil.rmtree(out_dir / "parts", ignore_errors=True)  # leftovers of an interrupted run

    def add(self, image: np.ndarray, text: np.ndarray, caption_image: np.ndarray) -> None:
        for name, arr in zip(_ARRAYS, (image, text, caption_image)):
            if name != "caption_image":
                arr = arr.astype(self.dtype)
                self.cols[name] = max(self.cols[name], arr.shape[1])
            self.buf[name].append(arr)
            self.rows[name] += len(arr)
        self.buffered += len(image) + len(text)
        if self.out_dir is not None and self.buffered >= self.part_size:
            self._flush()

    def _shape(self, name: str, rows: int) -> tuple[int, ...]:
        return (rows,) if name == "caption_image" else (rows, self.cols[name])

    def _dtype(self, name: str):
        return np.int64 if name == "caption_image" else self.dtype

    def _joined(self, name: str) -> np.ndarray:
        parts = [a for a in self.buf[name] if len(a)]
        return (np.concatenate(parts) if parts else np.zeros(self._shape(name, 0), self._dtype(name)))

    def _flush(self) -> None:
        path = self.out_dir / "parts" / f"part-{len(self.parts):05d}.npz"
        path.parent.mkdir(exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{n: self._joined(n) for n in _ARRAYS})
        self.parts.append(path)
        self.buf = {n: [] for n in _ARRAYS}
        self.buffered = 0

    def finish(self) -> dict[str, np.ndarray]:
        if self.out_dir is None:
            return {n: self._joined(n) for n in _ARRAYS}
        if self.buffered or not self.parts:
            self._flush()
        return self._join_parts()

    def _join_parts(self) -> dict[str, np.ndarray]:
        """Copy the parts, one at a time, into one .npy per array; return read-only memory maps."""
        out = {}
        for name in _ARRAYS:
            with atomic_path(self.out_dir / f"{name}.npy") as tmp:
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=self._dtype(name),
                                               shape=self._shape(name, self.rows[name]))
                row = 0
                for part in self.parts:
                    with np.load(part) as z:
                        a = z[name]
                    if len(a):
                        mm[row:row + len(a)] = a
                    row += len(a)
                mm.flush()
                del mm
            out[name] = np.load(self.out_dir / f"{name}.npy", mmap_mode="r")
        shutil.rmtree(self.out_dir / "parts", ignore_errors=True)
        return out


# ---------------------------------------------------------------- embed


def _batches(source, data_cfg, preprocess, batch_size: int, num_workers: int | None) -> Iterable[dict]:
    """Shard specs -> mmft.data.stream.eval_loader; a zero-argument callable -> its result; else the
    iterable."""
    if isinstance(source, (str, Path)) or (isinstance(source, (list, tuple)) and source
                                           and all(isinstance(s, (str, Path)) for s in source)):
        if preprocess is None:
            raise EmbeddingsError("embedding shards needs `preprocess` (the model's preprocess_val)")
        from mmft.config import DataConfig
        from mmft.data.stream import eval_loader

        specs = [str(source)] if isinstance(source, (str, Path)) else [str(s) for s in source]
        data_cfg = data_cfg or DataConfig()
        workers = data_cfg.num_workers if num_workers is None else num_workers
        return eval_loader(specs, data_cfg, preprocess, batch_size=batch_size, num_workers=workers)
    return source() if callable(source) else source


def embed(model: torch.nn.Module, source: Any, *, tokenizer=None, preprocess=None, data_cfg=None,
          batch_size: int = 128, fp16: bool = False, out_dir: str | Path | None = None,
          part_size: int = 200_000, modality: str = "both", device=None, num_workers: int | None = None,
          progress: bool = True) -> Embeddings:
    """Embed every image and every caption of `source` -> Embeddings (rows L2-normalised).

    source: shard specs, an iterable of batches, or a zero-argument callable returning one.
    modality: "both", "image" (captions recorded but not embedded) or "text". fp16 stores float16.
    out_dir: stream vectors to disk in parts of ~part_size rows and return memory-mapped arrays.
    """
    if modality not in ("both", "image", "text"):
        raise EmbeddingsError(f"modality={modality!r} is not one of 'both', 'image', 'text'")
    if modality != "image" and tokenizer is None:
        raise EmbeddingsError("embedding captions needs `tokenizer` (from create_model or load_model)")
    device = _device_of(model, device)
    start = time.time()
    sink = _Sink(Path(out_dir) if out_dir is not None else None, part_size,
                 np.float16 if fp16 else np.float32)
    keys, captions, groups = [], [], []
    batches = _batches(source, data_cfg, preprocess, batch_size, num_workers)
    bar = _progress(batches, progress)
    with _eval_mode(model):
        for batch in bar:
            caps = [str(c) for cs in batch["captions"] for c in cs]
            n_img = len(batch["key"])
            img = (_encode_image_tensor(model, batch["image"], device) if modality != "text"
                   else np.zeros((n_img, 0), np.float32))  # (B, D)
            txt = ([] if modality == "image" else
                   list(_encode_token_batches(model, tokenizer, caps, batch_size, device)))
            txt = np.concatenate(txt) if txt else np.zeros((0, img.shape[1]), np.float32)  # (C, D)
            cap_img = np.repeat(np.arange(len(keys), len(keys) + n_img),
                                [len(cs) for cs in batch["captions"]])  # (C,)
            sink.add(img, txt, cap_img.astype(np.int64))
            keys.extend(str(k) for k in batch["key"])
            captions.extend(caps)
            groups.extend(batch.get("group") or [None] * n_img)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(captions=len(captions), refresh=False)
    arrays = sink.finish()
    meta = {**model_fingerprint(model), "normalized": True, "modality": modality,
            "dtype": "float16" if fp16 else "float32", "seconds": round(time.time() - start, 3)}
    emb = Embeddings(keys=keys, captions=captions, groups=None if all(g is None for g in groups) else
                     [None if g is None else str(g) for g in groups], meta=meta, **arrays)
    if out_dir is not None:
        _write_items(Path(out_dir), emb.keys, emb.captions, emb.groups)
        _write_manifest(Path(out_dir), emb)
    return emb


class _CountImages:
    """Iterate batches while a tqdm bar counts images (items/s)."""

    def __init__(self, batches, bar):
        self.batches, self.bar = batches, bar

    def __iter__(self):
        for batch in self.batches:
            yield batch
            self.bar.update(len(batch["key"]))
        self.bar.close()

    def set_postfix(self, **kw):
        self.bar.set_postfix(**kw)


def _progress(batches, progress: bool):
    if not progress:
        return batches
    from tqdm.auto import tqdm

    return _CountImages(batches, tqdm(desc="embed", unit="img", total=None))
