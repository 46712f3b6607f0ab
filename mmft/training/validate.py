"""Validation during training: retrieval recall on a held-out split, computed plainly (full matrix).

Validation splits are small (hundreds of images), so a full similarity matrix is fine here; the
FAISS-based evaluation with confidence intervals lives in mmft.evaluation.core.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def embed_eval_batches(model, batches: Iterable[dict], tokenizer, device):
    """-> image embeddings (N, D), caption embeddings (M, D), caption -> image index (M,), group codes (N,) or None."""
    was_training = model.training
    model.eval()
    images, texts, owner, groups = [], [], [], []
    n = 0
    for batch in batches:
        groups += list(batch.get("group") or [None] * batch["image"].shape[0])
        img = batch["image"].to(device)  # (B, 3, S, S)
        images.append(F.normalize(model.encode_image(img).float(), dim=-1).cpu())
        caps = [c for per_image in batch["captions"] for c in per_image]
        owner += [n + i for i, per_image in enumerate(batch["captions"]) for _ in per_image]
        n += img.shape[0]
        if caps:
            texts.append(F.normalize(model.encode_text(tokenizer(caps).to(device)).float(), dim=-1).cpu())
    model.train(was_training)
    codes = None
    if all(g is not None for g in groups):  # class-level relevance: only equality matters
        table = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        codes = torch.tensor([table[g] for g in groups])
    return torch.cat(images), torch.cat(texts), torch.tensor(owner), codes


def recall_from_embeddings(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, groups=None, ks=(1, 5)) -> dict:
    """Recall@k both ways with several captions per image (full (M, N) similarity matrix).

    Instance relevance: a caption's own image, an image's own captions. With `groups` (N,) the relevance
    is class-level: any image (caption) of the same group counts.
    """
    sim = txt @ img.T  # (M, N)
    cap_group = owner if groups is None else groups[owner]  # (M,)
    img_group = torch.arange(img.shape[0]) if groups is None else groups  # (N,)
    relevant = cap_group[:, None] == img_group[None, :]  # (M, N)
    best = sim.masked_fill(~relevant, -float("inf"))
    # text -> image: images scoring above the best relevant image
    t2i_rank = (sim > best.max(1, keepdim=True).values).sum(1)  # (M,)
    # image -> text: captions scoring above the best relevant caption
    i2t_rank = (sim.T > best.T.max(1, keepdim=True).values).sum(1)  # (N,)
    out = {}
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
        out[f"i2t_r{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        out[f"mean_r{k}"] = (out[f"t2i_r{k}"] + out[f"i2t_r{k}"]) / 2
    out["mean"] = sum(out[f"mean_r{k}"] for k in ks) / len(ks)  # steadier than R@1 on small val splits
    return out


def retrieval_recall(model, batches: Iterable[dict], tokenizer, device) -> dict:
    """Recall@1/5 text->image, image->text and their means on eval batches {"image", "captions"}."""
    return recall_from_embeddings(*embed_eval_batches(model, batches, tokenizer, device))
