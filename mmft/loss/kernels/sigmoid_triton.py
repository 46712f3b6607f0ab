"""Fused sigmoid (SigLIP) loss in Triton: no B x B buffer, fused temperature and bias gradients.

Three layers: @triton.jit kernels -> launchers (block sizes, grids) -> one autograd.Function.
Rows a (R, D) against columns b (C, D), L = s * a @ b.T + bias, label +1 at column i + offset:
  loss = weight * sum_i [ sum_{j allowed} softplus(L_ij) - L_{i,i+offset} ]
       = -weight * sum_{allowed} log sigmoid(z_ij L_ij)
  G = weight * (allowed * sigmoid(L) - I)
No normaliser couples rows, so the forward is one pass (`_sigmoid_fwd_kernel`, a per-row sum) and
the backward one kernel (`_sigmoid_grad_kernel`) run twice: on (a, b) for dA plus the ds and db
partials, and on the transposed problem for dB.

Extra negatives (rows ax, columns bx; docs/losses.md): the kernels see stacked rows [a; ax] and
columns [b; bx] with the batch sizes R_main, C_main; each (batch, extra) pair is one more negative
term, and row blocks of extras skip the extra columns (extra x extra is never scored).
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
    tile_index,
)


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) without overflow; the log1p trick keeps it accurate for very negative x."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.autotune(configs=fwd_configs(), key=["R", "C", "D"])
@triton.jit
def _sigmoid_fwd_kernel(a_ptr, b_ptr, ga_ptr, gb_ptr, scale_ptr, bias_ptr, out_ptr,
                        R, C, R_main, C_main, D, stride_a, stride_b, offset,
                        HAS_GROUPS: tl.constexpr, GROUP_EXTRA_ROWS: tl.constexpr,
                        GROUP_EXTRA_COLS: tl.constexpr, IS_FP32: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tile_index(tl.program_id(0), BLOCK_M)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    total = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, column_end(tl.program_id(0), BLOCK_M, R_main, C, C_main), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        logits = logits_tile(a_ptr, b_ptr, rows, cols, R, C, D, stride_a, stride_b, scale,
                             BLOCK_M, BLOCK_N, BLOCK_K, IS_FP32) + bias
        allowed, diag = pair_masks(rows, cols, R, C, R_main, C_main, offset, ga_ptr, gb_ptr, HAS_GROUPS,
                                   GROUP_EXTRA_ROWS, GROUP_EXTRA_COLS)
        term = tl.where(allowed, _softplus(logits), 0.0) - tl.where(diag, logits, 0.0)
        total += tl.sum(term, 1)
    tl.store(out_ptr + rows, total, mask=rows < R)


@triton.autotune(configs=bwd_configs(), key=["R", "C", "D"], reset_to_zero=["ds_ptr", "dbias_ptr"],
                 prune_configs_by={"early_config_prune": prune_bwd})
@triton.jit
def _sigmoid_grad_kernel(a_ptr, b_ptr, ga_ptr, gb_ptr, scale_ptr, bias_ptr, coef_ptr, da_ptr, ds_ptr,
                         dbias_ptr, R, C, R_main, C_main, D, stride_a, stride_b, stride_da, offset,
                         HAS_GROUPS: tl.constexpr, GROUP_EXTRA_ROWS: tl.constexpr,
                         GROUP_EXTRA_COLS: tl.constexpr, COMPUTE_DS: tl.constexpr, IS_FP32: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    pid_m, pid_d = tl.program_id(0), tl.program_id(1)
    rows = tile_index(pid_m, BLOCK_M)
    dcol = tile_index(pid_d, BLOCK_D)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    coef = tl.load(coef_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # (G @ b)[rows, dcol] without s
    gsum = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, column_end(pid_m, BLOCK_M, R_main, C, C_main), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        logits = logits_tile(a_ptr, b_ptr, rows, cols, R, C, D, stride_a, stride_b, scale,
                             BLOCK_M, BLOCK_N, BLOCK_K, IS_FP32) + bias
        allowed, diag = pair_masks(rows, cols, R, C, R_main, C_main, offset, ga_ptr, gb_ptr, HAS_GROUPS,
                                   GROUP_EXTRA_ROWS, GROUP_EXTRA_COLS)
        g = tl.where(allowed, 1.0 / (1.0 + tl.exp(-logits)), 0.0) - tl.where(diag, 1.0, 0.0)
        if COMPUTE_DS:
            gsum += tl.sum(g, 1)
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
        slot = pid_m * tl.num_programs(1) + pid_d
        tl.store(ds_ptr + slot, part)
        # Every D slice sees the same G: only the first one reports its sum.
        tl.store(dbias_ptr + slot, tl.sum(gsum, 0) * coef * (pid_d == 0).to(tl.float32))


def sigmoid_rows(st, scale, bias, offset=0):
    """Per-row loss terms (R,) fp32 of a Stacked problem: sum_j allowed softplus(L_ij) - L_{i,i+offset}."""
    a, b = st.rows, st.cols
    R, D = a.shape
    out = torch.empty(R, device=a.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]),)
    _sigmoid_fwd_kernel[grid](a, b, a if st.ga is None else st.ga, b if st.gb is None else st.gb, scale, bias,
                              out, R, b.shape[0], st.R_main, st.C_main, D, a.stride(0), b.stride(0), offset,
                              **st.masks(), IS_FP32=a.dtype == torch.float32)
    return out


def sigmoid_grad_rows(st, scale, bias, coef, offset=0, compute_ds=False):
    """d rows (R, D) in the rows' dtype; with compute_ds also ds and dbias (fp32 0-dim)."""
    a, b = st.rows, st.cols
    R, D = a.shape
    da = torch.empty_like(a)
    ds = partials(R, D, a.device) if compute_ds else torch.zeros(1, device=a.device)
    dbias = partials(R, D, a.device) if compute_ds else torch.zeros(1, device=a.device)
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]))
    ga, gb = a if st.ga is None else st.ga, b if st.gb is None else st.gb
    _sigmoid_grad_kernel[grid](a, b, ga, gb, scale, bias, coef, da, ds, dbias, R, b.shape[0], st.R_main,
                               st.C_main, D, a.stride(0), b.stride(0), da.stride(0), offset, **st.masks(),
                               COMPUTE_DS=compute_ds, IS_FP32=a.dtype == torch.float32)
    return da, (ds.sum() if compute_ds else None), (dbias.sum() if compute_ds else None)


