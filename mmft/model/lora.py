"""LoRA on both towers: small explicit layers, per-tower targets, freezing, merging and the scale knob.

A LoRA layer adds `scale * (alpha / r) * B @ A` to a frozen weight; A is random and B zero, so a fresh
adapter changes nothing. Three layer kinds cover the towers mmft supports:
- `LoRALinear`: any nn.Linear (timm ViT qkv/proj/fc1/fc2, open_clip MLP c_fc/c_proj, HF query/key/value/dense);
- `LoRAConv2d`: pointwise (1x1, ungrouped) convolutions of CNN towers such as EfficientNet;
- `LoRAMultiheadAttention`: nn.MultiheadAttention (open_clip transformers), LoRA on the fused in_proj
  (q, k and v) and on out_proj, computed as two extra thin matmuls on the activations. peft adapts this
  module by merging the delta into the weights on every forward; doing it on the activations is cheaper.
`set_lora_scale` scales the whole fine-tuning delta (LoRA and the fully trained parameters) for the
WiSE-FT style sweep: 0 is the frozen base, 1 the tuned model.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmft.config import LoraConfig, LoraTowerConfig

# Module-name suffixes adapted by default, by tower body type.
DEFAULT_TARGETS = {
    "open_clip_transformer": ["in_proj", "out_proj", "c_fc", "c_proj"],
    "timm_vit": ["qkv", "proj", "fc1", "fc2"],
    "hf_transformer": ["query", "key", "value", "attention.output.dense"],
    "cnn": ["pointwise"],  # 1x1 ungrouped convolutions (the later half of them unless lora.*.layers is set)
}


class LoRAMixin:
    """State shared by the LoRA layers: rank, scaling, the sweep scale and the merged flag."""

    def _init_lora(self, rank: int, alpha: float, dropout: float) -> None:
        self.rank = rank
        self.scaling = alpha / rank
        self.scale = 1.0  # WiSE-FT multiplier of the delta; 1 = tuned
        self.merged = False
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def active(self) -> bool:
        return not self.merged and self.scale != 0.0

    # Code around a wrapped layer may read its weights (open_clip checks c_fc.weight.dtype).
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @staticmethod
    def _make_pair(rank: int, fan_in: int, fan_out: int, like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
        a = torch.empty(rank, fan_in, device=like.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear does; B = 0 keeps the start exact
        return nn.Parameter(a), nn.Parameter(torch.zeros(fan_out, rank, device=like.device))


class LoRALinear(nn.Module, LoRAMixin):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self._init_lora(rank, alpha, dropout)
        self.lora_A, self.lora_B = self._make_pair(rank, base.in_features, base.out_features, base.weight)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * (self.scaling * self.scale)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.active:
            return y
        h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return y + (F.linear(h, self.lora_B) * (self.scaling * self.scale)).to(y.dtype)

    def merge(self) -> None:
        if not self.merged:
            self.base.weight.data += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.data -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


class LoRAConv2d(nn.Module, LoRAMixin):
    """LoRA on a pointwise convolution: A and B are 1x1 convs through `rank` channels."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not is_pointwise(base):
            raise ValueError("LoRAConv2d adapts only 1x1 ungrouped convolutions")
        self.base = base
        self._init_lora(rank, alpha, dropout)
        self.lora_A, self.lora_B = self._make_pair(rank, base.in_channels, base.out_channels, base.weight)

    def delta_weight(self) -> torch.Tensor:
        return ((self.lora_B @ self.lora_A) * (self.scaling * self.scale))[:, :, None, None]  # (out, in, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.active:
            return y
        h = F.conv2d(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A[:, :, None, None], stride=self.base.stride)
        return y + (F.conv2d(h, self.lora_B[:, :, None, None]) * (self.scaling * self.scale)).to(y.dtype)

    merge = LoRALinear.merge
    unmerge = LoRALinear.unmerge


