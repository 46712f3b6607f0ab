"""Validation during training: retrieval recall on a held-out split, in the keys the trainer logs.

The ranks come from mmft.evaluation.metrics (the same exact first-relevant rank the evaluation
reports), so validation and evaluation cannot disagree on what a hit is; only the key names
(`t2i_r1`, `mean`, ... which train.val_metric picks from) are validation's own. The FAISS-based
evaluation with paired confidence intervals lives in mmft.evaluation.core.

Each validation also reports the noise of its own numbers: `<metric>_ci95`, a 95% bootstrap interval
over the validation queries (captions and images resampled, each direction on its own), and the query
counts. On the demo's 45-image split (103 captions) the head-only run's `mean` of 30.1 has the interval
24.1-36.6, so steps a few points apart are not told apart; the best step's interval goes to
summary.json with its metrics.

Independent intervals overstate the noise of a difference between two steps scored on the same
queries: every validation after the run's first also logs `gain` (its `mean` minus the first
validation's) with `gain_ci95`, a paired bootstrap interval (both steps' hit vectors resampled with
the same queries). The best step's gain over the start is the figure that says whether training
moved anything validation can see.

At the end of a run, `selection_noise` replays the choice of the best step on resamples of the
validation queries (every validation's hits are checkpointed): the share of draws the kept step wins,
the other steps that win some, and how far behind the draw's best the kept step falls.
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
    return recall_and_hits(img, txt, owner, groups, ks)[0]


def recall_and_hits(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, groups=None,
                    ks=(1, 5)) -> tuple[dict, dict]:
    """(recall_from_embeddings' metrics, per-query hits {direction: (|ks|, Q) uint8 tensor}: whether each
    query hit within each k)."""
    img_labels = np.arange(img.shape[0]) if groups is None else groups.numpy().astype(np.int64)  # (N,)
    cap_labels = img_labels[owner.numpy()]  # (M,)
    img_np, txt_np = img.float().numpy(), txt.float().numpy()
    ranks = {"t2i": M.exact_first_ranks(txt_np, img_np, cap_labels, img_labels),  # (M,) 1-based, 0 = none
             "i2t": M.exact_first_ranks(img_np, txt_np, img_labels, cap_labels)}  # (N,)
    hits = {d: np.stack([(r >= 1) & (r <= k) for k in ks]) for d, r in ranks.items()}  # (|ks|, Q) bool
    out = {}
    for j, k in enumerate(ks):
        for d, h in hits.items():
            out[f"{d}_r{k}"] = 100.0 * float(h[j].mean())
        out[f"mean_r{k}"] = (out[f"t2i_r{k}"] + out[f"i2t_r{k}"]) / 2
    out["mean"] = sum(out[f"mean_r{k}"] for k in ks) / len(ks)  # steadier than R@1 on small val splits
    out.update(_intervals(hits, ks))
    # uint8 tensors: every validation's are checkpointed for selection_noise (weights_only loads them)
    return out, {d: torch.from_numpy(h.astype(np.uint8)) for d, h in hits.items()}


def _same_queries(hits: dict, other: dict) -> bool:
    """Whether two validations' hits score the same query sets (else the split changed: no pairing)."""
    return set(hits) == set(other) and all(np.shape(hits[d]) == np.shape(other[d]) for d in hits)


def paired_gain(hits: dict, first: dict, n: int = 500) -> dict:
    """`mean` of `hits` minus `mean` of `first` (points), with a paired 95% bootstrap interval: each draw
    resamples one direction's queries once for both steps (hits from `recall_and_hits`)."""
    if not _same_queries(hits, first):
        return {}  # the validation split changed (another config): nothing to pair with
    diffs = []
    for i, d in enumerate(sorted(hits)):
        both = np.concatenate([np.asarray(hits[d], np.float64), np.asarray(first[d], np.float64)])
        draws = M.bootstrap_means(both, n, seed=i)  # (n, 2|ks|): this step's ks, then the first's
        k = len(hits[d])
        diffs.append(draws[:, :k].mean(1) - draws[:, k:].mean(1))  # (n,)
    gain = 50.0 * (diffs[0] + diffs[1])  # (n,) points: the directions averaged, as in `mean`
    point = 50.0 * sum(np.asarray(hits[d], np.float64).mean() - np.asarray(first[d], np.float64).mean()
                       for d in hits)
    return {"gain": float(point), "gain_ci95": list(M.percentile_ci(gain))}


