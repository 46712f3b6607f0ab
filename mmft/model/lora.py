"""LoRA on both towers: per-tower targets, freezing, the adapter state, merging and the scale knob.

`apply_lora` swaps the targeted layers of each tower body for the LoRA layers of
`mmft.model.lora_layers` (a fresh adapter changes nothing), freezes the rest except `lora.unfreeze`,
and records a `LoraState` on the model. `set_lora_scale` (or `with lora_scale(model, s):`) scales the
whole fine-tuning delta (LoRA and the fully trained parameters) for the WiSE-FT style sweep: 0 is the
frozen base, 1 the tuned model.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mmft.config import LoraConfig, LoraTowerConfig
from mmft.model.lora_layers import (
    LORA_LAYERS,
    LoRAConv2d,
    LoRALinear,
    LoRAMultiheadAttention,
    is_pointwise,
)

# Module-name suffixes adapted by default, by tower body type.
DEFAULT_TARGETS = {
    "open_clip_transformer": ["in_proj", "out_proj", "c_fc", "c_proj"],
    "timm_vit": ["qkv", "proj", "fc1", "fc2"],
    "hf_transformer": ["query", "key", "value", "attention.output.dense"],
    "cnn": ["pointwise"],  # 1x1 ungrouped convolutions (the later half of them unless lora.*.layers is set)
}


def tower_bodies(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """{"image": (prefix, body), "text": (prefix, body)}: the pretrained trunks LoRA adapts.

    Projections and heads sit outside the bodies, so LoRA targets such as "proj" never hit them.
    """
    visual = model.visual
    if hasattr(visual, "trunk"):  # timm tower
        image = ("visual.trunk", visual.trunk)
    elif hasattr(visual, "transformer"):  # open_clip ViT
        image = ("visual.transformer", visual.transformer)
    else:  # ModifiedResNet and other CNNs
        image = ("visual", visual)
    if hasattr(model, "text"):  # CustomTextCLIP
        text_mod = model.text
        has_transformer = hasattr(text_mod, "transformer")
        text = ("text.transformer", text_mod.transformer) if has_transformer else ("text", text_mod)
    else:  # CLIP keeps its text transformer at top level
        text = ("transformer", model.transformer)
    return {"image": image, "text": text}


def body_kind(body: nn.Module) -> str:
    mods = list(body.modules())
    if any(isinstance(m, nn.MultiheadAttention) for m in mods):
        return "open_clip_transformer"
    if type(body).__module__.startswith("transformers."):
        return "hf_transformer"
    names = {n.rsplit(".", 1)[-1] for n, _ in body.named_modules()}
    if "qkv" in names and any(isinstance(m, nn.Linear) for m in mods):
        return "timm_vit"
    return "cnn"


def _matches(name: str, module: nn.Module, targets: list[str]) -> bool:
    for t in targets:
        if t == "pointwise":
            if is_pointwise(module):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def _wrap(module: nn.Module, name: str, cfg: LoraTowerConfig, targets: list[str]) -> nn.Module | None:
    if isinstance(module, nn.MultiheadAttention):
        want_in, want_out = "in_proj" in targets, "out_proj" in targets
        if want_in or want_out:
            return LoRAMultiheadAttention(module, cfg.rank, cfg.alpha, cfg.dropout, in_proj=want_in,
                                          out_proj=want_out)
        return None
    if isinstance(module, nn.Linear) and _matches(name, module, targets):
        return LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout)
    if isinstance(module, nn.Conv2d) and is_pointwise(module) and _matches(name, module, targets):
        return LoRAConv2d(module, cfg.rank, cfg.alpha, cfg.dropout)
    return None


def _adapt_body(body: nn.Module, cfg: LoraTowerConfig) -> list[str]:
    """Replace matching submodules of `body` with LoRA layers; return the adapted names."""
    kind = body_kind(body)
    targets = cfg.targets or DEFAULT_TARGETS[kind]
    layer_re = re.compile(cfg.layers) if cfg.layers else None
    chosen = []
    for name, module in list(body.named_modules()):
        if not name or isinstance(module, LORA_LAYERS) or _inside_lora(body, name):
            continue
        if layer_re is not None and not layer_re.search(name):
            continue
        if any(name.startswith(parent + ".") for parent, _ in chosen):
            continue  # out_proj of an adapted nn.MultiheadAttention: its wrapper adapts it
        wrapped = _wrap(module, name, cfg, targets)
        if wrapped is not None:
            chosen.append((name, wrapped))
    if kind == "cnn" and not cfg.targets and not cfg.layers:
        # Adapters in the high-resolution early stages make backward run through the whole trunk at
        # full cost; by default a CNN adapts the later half of its pointwise convs (set lora.*.layers
        # to reach the early stages, e.g. for small local defects).
        chosen = chosen[len(chosen) // 2:]
    for name, wrapped in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(body.get_submodule(parent_name) if parent_name else body, child, wrapped)
    return [name for name, _ in chosen]


def _inside_lora(body: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(body.get_submodule(".".join(parts[:i])), LORA_LAYERS) for i in range(1, len(parts)))


@dataclass
class TrainableSummary:
    trainable: int
    total: int
    lora: int
    full: int

    @property
    def share(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.share:.2f}%): "
                f"LoRA {self.lora:,}, fully trained {self.full:,}")


@dataclass
class LoraState:
    """What `apply_lora` records on a model (as `model.mmft_lora`): enough to save, scale and merge it."""

    config: LoraConfig
    adapted: dict[str, list[str]]  # tower ("image", "text") -> adapted module names
    full: list[str]  # names of the fully trained parameters (projections, temperature, ...)
    full_base: dict[str, torch.Tensor]  # their values before training: the scale-0 end
    full_tuned: dict[str, torch.Tensor] | None = None  # their scale-1 values while the scale is not 1
    scale: float = 1.0  # the WiSE-FT multiplier of the whole delta


def lora_state(model: nn.Module) -> LoraState | None:
    """The model's LoRA state, or None when it has no adapter."""
    return getattr(model, "mmft_lora", None)


