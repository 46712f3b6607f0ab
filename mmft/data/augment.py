"""Training augmentation for the image tower, with a fast batched path beside the plain one.

    tf = make_train_transform(preprocess_val, cfg.data)   # size, mean, std from the preprocess (or the model)
    x = tf(pil_image)                                     # (3, S, S) float, normalised: the reference path
    xb = tf.collate([tf.pixels(im) for im in images])     # (B, 3, S, S): what the data workers do
    tf.normalize(xb.to(device))                           # with uint8=True (data.uint8_images): on the device

Semantics follow open_clip's training preprocess (RandomResizedCrop with `augment_scale`, bicubic),
plus an optional horizontal flip and colour jitter. Random draws use torch's global RNG, which the
training stream swaps for a stream of its own seeded from (seed, epoch, rank, worker).

With `uint8=True` (data.uint8_images) the workers ship the crops as uint8 and the trainer converts and
normalises them on its device (`normalize`): a quarter of the bytes through the workers' shared memory,
pinning and the host-to-device copy, and no float pass over the batch on the data side.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of the random crop, as in torchvision and open_clip
_TRIES = 10


def _crop_box(width: int, height: int, scale: tuple[float, float], draws: list[list[float]]):
    """torchvision's RandomResizedCrop.get_params from pre-drawn uniforms: -> (top, left, h, w) px."""
    area = width * height
    lo, hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    for u_area, u_ratio, u_top, u_left in draws[:_TRIES]:
        target = area * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(lo + u_ratio * (hi - lo))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    ratio = width / height  # fallback: the largest central crop within the ratio range
    w, h = width, height
    if ratio < _RATIO[0]:
        h = round(w / _RATIO[0])
    elif ratio > _RATIO[1]:
        w = round(h * _RATIO[1])
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """PIL RGB image -> augmented, normalised (3, S, S) float tensor."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: Sequence[float] = (0.9, 1.0), color_jitter: float = 0.0, hflip: bool = False,
                 uint8: bool = False):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"augment_scale {list(scale)} must satisfy 0 < min <= max <= 1, e.g. [0.9, 1.0]")
        self.image_size = int(image_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.hflip = bool(hflip)
        self.color_jitter = float(color_jitter)
        self.uint8 = bool(uint8)
        self._mean = torch.tensor([float(m) * 255 for m in mean]).view(3, 1, 1)
        self._inv_std = torch.tensor([1 / (float(s) * 255) for s in std]).view(3, 1, 1)
        self._jitter = None
        if self.color_jitter > 0:
            from torchvision.transforms import ColorJitter

            c = self.color_jitter
            self._jitter = ColorJitter(brightness=c, contrast=c, saturation=c)

    @property
    def draft_size(self) -> int:
        """Smallest source side (px) that still gives the narrowest crop full resolution (JPEG draft)."""
        return math.ceil(self.image_size / math.sqrt(self.scale[0] * _RATIO[0]))

    def augment(self, image):
        """Random resized crop (one PIL resize with a box), then flip and jitter."""
        from PIL import Image

        draws = torch.rand(_TRIES + 1, 4).tolist()  # one RNG call per image: per-call overhead dominates here
        top, left, h, w = _crop_box(image.width, image.height, self.scale, draws)
        size = (self.image_size, self.image_size)
        image = image.resize(size, Image.BICUBIC, box=(left, top, left + w, top + h))
        if self.hflip and draws[-1][0] < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self._jitter is not None:
            image = self._jitter(image)
        return image

    def pixels(self, image) -> np.ndarray:
        """Augmented image as (S, S, 3) uint8: the per-sample half of the fast path."""
        return np.asarray(self.augment(image))

    def collate(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """(S, S, 3) uint8 arrays -> (B, 3, S, S) normalised float, one pass per step over the batch
        (with uint8=True: (B, 3, S, S) uint8, for `normalize` on the device)."""
        u8 = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8 view
        out = _empty_float(u8.shape, torch.uint8 if self.uint8 else torch.float32)
        out.copy_(u8)
        return out if self.uint8 else out.sub_(self._mean).mul_(self._inv_std)  # (B, 3, S, S)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, S, S) on any device -> normalised float, as collate does without uint8."""
        mean, inv_std = self._mean.to(images.device), self._inv_std.to(images.device)  # (3, 1, 1)
        return (images.float() - mean) * inv_std

    def __call__(self, image) -> torch.Tensor:
        """The reference path: one image to (3, S, S) float."""
        x = torch.from_numpy(np.array(self.augment(image))).permute(2, 0, 1).float()  # (3, S, S)
        return (x - self._mean) * self._inv_std

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.image_size}, scale={self.scale}, "
                f"color_jitter={self.color_jitter}, hflip={self.hflip})")


def _empty_float(shape, dtype=torch.float32) -> torch.Tensor:
    """A tensor, in shared memory inside a DataLoader worker so the batch is not copied again."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float], data_cfg) -> TrainTransform:
    """The training transform for a model input of `image_size` px, honouring data_cfg.augment_*."""
    return TrainTransform(image_size, mean, std, scale=data_cfg.augment_scale,
                          color_jitter=data_cfg.augment_color_jitter, hflip=data_cfg.augment_hflip,
                          uint8=getattr(data_cfg, "uint8_images", False))


def transform_params(preprocess: Callable) -> tuple[int, tuple, tuple]:
    """(image_size, mean, std) read from a torchvision/open_clip Compose (its crop or resize, and
    Normalize)."""
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", [preprocess])
    size = mean = std = None
    for t in steps:
        if isinstance(t, T.Normalize):
            mean, std = tuple(t.mean), tuple(t.std)
        elif isinstance(t, (T.CenterCrop, T.RandomResizedCrop)) or (isinstance(t, T.Resize) and size is None):
            s = t.size
            size = s if isinstance(s, int) else min(s)
    if size is None or mean is None:
        raise ValueError(f"cannot read the image size and Normalize from {preprocess!r}; "
                         "call train_transform(image_size, mean, std, data_cfg) instead")
    return size, mean, std


def make_train_transform(source: Callable | int, data_cfg, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None) -> TrainTransform:
    """A TrainTransform for a model: `source` is its preprocess (open_clip's preprocess_val works),
    an open_clip model (its preprocess_cfg), or an image size in px (then mean= and std= too)."""
    if isinstance(source, int):
        if mean is None or std is None:
            raise ValueError("make_train_transform(image_size, ...) needs mean= and std= as well")
        return train_transform(source, mean, std, data_cfg)
    if isinstance(source, torch.nn.Module):
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(source)
        size = cfg.get("size", 224)
        size = size if isinstance(size, int) else min(size)
        return train_transform(size, mean or cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
                               std or cfg.get("std", open_clip.OPENAI_DATASET_STD), data_cfg)
    size, m, s = transform_params(source)
    return train_transform(size, mean or m, std or s, data_cfg)


def draft_size(transform: Callable) -> int | None:
    """The JPEG draft size (px) a transform tolerates without losing resolution; None = decode in full."""
    from torchvision import transforms as T

    if hasattr(transform, "draft_size"):
        return transform.draft_size
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, T.RandomResizedCrop):
            return math.ceil(min(_sizes(t.size)) / math.sqrt(t.scale[0] * min(t.ratio[0], 1 / t.ratio[1])))
        if isinstance(t, (T.Resize, T.CenterCrop)):
            return min(_sizes(t.size))
    return None


def _sizes(size) -> tuple[int, ...]:
    return (size,) if isinstance(size, int) else tuple(size)
