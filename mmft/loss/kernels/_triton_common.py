"""Triton pieces shared by the InfoNCE and sigmoid kernels: logit tiles, pair masks, tuning configs.

Imported only from the kernel modules, which are imported only when impl="triton" runs, so
`import mmft.loss.contrastive` never imports triton.
"""
from __future__ import annotations

import os
from typing import NamedTuple

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
def pair_masks(rows, cols, R, C, R_main, C_main, offset, ga_ptr, gb_ptr, HAS_GROUPS: tl.constexpr,
               GROUP_EXTRA_ROWS: tl.constexpr, GROUP_EXTRA_COLS: tl.constexpr):
    """(allowed, diag) bool tiles: in range, not extra x extra, not a same-group pair off the
    diagonal; positives. Rows >= R_main and columns >= C_main are extra negatives, which join the
    group mask only when they carry group ids (GROUP_EXTRA_*)."""
    main_r, main_c = rows[:, None] < R_main, cols[None, :] < C_main
    inside = (rows[:, None] < R) & (cols[None, :] < C) & (main_r | main_c)
    diag = (cols[None, :] == rows[:, None] + offset) & inside & main_r & main_c
    allowed = inside
    if HAS_GROUPS:
        ga = tl.load(ga_ptr + rows, mask=rows < R, other=0)
        gb = tl.load(gb_ptr + cols, mask=cols < C, other=0)
        same = ga[:, None] == gb[None, :]
        if not GROUP_EXTRA_ROWS:
            same = same & main_r
        if not GROUP_EXTRA_COLS:
            same = same & main_c
        allowed = inside & (~same | diag)
    return allowed, diag


@triton.jit
def column_end(pid_m, BLOCK_M: tl.constexpr, R_main, C, C_main):
    """Columns a row block sweeps: all C, or only the C_main batch columns for a block of extra rows
    (extra x extra is never scored, so those tiles are skipped, not masked)."""
    return tl.where(pid_m * BLOCK_M < R_main, C, C_main)


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


class Stacked(NamedTuple):
    """Rows [a; ax] and columns [b; bx] of a problem with extra negatives, with their group ids.

    The kernels see one row and one column array (R + Mi, C + Mt) and the batch sizes R_main, C_main;
    stacking the features costs O((B + M) D), never a (B + Mi) x (C + Mt) buffer.
    """

    rows: torch.Tensor  # (R + Mi, D)
    cols: torch.Tensor  # (C + Mt, D)
    ga: torch.Tensor | None  # (R + Mi,) int64
    gb: torch.Tensor | None  # (C + Mt,)
    R_main: int
    C_main: int
    group_rows: bool  # the extra rows carry group ids
    group_cols: bool

    @classmethod
    def build(cls, a, b, ga, gb, ex) -> Stacked:
        rows, cols = _stack(a, ex.ax), _stack(b, ex.bx)
        return cls(rows, cols, None if ga is None else _stack_ids(ga, ex.gax, rows.shape[0]),
                   None if gb is None else _stack_ids(gb, ex.gbx, cols.shape[0]), a.shape[0], b.shape[0],
                   ex.gax is not None, ex.gbx is not None)

    def transposed(self) -> Stacked:
        return Stacked(self.cols, self.rows, self.gb, self.ga, self.C_main, self.R_main, self.group_cols,
                       self.group_rows)

    def masks(self) -> dict:
        """Keyword arguments of the kernels' mask flags."""
        return {"HAS_GROUPS": self.ga is not None, "GROUP_EXTRA_ROWS": self.group_rows,
                "GROUP_EXTRA_COLS": self.group_cols}


def split(grad, main: int):
    """(batch part, extra part or None) of a gradient over stacked rows."""
    return grad[:main], (grad[main:] if grad.shape[0] > main else None)


def _stack(t, extra):
    t = t.contiguous()
    return t if extra is None else torch.cat([t, extra.to(t.dtype)]).contiguous()


def _stack_ids(g, extra, n):
    """Group ids of stacked rows; extras without ids get zeros (never read: their mask flag is off)."""
    if n == g.shape[0]:
        return g
    return torch.cat([g, extra if extra is not None else g.new_zeros(n - g.shape[0])])


def stat_pad(stat, n):
    """A row statistic (R,) padded with +inf to n entries: exp(L - inf) = 0, so a softmax term is
    0 on rows that have no such statistic (extra rows have no row LSE, extra columns no column LSE)."""
    if stat is None or stat.shape[0] == n:
        return stat
    return torch.cat([stat, stat.new_full((n - stat.shape[0],), float("inf"))])


def as_scalar(v, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim fp32 tensor on like's device, read by the kernels through a pointer (no host sync)."""
    t = v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
    return t.to(device=like.device, dtype=torch.float32).reshape(())