def _metric_draws(means: dict, metric: str, ks) -> np.ndarray | None:
    """`metric` (a key recall_and_hits logs) from per-direction recall draws {direction: (n, S, |ks|)
    points}: (n, S); None for a metric that is not a function of the hits."""
    for j, k in enumerate(ks):
        if metric == f"mean_r{k}":
            return (means["t2i"][..., j] + means["i2t"][..., j]) / 2
        for d in means:
            if metric == f"{d}_r{k}":
                return means[d][..., j]
    if metric == "mean":
        return (means["t2i"].mean(-1) + means["i2t"].mean(-1)) / 2
    return None


def selection_noise(history: list[dict], metric: str, chosen: int, ks=(1, 5), n: int = 1000) -> dict:
    """How sure the checkpoint choice is. `history`: every validation of the run, {"step", "hits"} in
    order; `chosen`: the step the trainer kept (the first best by `metric`).

    Each of n draws resamples the validation queries (the same queries for every step, each direction
    on its own) and picks that draw's best step as the trainer would: `chosen_share` is the share of
    draws the chosen step wins, `contenders` every step that wins at least 5% of them, and `regret`
    how far the chosen step falls behind each draw's best, in points (mean and 95th percentile). With
    the last validation elsewhere, `over_last` is the paired gain of the chosen step over it. {} when
    the hits cannot be compared (a changed split) or the metric is not a function of them.
    """
    steps = [h["step"] for h in history]
    if chosen not in steps or len(steps) < 2:
        return {}
    first = history[0]["hits"]
    if not all(_same_queries(h["hits"], first) for h in history) or set(first) != {"t2i", "i2t"} \
            or np.shape(first["t2i"])[0] != len(ks):
        return {}
    means = {}
    for i, d in enumerate(sorted(first)):
        rows = np.concatenate([np.asarray(h["hits"][d], np.float64) for h in history])  # (S*|ks|, Q)
        means[d] = 100.0 * M.bootstrap_means(rows, n, seed=i).reshape(n, len(steps), len(ks))
    scores = _metric_draws(means, metric, ks)  # (n, S)
    if scores is None:
        return {}
    wins = np.bincount(np.argmax(scores, axis=1), minlength=len(steps)) / n  # argmax: the first best
    at = steps.index(chosen)
    regret = scores.max(axis=1) - scores[:, at]  # (n,) points
    out = {"metric": metric, "chosen_step": chosen, "chosen_share": float(wins[at]),
           "contenders": {str(s): float(w) for s, w in zip(steps, wins) if w >= 0.05},
           "regret": float(regret.mean()), "regret_p95": float(np.percentile(regret, 95)),
           "validations": len(steps), "queries": {d: int(np.shape(first[d])[-1]) for d in first}, "draws": n}
    if steps[-1] != chosen and metric == "mean":
        gain = paired_gain(history[at]["hits"], history[-1]["hits"])
        out["over_last"] = {"step": steps[-1], **gain}
    return out


def _intervals(hits: dict, ks, n: int = 500) -> dict:
    """95% bootstrap intervals (points) of mean_r{k} and mean from hits {direction: (|ks|, Q) bool}: the
    two directions' queries are drawn apart (captions and images are different query sets), the metric
    is their average per draw."""
    draws = {d: M.bootstrap_means(h, n, seed=i) for i, (d, h) in enumerate(sorted(hits.items()))}  # (n, |ks|)
    both = 50.0 * (draws["t2i"] + draws["i2t"])  # (n, |ks|) points
    out = {f"mean_r{k}_ci95": list(M.percentile_ci(both[:, j])) for j, k in enumerate(ks)}
    out["mean_ci95"] = list(M.percentile_ci(both.mean(1)))
    out["queries"] = {d: int(h.shape[1]) for d, h in hits.items()}
    return out


def retrieval_recall(model, batches: Iterable[dict], tokenizer, device) -> dict:
    """Recall@1/5 text->image, image->text and their means on eval batches {"image", "captions"}."""
    return recall_from_embeddings(*embed_eval_batches(model, batches, tokenizer, device))


def validation_scores(model, batches: Iterable[dict], tokenizer, device) -> tuple[dict, dict]:
    """(retrieval_recall's metrics, per-query hits): what the trainer's validation logs and pairs."""
    return recall_and_hits(*embed_eval_batches(model, batches, tokenizer, device))
