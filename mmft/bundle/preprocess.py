"""The image transform of a bundle, in numpy: what a client runs instead of torchvision.

open_clip's evaluation transform is resize (shortest side, longest side or squash) -> centre crop (or pad)
-> [0, 1] floats -> (x - mean) / std. `preprocess.json` records those parameters and
`preprocess_image` applies them with numpy alone. The resize reimplements Pillow's antialiased
resampling (the call torchvision makes for PIL images) in integer fixed point, so its output is
bit-identical to Pillow's (checked on 400 random size pairs) and the whole transform matches open_clip's
to float rounding (the tests compare both on real photographs and rendered clip art). A client in
another language reproduces it from this file: separable convolution with the bicubic (a = -0.5) or
triangle kernel stretched by the downscale factor, weights normalised per output pixel and rounded to
22 fractional bits, each pass rounded and clipped to 8 bits (see `resize` for which pass runs first).

PIL images are resized by Pillow itself (fast; what torchvision calls), uint8 arrays by the numpy
reference; the tests check the two give the same bytes. Images are converted to RGB before resizing,
as mmft's own embedding path does.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PREPROCESS_FILE = "preprocess.json"
PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point fraction for 8-bit images
RESIZE_MODES = ("shortest", "longest", "squash")


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0)}


def _coefficients(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """(taps (out, K) int64 source positions, weights (out, K) int64 fixed point) of one resampling pass."""
    kernel, support = FILTERS[interpolation]
    scale = in_size / out_size
    stretch = max(scale, 1.0)  # downscaling widens the kernel: that is the antialiasing
    support *= stretch
    width = math.ceil(support) * 2 + 1
    centre = (np.arange(out_size) + 0.5) * scale  # (out,)
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero
    hi = np.minimum((centre + support + 0.5).astype(np.int64), in_size)
    pos = lo[:, None] + np.arange(width)[None, :]  # (out, K)
    w = kernel((pos - centre[:, None] + 0.5) / stretch)
    w = np.where(pos < hi[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    one = float(1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int64)
    return np.minimum(pos, in_size - 1), fixed


def _resample_axis(img: np.ndarray, out_size: int, axis: int, interpolation: str) -> np.ndarray:
    """One pass along `axis` (0 = rows, 1 = columns) of an (H, W, C) uint8 image -> uint8."""
    taps, weights = _coefficients(img.shape[axis], out_size, interpolation)
    src = np.moveaxis(img, axis, 0).astype(np.int64)  # (in, other, C)
    acc = np.full((out_size,) + src.shape[1:], 1 << (PRECISION_BITS - 1), np.int64)
    for k in range(taps.shape[1]):
        acc += src[taps[:, k]] * weights[:, k, None, None]
    out = np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize(img: np.ndarray, size: tuple[int, int], interpolation: str = "bicubic", *,
           pillow_order: bool = True) -> np.ndarray:
    """Antialiased resize of an (H, W, C) uint8 array to size = (height, width), equal to Pillow's.

    The horizontal pass runs first, except where the height shrinks by more than twice as many pixels
    as the width (what Pillow >= 13 does; pillow_order=False always goes horizontal first, as older
    Pillow did). The two orders differ by a level or two of 8 bits at most.
    """
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation {interpolation!r} is not one of {sorted(FILTERS)}")
    h, w = int(size[0]), int(size[1])
    in_h, in_w = img.shape[:2]
    if (h, w) == (in_h, in_w):
        return img
    vertical_first = pillow_order and in_h > h and in_h - h > 2 * (in_w - w)
    for axis, n in ((0, h), (1, w)) if vertical_first else ((1, w), (0, h)):
        if n != img.shape[axis]:
            img = _resample_axis(img, n, axis, interpolation)
    return img


def _target_size(h: int, w: int, cfg: dict) -> tuple[int, int]:
    """(height, width) after the resize step of open_clip's evaluation transform."""
    th, tw = cfg["size"]
    mode = cfg["resize_mode"]
    if mode == "squash":
        return th, tw
    if mode == "shortest" and th == tw:  # torchvision Resize(int): the long side is truncated
        short, long = min(h, w), max(h, w)
        new_long = int(th * long / short)
        return (th, new_long) if h <= w else (new_long, th)
    ratio_h, ratio_w = h / th, w / tw  # keep-ratio resize: the long side is rounded
    ratio = max(ratio_h, ratio_w) if mode == "longest" else min(ratio_h, ratio_w)
    return round(h / ratio), round(w / ratio)


