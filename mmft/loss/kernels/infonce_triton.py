"""Fused InfoNCE (CLIP) loss in Triton: no B x B buffer, fp32 statistics, fused temperature gradient.

Three layers: @triton.jit kernels -> launchers (block sizes, grids) -> one autograd.Function.
The problem is rows a (R, D) against columns b (C, D), logits L = s * a @ b.T, the positive of
row i at column i + offset (see mmft.loss.kernels.chunked for the same decomposition in PyTorch).

- Forward: `_lse_fwd_kernel` gives the row log-sum-exp r and the positive logit per row, one
  program per row block streaming over column blocks (online max/sum). The column LSE c is the
  same kernel on the transposed problem (b against a).
- Backward: `_grad_kernel` recomputes logit tiles and accumulates dA = s * G @ b for a block of
  rows and a slice of D, with G = w * (P + Q - k * I) built from r and c; dB is the same kernel on
  the transposed problem. The row programs also reduce sum_i <a_i, (G @ b)_i> = ds into partials.
Everything after tl.dot (max, exp, sums, r, c, G) is fp32; G is cast to the input dtype only for
the second tl.dot, as flash attention does with P.

Extra negatives (rows ax, columns bx; docs/losses.md): the kernels see stacked rows [a; ax] and
columns [b; bx] with the batch sizes R_main, C_main. The forward sweeps a against [b; bx] (r) and b
against [a; ax] (c); the backward runs on the stacked problem with r and c padded by +inf (an extra
row has no P term, an extra column no Q term), and row blocks of extras skip the extra columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmft.loss.kernels import Extras
from mmft.loss.kernels._triton_common import (
    Stacked,
    as_scalar,
    bwd_configs,
    column_end,
    fwd_configs,
    logits_tile,
    pair_masks,
    partials,
    prune_bwd,
    split,
    stat_pad,
    tile_index,
)


@triton.autotune(configs=fwd_configs(), key=["R", "C", "D"])
@triton.jit
def _lse_fwd_kernel(a_ptr, b_ptr, ga_ptr, gb_ptr, scale_ptr, lse_ptr, pos_ptr,
                    R, C, R_main, C_main, D, stride_a, stride_b, offset,
                    HAS_GROUPS: tl.constexpr, GROUP_EXTRA_ROWS: tl.constexpr, GROUP_EXTRA_COLS: tl.constexpr,
                    IS_FP32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tile_index(tl.program_id(0), BLOCK_M)
    scale = tl.load(scale_ptr)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row max
    l = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp(L - m)
    pos = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, column_end(tl.program_id(0), BLOCK_M, R_main, C, C_main), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        logits = logits_tile(a_ptr, b_ptr, rows, cols, R, C, D, stride_a, stride_b, scale,
                             BLOCK_M, BLOCK_N, BLOCK_K, IS_FP32)
        allowed, diag = pair_masks(rows, cols, R, C, R_main, C_main, offset, ga_ptr, gb_ptr, HAS_GROUPS,
                                   GROUP_EXTRA_ROWS, GROUP_EXTRA_COLS)
        logits = tl.where(allowed, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row stays 0, not NaN
        l = l * tl.exp(m - shift) + tl.sum(tl.exp(logits - shift[:, None]), 1)
        m = m_new
        pos += tl.sum(tl.where(diag, logits, 0.0), 1)
    shift = tl.where(m == float("-inf"), 0.0, m)
    l = tl.where(rows < R, l, 1.0)  # padded rows: keep log() finite
    tl.store(lse_ptr + rows, shift + tl.log(l), mask=rows < R)
    tl.store(pos_ptr + rows, pos, mask=rows < R)


@triton.autotune(configs=bwd_configs(), key=["R", "C", "D"], reset_to_zero=["ds_ptr"],
                 prune_configs_by={"early_config_prune": prune_bwd})
@triton.jit
def _grad_kernel(a_ptr, b_ptr, ga_ptr, gb_ptr, scale_ptr, coef_ptr, lse_r_ptr, lse_c_ptr, da_ptr, ds_ptr,
                 R, C, R_main, C_main, D, stride_a, stride_b, stride_da, offset, k_diag,
                 HAS_GROUPS: tl.constexpr, GROUP_EXTRA_ROWS: tl.constexpr, GROUP_EXTRA_COLS: tl.constexpr,
                 HAS_ROW_LSE: tl.constexpr, HAS_COL_LSE: tl.constexpr,
                 COMPUTE_DS: tl.constexpr, IS_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, pid_d = tl.program_id(0), tl.program_id(1)
    rows = tile_index(pid_m, BLOCK_M)
    dcol = tile_index(pid_d, BLOCK_D)
    scale = tl.load(scale_ptr)
    coef = tl.load(coef_ptr)
    if HAS_ROW_LSE:
        r = tl.load(lse_r_ptr + rows, mask=rows < R, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # (G @ b)[rows, dcol] without s
    for n0 in range(0, column_end(pid_m, BLOCK_M, R_main, C, C_main), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        logits = logits_tile(a_ptr, b_ptr, rows, cols, R, C, D, stride_a, stride_b, scale,
                             BLOCK_M, BLOCK_N, BLOCK_K, IS_FP32)
        allowed, diag = pair_masks(rows, cols, R, C, R_main, C_main, offset, ga_ptr, gb_ptr, HAS_GROUPS,
                                   GROUP_EXTRA_ROWS, GROUP_EXTRA_COLS)
        g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if HAS_ROW_LSE:
            g += tl.exp(logits - r[:, None])  # row softmax P
        if HAS_COL_LSE:
            c = tl.load(lse_c_ptr + cols, mask=cols < C, other=0.0)
            g += tl.exp(logits - c[None, :])  # column softmax Q
        g = tl.where(allowed, g, 0.0) - tl.where(diag, k_diag, 0.0)
        bt = tl.load(b_ptr + cols[:, None] * stride_b + dcol[None, :],
                     mask=(cols[:, None] < C) & (dcol[None, :] < D), other=0.0)
        if IS_FP32:
            acc = tl.dot(g, bt, acc, input_precision="ieee")
        else:
            acc = tl.dot(g.to(bt.dtype), bt, acc)
    out_mask = (rows[:, None] < R) & (dcol[None, :] < D)
    tl.store(da_ptr + rows[:, None] * stride_da + dcol[None, :],
             (acc * (scale * coef)).to(da_ptr.dtype.element_ty), mask=out_mask)
    if COMPUTE_DS:
        at = tl.load(a_ptr + rows[:, None] * stride_a + dcol[None, :], mask=out_mask, other=0.0)
        part = tl.sum(tl.sum(at.to(tl.float32) * acc, 1), 0) * coef
        tl.store(ds_ptr + pid_m * tl.num_programs(1) + pid_d, part)


def lse_rows(st, scale, offset=0):
    """Row log-sum-exp (R,) and positive logit (R,) of s * rows @ cols.T over allowed pairs, fp32,
    for the rows of a Stacked problem whose rows are all batch rows."""
    a, b = st.rows, st.cols
    R, D = a.shape
    lse = torch.empty(R, device=a.device, dtype=torch.float32)
    pos = torch.empty(R, device=a.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]),)
    _lse_fwd_kernel[grid](a, b, a if st.ga is None else st.ga, b if st.gb is None else st.gb, scale, lse, pos,
                          R, b.shape[0], st.R_main, st.C_main, D, a.stride(0), b.stride(0), offset,
                          **st.masks(), IS_FP32=a.dtype == torch.float32)
    return lse, pos


def grad_rows(st, scale, coef, lse_r, lse_c, offset=0, k=1, compute_ds=False):
    """d rows = s * coef * G @ cols (R, D) in the rows' dtype, and ds = coef * <rows, G @ cols>
    (fp32 0-dim) if asked; lse_r (R,) and lse_c (C,) are padded with +inf where a line has none."""
    a, b = st.rows, st.cols
    R, D = a.shape
    da = torch.empty_like(a)
    ds = partials(R, D, a.device) if compute_ds else torch.zeros(1, device=a.device)
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]))
    _grad_kernel[grid](a, b, a if st.ga is None else st.ga, b if st.gb is None else st.gb, scale, coef,
                       lse_r if lse_r is not None else scale, lse_c if lse_c is not None else scale,
                       da, ds, R, b.shape[0], st.R_main, st.C_main, D, a.stride(0), b.stride(0), da.stride(0),
                       offset, float(k), **st.masks(), HAS_ROW_LSE=lse_r is not None,
                       HAS_COL_LSE=lse_c is not None, COMPUTE_DS=compute_ds,
                       IS_FP32=a.dtype == torch.float32)
    return da, (ds.sum() if compute_ds else None)


class InfoNCETriton(torch.autograd.Function):
    """Fused InfoNCE over rows a (R, D) vs columns b (C, D); `both` adds the column direction;
    extra columns bx join the row LSE, extra rows ax the column LSE."""

    @staticmethod
    def forward(ctx, a, b, scale, ga, gb, offset, both, weight, ax, bx, gax, gbx):
        st = Stacked.build(a, b, ga, gb, Extras(ax, bx, gax, gbx))
        s = as_scalar(scale, a)
        r, pos = lse_rows(Stacked.build(a, b, ga, gb, Extras(bx=bx, gbx=gbx)), s, offset)  # (R,), (R,)
        if both:  # (C,)
            c = lse_rows(Stacked.build(b, a, gb, ga, Extras(bx=ax, gbx=gax)), s, -offset)[0]
        else:
            c = None
        k = 2 if both else 1
        total = r.sum() - k * pos.sum() + (c.sum() if both else 0.0)
        ctx.save_for_backward(st.rows, st.cols, s, st.ga, st.gb, r, c)
        ctx.layout = st[4:]
        ctx.cfg = (offset, k, weight, scale.shape if torch.is_tensor(scale) else ())
        return weight * total

    @staticmethod
    def backward(ctx, grad):
        rows, cols, s, ga, gb, r, c = ctx.saved_tensors
        st = Stacked(rows, cols, ga, gb, *ctx.layout)
        offset, k, weight, scale_shape = ctx.cfg
        coef = (grad.float() * weight).reshape(()).contiguous()
        lse_r, lse_c = stat_pad(r, rows.shape[0]), stat_pad(c, cols.shape[0])  # (R + Mi,), (C + Mt,)
        d_rows, ds = grad_rows(st, s, coef, lse_r, lse_c, offset, k, compute_ds=ctx.needs_input_grad[2])
        d_cols, _ = grad_rows(st.transposed(), s, coef, lse_c, lse_r, -offset, k)
        da, dax = split(d_rows, st.R_main)
        db, dbx = split(d_cols, st.C_main)
        if ds is not None:
            ds = ds.reshape(scale_shape)
        return da, db, ds, None, None, None, None, None, dax, dbx, None, None


def infonce_triton(a, b, scale, ga=None, gb=None, *, offset=0, both=True, weight=1.0,
                   ax=None, bx=None, gax=None, gbx=None):
    """Fused InfoNCE term (scalar, fp32); same contract as mmft.loss.kernels.chunked.infonce_chunked."""
    if both and (offset != 0 or a.shape[0] != b.shape[0]):
        raise ValueError(f"both directions need a square problem with offset 0, got rows {a.shape[0]}, "
                         f"columns {b.shape[0]}, offset {offset}")
    if ax is not None and not both:
        raise ValueError("extra rows join only the column log-sum-exp: they need both=True")
    return InfoNCETriton.apply(a, b, scale, ga, gb, offset, both, weight, ax, bx, gax, gbx)