class LoRAMultiheadAttention(nn.Module, LoRAMixin):
    """nn.MultiheadAttention with LoRA on the fused q/k/v in_proj and/or out_proj.

    Computes attention with F.scaled_dot_product_attention from the base module's weights, so no
    weight is rebuilt per forward. Self- and cross-attention (shared embed dim) are supported.
    """

    def __init__(self, base: nn.MultiheadAttention, rank: int, alpha: float, dropout: float = 0.0,
                 in_proj: bool = True, out_proj: bool = True):
        super().__init__()
        if not base._qkv_same_embed_dim or base.in_proj_weight is None:
            raise ValueError("LoRA on nn.MultiheadAttention needs the fused in_proj (kdim == vdim == embed_dim)")
        self.base = base
        self._init_lora(rank, alpha, dropout)
        e = base.embed_dim
        if in_proj:
            self.lora_A, self.lora_B = self._make_pair(rank, e, 3 * e, base.in_proj_weight)
        else:
            self.lora_A = self.lora_B = None
        self.out_lora = LoRALinear(base.out_proj, rank, alpha, dropout) if out_proj else None

    @property
    def batch_first(self) -> bool:
        return self.base.batch_first

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.base.in_proj_weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.base.in_proj_bias

    @property
    def out_proj(self) -> nn.Module:
        return self.out_lora if self.out_lora is not None else self.base.out_proj

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * (self.scaling * self.scale)  # (3E, E)

    def _in_proj(self, x: torch.Tensor, part: slice) -> torch.Tensor:
        w = self.base.in_proj_weight[part]
        b = self.base.in_proj_bias[part] if self.base.in_proj_bias is not None else None
        y = F.linear(x, w, b)  # (N, L, len(part))
        if self.lora_A is not None and self.active:
            h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)  # (N, L, r)
            y = y + (F.linear(h, self.lora_B[part]) * (self.scaling * self.scale)).to(y.dtype)
        return y

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights:
            raise NotImplementedError("LoRAMultiheadAttention does not return attention weights")
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, e = query.shape  # (N, Lq, E)
        h = self.base.num_heads
        if query is key and key is value:
            q, k, v = self._in_proj(query, slice(0, 3 * e)).chunk(3, dim=-1)
        else:
            q = self._in_proj(query, slice(0, e))
            k = self._in_proj(key, slice(e, 2 * e))
            v = self._in_proj(value, slice(2 * e, 3 * e))
        q, k, v = (t.reshape(n, -1, h, e // h).transpose(1, 2) for t in (q, k, v))  # (N, H, L, Dh)
        mask = _sdpa_mask(attn_mask, key_padding_mask, n, h, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.base.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )  # (N, H, Lq, Dh)
        out = out.transpose(1, 2).reshape(n, lq, e)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def merge(self) -> None:
        if not self.merged:
            if self.lora_A is not None:
                self.base.in_proj_weight.data += self.delta_weight().to(self.base.in_proj_weight.dtype)
            if self.out_lora is not None:
                self.out_lora.merge()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            if self.lora_A is not None:
                self.base.in_proj_weight.data -= self.delta_weight().to(self.base.in_proj_weight.dtype)
            if self.out_lora is not None:
                self.out_lora.unmerge()
            self.merged = False


def _sdpa_mask(attn_mask, key_padding_mask, n: int, h: int, dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention masks (bool True = blocked, or additive float) -> one additive SDPA mask."""
    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:  # (N*H, L, S)
            mask = mask.view(n, h, *mask.shape[-2:])
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask)[:, None, None, :]  # (N, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    return mask


def is_pointwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1


LORA_LAYERS = (LoRALinear, LoRAConv2d, LoRAMultiheadAttention)


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
        text = ("text.transformer", text_mod.transformer) if hasattr(text_mod, "transformer") else ("text", text_mod)
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
            return LoRAMultiheadAttention(module, cfg.rank, cfg.alpha, cfg.dropout, in_proj=want_in, out_proj=want_out)
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


def apply_lora(model: nn.Module, lora_cfg: LoraConfig) -> TrainableSummary:
    """Add LoRA to both towers per `lora_cfg`, freeze everything else except `lora_cfg.unfreeze`.

    Returns the trainable-parameter summary. The adapted module names and the base values of the
    fully trained parameters are kept on the model (for saving and for `set_lora_scale`).
    """
    if getattr(model, "mmft_lora", None) is not None:
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
    model.mmft_lora = {"config": lora_cfg, "adapted": adapted, "full": full,
                       "full_base": {n: p.detach().clone() for n, p in model.named_parameters() if n in full},
                       "full_tuned": None, "scale": 1.0}
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
    state = getattr(model, "mmft_lora", None)
    return 1.0 if state is None else state["scale"]


@torch.no_grad()
def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Scale the fine-tuning delta: LoRA outputs and fully trained parameters move to base + scale * delta."""
    state = getattr(model, "mmft_lora", None)
    if state is None:
        raise ValueError("this model has no LoRA adapters to scale")
    for m in lora_modules(model):
        if m.merged:
            raise ValueError("cannot rescale merged LoRA weights; unmerge first")
        m.scale = scale
        if isinstance(m, LoRAMultiheadAttention) and m.out_lora is not None:
            m.out_lora.scale = scale
    params = dict(model.named_parameters())
    if state["full_tuned"] is None:
        state["full_tuned"] = {n: params[n].detach().clone() for n in state["full"]}
    for n in state["full"]:
        base, tuned = state["full_base"][n], state["full_tuned"][n]
        # exact endpoints: base + 1 * (tuned - base) is not bit-equal to tuned in floating point
        params[n].copy_(tuned if scale == 1.0 else base if scale == 0.0 else base + scale * (tuned - base))
    if scale == 1.0:
        state["full_tuned"] = None
    state["scale"] = scale


def tuned_full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Values of the fully trained parameters at scale 1, whatever the current scale."""
    state = model.mmft_lora
    if state["full_tuned"] is not None:
        return dict(state["full_tuned"])
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in state["full"]}


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
    if getattr(model, "mmft_lora", None) is not None:
        model.mmft_lora = None
    return model


def train_mode(model: nn.Module) -> None:
    """model.train(), but frozen BatchNorm layers keep their running statistics (eval mode)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()
