"""Head-only training on cached tower features (LiT-style alignment with both towers frozen).

When neither tower is adapted, their outputs never change, so each image and caption goes through
its tower once; training then runs the projection heads alone on the cached features, which turns
minutes per epoch into milliseconds. Images are cached without augmentation.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class _Swap:
    """Temporarily replace attributes (the projection heads) with nn.Identity."""

    def __init__(self, pairs: list[tuple[nn.Module, str]]):
        self.pairs = pairs
        self.saved: list = []

    def __enter__(self):
        for owner, attr in self.pairs:
            self.saved.append(getattr(owner, attr))
            setattr(owner, attr, nn.Identity())

    def __exit__(self, *exc):
        for (owner, attr), mod in zip(self.pairs, self.saved):
            setattr(owner, attr, mod)


def head_modules(model: nn.Module) -> tuple[nn.Module, nn.Module, list[tuple[nn.Module, str]]]:
    """(image head, text head, swap list) for timm image towers and Hugging Face text towers."""
    visual, text = model.visual, getattr(model, "text", None)
    if not (hasattr(visual, "trunk") and hasattr(visual, "head")
            and text is not None and hasattr(text, "proj")):
        raise ValueError("train.cache_features supports timm image towers with Hugging Face text towers "
                         "(such as mmft-mini); set train.cache_features=false for this model")
    return visual.head, text.proj, [(visual, "head"), (text, "proj")]


@torch.no_grad()
def trunk_features(model: nn.Module, batches: Iterable[dict], tokenizer, device) -> dict:
    """Pre-projection features of every image (N, Fi) and every caption (M, Ft), caption owners (M,)."""
    _, _, swaps = head_modules(model)
    was_training = model.training
    model.eval()
    img, txt, owner, groups, n = [], [], [], [], 0
    with _Swap(swaps):
        for batch in batches:
            x = batch["image"].to(device)  # (B, 3, S, S)
            img.append(model.encode_image(x).float().cpu())
            caps = [c for per in batch["captions"] for c in per]
            owner += [n + i for i, per in enumerate(batch["captions"]) for _ in per]
            txt.append(model.encode_text(tokenizer(caps).to(device)).float().cpu())
            groups += list(batch.get("group") or [None] * x.shape[0])
            n += x.shape[0]
    model.train(was_training)
    return {"image": torch.cat(img), "text": torch.cat(txt), "owner": torch.tensor(owner), "groups": groups}


class CachedPairs:
    """Re-iterable batches of cached (image feature, one random caption feature) pairs, reshuffled per
    epoch."""

    def __init__(self, feats: dict, batch_size: int, seed: int):
        self.feats, self.batch_size, self.seed, self.epoch = feats, batch_size, seed, 0
        self.caption_lists = [[] for _ in range(feats["image"].shape[0])]
        for j, i in enumerate(feats["owner"].tolist()):
            self.caption_lists[i].append(j)
        self.group = None
        if any(g is not None for g in feats["groups"]):  # only equality matters to the loss
            codes = {g: i for i, g in enumerate(dict.fromkeys(feats["groups"]))}
            self.group = torch.tensor([codes[g] for g in feats["groups"]])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.feats["image"].shape[0] // self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(self.feats["image"].shape[0], generator=g)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]  # (B,)
            pick = [self.caption_lists[i][int(torch.randint(len(self.caption_lists[i]), (1,), generator=g))]
                    for i in idx.tolist()]
            batch = {"image": self.feats["image"][idx], "text": self.feats["text"][pick]}  # (B, Fi), (B, Ft)
            if self.group is not None:
                batch["group"] = self.group[idx]
            yield batch


class HeadOnly(nn.Module):
    """Forward of the projection heads on cached features; returns the model's output dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.image_head, self.text_head, _ = head_modules(model)

    def forward(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> dict:
        out = {
            "image_features": F.normalize(self.image_head(image_feat), dim=-1),  # (B, D)
            "text_features": F.normalize(self.text_head(text_feat), dim=-1),  # (B, D)
            "logit_scale": self.model.logit_scale.exp(),
        }
        if getattr(self.model, "logit_bias", None) is not None:
            out["logit_bias"] = self.model.logit_bias
        return out


def cached_head_data(model: nn.Module, cfg, source, tokenizer, device, preprocess_val) -> CachedPairs:
    """Embed the training set once through the frozen trunks; `source` = eval-style batches or None
    (shards)."""
    if cfg.lora.image.enabled or cfg.lora.text.enabled:
        raise ValueError("train.cache_features needs both towers frozen: set lora.image.enabled=false and "
                         "lora.text.enabled=false")
    if source is None:
        from mmft.data.stream import eval_loader

        source = eval_loader(cfg.data.train, cfg.data, preprocess_val)
    return CachedPairs(trunk_features(model, source, tokenizer, device), cfg.data.batch_size, cfg.train.seed)