def _crop_or_pad(img: np.ndarray, size: tuple[int, int], fill: int) -> np.ndarray:
    """Centre crop to size = (height, width), padding with `fill` first where the image is smaller."""
    th, tw = size
    h, w = img.shape[:2]
    if th > h or tw > w:
        top, left = max(th - h, 0) // 2, max(tw - w, 0) // 2
        bottom, right = (max(th - h, 0) + 1) // 2, (max(tw - w, 0) + 1) // 2
        img = np.pad(img, ((top, bottom), (left, right), (0, 0)), constant_values=fill)
        h, w = img.shape[:2]
    top, left = round((h - th) / 2.0), round((w - tw) / 2.0)
    return img[top:top + th, left:left + tw]


def _as_rgb_array(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an image array must be (H, W, 3) uint8 RGB, got shape {image.shape} {image.dtype}")
    return image


def _resized(image, cfg: dict) -> np.ndarray:
    """The resize step -> (h, w, 3) uint8. PIL images go through Pillow's own resize (the fast path, what
    torchvision calls); arrays through `resize` above (the reference, bit-equal to it)."""
    if isinstance(image, np.ndarray):
        arr = _as_rgb_array(image)
        return resize(arr, _target_size(*arr.shape[:2], cfg), cfg["interpolation"])
    if not hasattr(image, "convert"):
        raise ValueError(f"expected a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")
    from PIL import Image

    rgb = image.convert("RGB")
    h, w = _target_size(rgb.height, rgb.width, cfg)
    if (w, h) != rgb.size:
        rgb = rgb.resize((w, h), getattr(Image.Resampling, cfg["interpolation"].upper()))
    return np.asarray(rgb)


def preprocess_image(image, cfg: dict) -> np.ndarray:
    """One PIL image (or (H, W, 3) uint8 array) -> (3, S_h, S_w) float32, as preprocess.json says."""
    arr = _resized(image, cfg)
    fill = cfg.get("fill_color", 0) if cfg["resize_mode"] == "longest" else 0  # CenterCrop pads with 0
    arr = _crop_or_pad(arr, tuple(cfg["size"]), fill)
    x = arr.astype(np.float32) / np.float32(255.0)  # (H, W, 3) in [0, 1]
    mean, std = np.asarray(cfg["mean"], np.float32), np.asarray(cfg["std"], np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))  # (3, H, W)


def preprocess_batch(images, cfg: dict) -> np.ndarray:
    """PIL images or uint8 arrays -> (N, 3, S_h, S_w) float32."""
    if not len(images):
        h, w = cfg["size"]
        return np.zeros((0, 3, h, w), np.float32)
    return np.stack([preprocess_image(im, cfg) for im in images])


def preprocess_config(preprocess_cfg: dict) -> dict:
    """preprocess.json contents from an open_clip `model.visual.preprocess_cfg` dict."""
    size = preprocess_cfg.get("size", 224)
    size = [int(size), int(size)] if isinstance(size, (int, float)) else [int(s) for s in size]
    interpolation = preprocess_cfg.get("interpolation") or "bicubic"
    if interpolation not in FILTERS:  # open_clip's "random" means bicubic at evaluation
        interpolation = "bicubic"
    mode = preprocess_cfg.get("resize_mode") or "shortest"
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES}; mmft cannot reproduce it")
    return {"size": size, "resize_mode": mode, "interpolation": interpolation,
            "crop": "center" if mode != "squash" else "none",
            "mean": [float(v) for v in preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))],
            "std": [float(v) for v in preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))],
            "fill_color": int(preprocess_cfg.get("fill_color", 0)), "convert": "RGB", "layout": "NCHW"}


def read_preprocess(bundle_dir: str | Path) -> dict:
    import json

    return json.loads((Path(bundle_dir) / PREPROCESS_FILE).read_text())
