"""The LoRA layers: a low-rank delta beside a frozen layer, computed on the activations.

A LoRA layer adds `scale * (alpha / r) * B @ A` to a frozen weight; A is random and B zero, so a fresh
adapter changes nothing. Three layer kinds cover the towers mmft supports:
- `LoRALinear`: any nn.Linear (timm ViT qkv/proj/fc1/fc2, open_clip MLP c_fc/c_proj,
  HF query/key/value/dense);
- `LoRAConv2d`: pointwise (1x1, ungrouped) convolutions of CNN towers such as EfficientNet;
- `LoRAMultiheadAttention`: nn.MultiheadAttention (open_clip transformers), LoRA on the fused in_proj
  (q, k and v) and on out_proj, computed as two extra thin matmuls on the activations. peft adapts this
  module by merging the delta into the weights on every forward; doing it on the activations is cheaper.
`scale` is the WiSE-FT multiplier that `mmft.model.lora.set_lora_scale` sets on every layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
    def _make_pair(rank: int, fan_in: int, fan_out: int,
                   like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
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
        delta = (self.lora_B @ self.lora_A) * (self.scaling * self.scale)  # (out, in)
        return delta[:, :, None, None]  # (out, in, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.active:
            return y
        x = self.lora_dropout(x).to(self.lora_A.dtype)
        h = F.conv2d(x, self.lora_A[:, :, None, None], stride=self.base.stride)  # (N, r, H', W')
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
            raise ValueError("LoRA on nn.MultiheadAttention needs the fused in_proj "
                             "(kdim == vdim == embed_dim)")
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