class SigmoidTriton(torch.autograd.Function):
    """Fused sigmoid loss over rows a (R, D) vs columns b (C, D), plus extra rows ax and columns bx."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, ga, gb, offset, weight, ax, bx, gax, gbx):
        st = Stacked.build(a, b, ga, gb, Extras(ax, bx, gax, gbx))
        s = as_scalar(scale, a)
        bv = as_scalar(0.0 if bias is None else bias, a)
        terms = sigmoid_rows(st, s, bv, offset)  # (R + Mi,)
        ctx.save_for_backward(st.rows, st.cols, s, bv, st.ga, st.gb)
        ctx.layout = st[4:]
        shape = lambda v: v.shape if torch.is_tensor(v) else ()
        ctx.cfg = (offset, weight, shape(scale), shape(bias))
        return weight * terms.sum()

    @staticmethod
    def backward(ctx, grad):
        rows, cols, s, bv, ga, gb = ctx.saved_tensors
        st = Stacked(rows, cols, ga, gb, *ctx.layout)
        offset, weight, scale_shape, bias_shape = ctx.cfg
        coef = (grad.float() * weight).reshape(()).contiguous()
        need_ds = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        d_rows, ds, dbias = sigmoid_grad_rows(st, s, bv, coef, offset, compute_ds=need_ds)
        d_cols, _, _ = sigmoid_grad_rows(st.transposed(), s, bv, coef, -offset)
        ds = ds.reshape(scale_shape) if ctx.needs_input_grad[2] else None
        dbias = dbias.reshape(bias_shape) if ctx.needs_input_grad[3] else None
        da, dax = split(d_rows, st.R_main)
        db, dbx = split(d_cols, st.C_main)
        return da, db, ds, dbias, None, None, None, None, dax, dbx, None, None


def sigmoid_triton(a, b, scale, bias=None, ga=None, gb=None, *, offset=0, weight=1.0,
                   ax=None, bx=None, gax=None, gbx=None):
    """Fused sigmoid term (scalar, fp32); same contract as mmft.loss.kernels.chunked.sigmoid_chunked."""
    return SigmoidTriton.apply(a, b, scale, bias, ga, gb, offset, weight, ax, bx, gax, gbx)
