"""Gradient caching: the gradients of a large contrastive batch with the activation memory of a small one.

A contrastive loss couples every sample with every other, so a batch cannot simply be split into
accumulated pieces. But the loss depends on the model only through the embeddings (B x D floats), so
its gradient factors at them (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"):

1. embed the batch in micro-batches of train.micro_batch_size without autograd (no activations kept);
2. take the loss over the whole batch (and its extra negatives) on detached copies of the embeddings
   and backpropagate it to them: the cached gradient dL/de per row, plus dL/d(logit scale, bias);
3. re-run each micro-batch with autograd and backpropagate sum(e * dL/de), which puts the micro-batch's
   share of the full-batch gradient into the parameters.

The sum of step 3 over the micro-batches is exactly the full-batch gradient, for about one extra
forward. Dropout replays: each micro-batch's RNG state is saved before its first forward and restored
before its second, so both passes draw the same masks (augmentation happens in the data workers, before
the step, so it is the same in both by construction). What does NOT carry over: BatchNorm in train mode
normalises by micro-batch statistics (and updates its running statistics twice); frozen BatchNorm stays
in eval mode (mmft.model.lora.train_mode), which keeps the gradients equal to the plain step.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from mmft.training.forward import as_float


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def micro_slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` rows covering range(n)."""
    if size <= 0:
        raise ValueError(f"train.micro_batch_size must be > 0 with train.grad_cache, not {size}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _take(inputs: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in inputs.items()}  # sample rows; extras stay (B, K, ...) per sample


def _embed_without_grad(model, inputs: dict, slices: list[slice], autocast, device) -> tuple[list, list]:
    """Pass 1: per micro-batch its RNG state before the forward and its detached float outputs."""
    states, outs = [], []
    with torch.no_grad():
        for rows in slices:
            states.append(_rng_state(device))
            with autocast():
                out = model(**_take(inputs, rows))
            outs.append({k: v.detach() for k, v in as_float(out).items()})
    return states, outs


def _joined_leaves(outs: list[dict]) -> dict:
    """The whole batch's outputs as leaves that collect gradients: *_features rows concatenated in
    micro-batch order, the rest (logit scale, bias: equal in every micro-batch) from the first."""
    leaves = {}
    for k, v in outs[0].items():
        t = torch.cat([o[k] for o in outs]) if k.endswith("_features") else v.clone()  # (N, D) or ()
        leaves[k] = t.requires_grad_(True)
    return leaves


def _row_ranges(outs: list[dict]) -> list[dict]:
    """Per micro-batch, per *_features key: its rows in the joined tensor."""
    starts: dict[str, int] = {}
    ranges = []
    for o in outs:
        r = {}
        for k, v in o.items():
            if k.endswith("_features"):
                s = starts.get(k, 0)
                r[k], starts[k] = slice(s, s + v.shape[0]), s + v.shape[0]
        ranges.append(r)
    return ranges


def _surrogate(out: dict, grads: dict, rows: dict, n_micro: int) -> torch.Tensor:
    """A scalar whose gradient is this micro-batch's share of the cached gradients: sum(e * dL/de) over
    its rows, plus 1/n_micro of the shared outputs' gradients (every micro-batch computes them)."""
    total = torch.zeros((), device=next(iter(grads.values())).device)
    for k, g in grads.items():
        if g is None:
            continue
        v = out[k].float()
        total = total + ((v * g[rows[k]]).sum() if k in rows else (v * g).sum() / n_micro)
    return total


def grad_cache_backward(model, loss_fn: Callable, inputs: dict, groups: dict, micro_batch_size: int, *,
                        autocast, scale_loss: Callable,
                        sync: Callable[[bool], contextlib.AbstractContextManager],
                        device: torch.device) -> torch.Tensor:
    """Accumulate into .grad the gradient of scale_loss(loss_fn(model(**inputs), **groups)) over the whole
    batch, running the model on `micro_batch_size` samples at a time (with their extras); the loss.

    sync(last) is the context of one micro-batch's backward: DDP's no_sync() except for the last one
    when gradients should be all-reduced.
    """
    slices = micro_slices(inputs["images"].shape[0], micro_batch_size)
    states, outs = _embed_without_grad(model, inputs, slices, autocast, device)
    leaves = _joined_leaves(outs)
    loss = loss_fn(leaves, **groups)
    scale_loss(loss).backward()  # the gradient w.r.t. the embeddings, over the whole batch
    grads = {k: v.grad for k, v in leaves.items()}
    ranges = _row_ranges(outs)
    after = _rng_state(device)
    for i, rows in enumerate(slices):
        _set_rng_state(device, states[i])  # the same dropout masks as in the first pass
        with sync(i == len(slices) - 1):
            with autocast():
                out = model(**_take(inputs, rows))
            _surrogate(out, grads, ranges[i], len(slices)).backward()
    _set_rng_state(device, after)
    return loss.detach()
