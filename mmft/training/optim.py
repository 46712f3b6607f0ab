"""Optimization pieces of the trainer: AdamW parameter groups, the LR schedule, autocast, one step.

The temperature and norms get no weight decay, fully trained heads may get their own rate
(train.head_lr), the schedule is a linear warmup into a cosine decay, and every step clamps the
temperature the way CLIP does.
"""
from __future__ import annotations

import math

import torch

from mmft.model.lora import lora_state


def param_groups(model: torch.nn.Module, cfg) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and the temperature; head_lr for fully trained ones."""
    state = lora_state(model)
    full = set(state.full) if state is not None else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "logit_scale" in name or "logit_bias" in name or "norm" in name.lower()
        is_head = name in full
        groups.setdefault((no_decay, is_head), []).append(p)
    out = []
    for (no_decay, is_head), params in sorted(groups.items()):
        lr = cfg.head_lr if (is_head and cfg.head_lr > 0) else cfg.lr
        out.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    return out


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warmup then cosine decay to min_ratio of the peak."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return fn


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"train.precision must be fp32, bf16 or fp16, not '{precision}'")
    return torch.autocast(device.type, dtype=dtype)


def optimizer_step(model, optimizer, scheduler, scaler, grad_clip: float) -> None:
    """Unscale, clip, step, schedule; then clamp the temperature as CLIP does (logits stay <= 100)."""
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
