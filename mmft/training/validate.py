"""Validation during training: retrieval recall on a held-out split, in the keys the trainer logs.

The ranks come from mmft.evaluation.metrics (the same exact first-relevant rank the evaluation
reports), so validation and evaluation cannot disagree on what a hit is; only the key names
(`t2i_r1`, `mean`, ... which train.val_metric picks from) are validation's own. The FAISS-based
evaluation with confidence intervals lives in mmft.evaluation.core.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from mmft.evaluation import metrics as M


@torch.no_grad()
def embed_eval_batches(model, batches: Iterable[dict], tokenizer, device):
    """-> image embeddings (N, D), caption embeddings (M, D), caption -> image row (M,), group codes (N,)
    or None."""
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
        codes = torch.from_numpy(M.group_codes(groups)[1])
    return torch.cat(images), torch.cat(texts), torch.tensor(owner), codes


def recall_from_embeddings(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, groups=None,
                           ks=(1, 5)) -> dict:
    """Recall@k in points both ways with several captions per image: image (N, D), caption (M, D) embeddings.

    Instance relevance: a caption's own image, an image's own captions. With `groups` (N,) the relevance
    is class-level: any image (caption) of the same group counts. An image without captions is a miss.
    """
    img_labels = np.arange(img.shape[0]) if groups is None else groups.numpy().astype(np.int64)  # (N,)
    cap_labels = img_labels[owner.numpy()]  # (M,)
    img_np, txt_np = img.float().numpy(), txt.float().numpy()
    ranks = {"t2i": M.exact_first_ranks(txt_np, img_np, cap_labels, img_labels),  # (M,) 1-based, 0 = none
             "i2t": M.exact_first_ranks(img_np, txt_np, img_labels, cap_labels)}  # (N,)
    out = {}
    for k in ks:
        for d, r in ranks.items():
            out[f"{d}_r{k}"] = 100.0 * float(((r >= 1) & (r <= k)).mean())
        out[f"mean_r{k}"] = (out[f"t2i_r{k}"] + out[f"i2t_r{k}"]) / 2
    out["mean"] = sum(out[f"mean_r{k}"] for k in ks) / len(ks)  # steadier than R@1 on small val splits
    return out


def retrieval_recall(model, batches: Iterable[dict], tokenizer, device) -> dict:
    """Recall@1/5 text->image, image->text and their means on eval batches {"image", "captions"}."""
    return recall_from_embeddings(*embed_eval_batches(model, batches, tokenizer, device))
