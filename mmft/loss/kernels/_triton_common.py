"""Triton pieces shared by the InfoNCE and sigmoid kernels: logit tiles, pair masks, tuning configs.

Imported only from the kernel modules, which are imported only when impl="triton" runs, so
`import mmft.loss.contrastive` never imports triton.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (CPU debugging, the CPU tests) autotuning would time numpy: one small config.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def logits_tile(a_ptr, b_ptr, rows, cols, R, C, D, stride_a, stride_b, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                IS_FP32: tl.constexpr):
    """s * a[rows] @ b[cols].T as a (BLOCK_M, BLOCK_N) fp32 tile; padded rows/cols read zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        a = tl.load(a_ptr + rows[:, None] * stride_a + kk[None, :],
                    mask=(rows[:, None] < R) & (kk[None, :] < D), other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_b + kk[None, :],
                    mask=(cols[:, None] < C) & (kk[None, :] < D), other=0.0)
        if IS_FP32:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)  # fp16/bf16 products, fp32 accumulation
    return acc * scale


@triton.jit
def pair_masks(rows, cols, R, C, offset, ga_ptr, gb_ptr, HAS_GROUPS: tl.constexpr):
    """(allowed, diag) bool tiles: in range and not a same-group pair off the diagonal; positives."""
    inside = (rows[:, None] < R) & (cols[None, :] < C)
    diag = (cols[None, :] == rows[:, None] + offset) & inside
    allowed = inside
    if HAS_GROUPS:
        ga = tl.load(ga_ptr + rows, mask=rows < R, other=0)
        gb = tl.load(gb_ptr + cols, mask=cols < C, other=0)
        allowed = inside & ((ga[:, None] != gb[None, :]) | diag)
    return allowed, diag


@triton.jit
def tile_index(pid, BLOCK: tl.constexpr):
    """int64 indices of block `pid`, so row * stride cannot overflow int32 at large B * D."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


def _capability_major() -> int:
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 8


def fwd_configs() -> list:
    """Configs for the forward kernels (row block x column block x K step)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1)]
    if _capability_major() >= 9:  # Hopper: 228 KB shared memory, deeper software pipelines
        shapes = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                  (128, 128, 32, 8, 4), (64, 64, 64, 4, 3)]
    else:  # Ampere (sm80/86/89): 100-164 KB shared memory
        shapes = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                  (64, 64, 64, 4, 3), (64, 64, 32, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def bwd_configs() -> list:
    """Configs for the backward kernels; BLOCK_D is the slice of D one program accumulates."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "BLOCK_D": 64}, num_warps=1)]
    if _capability_major() >= 9:
        shapes = [(64, 64, 64, 256, 8, 3), (128, 64, 64, 128, 8, 3), (64, 128, 64, 256, 8, 3),
                  (32, 64, 64, 512, 4, 3), (64, 64, 64, 512, 8, 2)]
    else:
        shapes = [(64, 64, 32, 256, 8, 3), (128, 64, 32, 128, 8, 3), (64, 64, 32, 128, 4, 3),
                  (32, 64, 32, 512, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "BLOCK_D": d},
                          num_warps=w, num_stages=s) for m, n, k, d, w, s in shapes]


def prune_bwd(configs, named_args, **kwargs):
    """Drop configs whose D slice is wider than D needs (all padding, no gain)."""
    need = max(16, triton.next_power_of_2(int(named_args["D"])))
    kept = [c for c in configs if c.kwargs["BLOCK_D"] <= need]
    return kept or configs[:1]


def partials(rows: int, d: int, device) -> torch.Tensor:
    """Zeroed buffer for per-program scalar partials, sized for the smallest blocks of any config."""
    bm = min(c.kwargs["BLOCK_M"] for c in bwd_configs())
    bd = min(c.kwargs["BLOCK_D"] for c in bwd_configs())
    return torch.zeros(triton.cdiv(rows, bm) * triton.cdiv(d, bd), device=device, dtype=torch.float32)


def as_scalar(v, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim fp32 tensor on like's device, read by the kernels through a pointer (no host sync)."""
    t = v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
    return t.to(device=like.device, dtype=torch.float32).reshape(())