def has_adapter(model: nn.Module) -> bool:
    return lora_state(model) is not None


def apply_lora(model: nn.Module, lora_cfg: LoraConfig) -> TrainableSummary:
    """Add LoRA to both towers per `lora_cfg`, freeze everything else except `lora_cfg.unfreeze`.

    Returns the trainable-parameter summary. The adapted module names and the base values of the
    fully trained parameters are kept on the model (for saving and for `set_lora_scale`).
    """
    if has_adapter(model):
        raise ValueError("this model already has LoRA adapters")
    bodies = tower_bodies(model)
    adapted = {}
    for tower, tcfg in (("image", lora_cfg.image), ("text", lora_cfg.text)):
        prefix, body = bodies[tower]
        names = _adapt_body(body, tcfg) if tcfg.enabled else []
        if tcfg.enabled and not names:
            raise ValueError(f"LoRA targets {tcfg.targets or 'default'} matched nothing in the {tower} tower "
                             f"(layers regex '{tcfg.layers}'); check lora.{tower}.targets")
        adapted[tower] = [f"{prefix}.{n}" for n in names]
    unfreeze = [re.compile(p) for p in lora_cfg.unfreeze]
    full = []
    for name, p in model.named_parameters():
        is_lora = ".lora_" in name
        is_full = not is_lora and any(r.search(name) for r in unfreeze)
        p.requires_grad_(is_lora or is_full)
        if is_full:
            full.append(name)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n in full}
    model.mmft_lora = LoraState(config=lora_cfg, adapted=adapted, full=full, full_base=base)
    return trainable_summary(model)


def trainable_summary(model: nn.Module) -> TrainableSummary:
    total = trainable = lora = 0
    for name, p in model.named_parameters():
        if ".lora_" in name:
            lora += p.numel()
        else:
            total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return TrainableSummary(trainable=trainable, total=total + lora, lora=lora, full=trainable - lora)


def lora_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, LORA_LAYERS)]


def get_lora_scale(model: nn.Module) -> float:
    state = lora_state(model)
    return 1.0 if state is None else state.scale


@torch.no_grad()
def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Scale the fine-tuning delta: LoRA outputs and fully trained parameters move to base + scale * delta."""
    state = lora_state(model)
    if state is None:
        raise ValueError("this model has no LoRA adapters to scale")
    for m in lora_modules(model):
        if m.merged:
            raise ValueError("cannot rescale merged LoRA weights; unmerge first")
        m.scale = scale
        if isinstance(m, LoRAMultiheadAttention) and m.out_lora is not None:
            m.out_lora.scale = scale
    params = dict(model.named_parameters())
    if state.full_tuned is None:
        state.full_tuned = {n: params[n].detach().clone() for n in state.full}
    for n in state.full:
        base, tuned = state.full_base[n], state.full_tuned[n]
        # exact endpoints: base + 1 * (tuned - base) is not bit-equal to tuned in floating point
        params[n].copy_(tuned if scale == 1.0 else base if scale == 0.0 else base + scale * (tuned - base))
    if scale == 1.0:
        state.full_tuned = None
    state.scale = scale


@contextlib.contextmanager
def lora_scale(model: nn.Module, scale: float | None) -> Iterator[None]:
    """Run the body with the model at LoRA `scale`, then put the previous scale back, also on errors.

    scale=None leaves the model as it is (for callers whose model may have no adapter); a scale on a
    model without adapter is refused as by `set_lora_scale`.
    """
    if scale is None:
        yield
        return
    old = get_lora_scale(model)
    set_lora_scale(model, scale)
    try:
        yield
    finally:
        set_lora_scale(model, old)


def tuned_full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Values of the fully trained parameters at scale 1, whatever the current scale."""
    state = lora_state(model)
    if state.full_tuned is not None:
        return dict(state.full_tuned)
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in state.full}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA delta (at its current scale) into the base weights and remove the LoRA layers.

    The result is a plain open_clip model with the original module names (what `export` saves).
    """
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LORA_LAYERS) or any(name.startswith(d + ".") for d in done):
            continue  # out_proj LoRA inside a LoRAMultiheadAttention merges with its parent
        done.append(name)
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base)
    if has_adapter(model):
        model.mmft_lora = None
    return model


def train_mode(model: nn.Module) -> None:
    """model.train(), but frozen BatchNorm layers keep their running statistics (eval mode)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()
