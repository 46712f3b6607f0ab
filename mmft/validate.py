"""Validation during training: retrieval recall on a held-out split, computed plainly (full matrix).

Validation splits are small (hundreds of images), so a full similarity matrix is fine here; the
FAISS-based evaluation with confidence intervals lives in mmft.evaluation.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def embed_eval_batches(model, batches: Iterable[dict], tokenizer, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> image embeddings (N, D), caption embeddings (M, D), caption -> image index (M,)."""
    was_training = model.training
    model.eval()
    images, texts, owner = [], [], []
    n = 0
    for batch in batches:
        img = batch["image"].to(device)  # (B, 3, S, S)
        images.append(F.normalize(model.encode_image(img).float(), dim=-1).cpu())
        caps = [c for per_image in batch["captions"] for c in per_image]
        owner += [n + i for i, per_image in enumerate(batch["captions"]) for _ in per_image]
        n += img.shape[0]
        if caps:
            texts.append(F.normalize(model.encode_text(tokenizer(caps).to(device)).float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(images), torch.cat(texts), torch.tensor(owner)


def recall_from_embeddings(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, ks=(1, 5)) -> dict:
    """Recall@k both ways with several captions per image (full (M, N) similarity matrix)."""
    sim = txt @ img.T  # (M, N)
    out = {}
    # text -> image: rank of the caption's own image
    own = sim.gather(1, owner[:, None])  # (M, 1)
    t2i_rank = (sim > own).sum(1)  # (M,) number of images scoring above the right one
    # image -> text: best rank among the image's captions
    sim_t = sim.T  # (N, M)
    best_own = torch.full((img.shape[0],), -float("inf")).scatter_reduce(0, owner, own[:, 0], reduce="amax")
    i2t_rank = (sim_t > best_own[:, None]).sum(1)  # (N,)
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
        out[f"i2t_r{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        out[f"mean_r{k}"] = (out[f"t2i_r{k}"] + out[f"i2t_r{k}"]) / 2
    out["mean"] = sum(out[f"mean_r{k}"] for k in ks) / len(ks)  # steadier than R@1 on small val splits
    return out


def retrieval_recall(model, batches: Iterable[dict], tokenizer, device) -> dict:
    """Recall@1/5 text->image, image->text and their means on eval batches {"image", "captions"}."""
    return recall_from_embeddings(*embed_eval_batches(model, batches, tokenizer, device))
