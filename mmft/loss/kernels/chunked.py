"""Chunked PyTorch contrastive losses: tiles of the logit matrix, never the whole B x B.

One autograd.Function serves both losses. It sees a "pairwise" problem: rows `a` (R, D) against
columns `b` (C, D), logits L = s * a @ b.T (+ bias for sigmoid), the positive of row i at column
i + offset (offset = 0 for one process; rank * B_local for local rows against a gathered batch).

- InfoNCE: loss = weight * (sum_i r_i [+ sum_j c_j] - k * sum_i L_{i,i+offset}), r and c the row
  and column log-sum-exp over allowed pairs, k = 1 or 2 directions. The column term needs a
  square problem (`both=True`, offset 0). The bias is left out: the softmax is shift-invariant.
- Sigmoid: loss = weight * (sum_allowed softplus(L_ij) - sum_i L_{i,i+offset}),
  which is -weight * sum_allowed log sigmoid(z_ij L_ij) with z = +1 on the diagonal, -1 elsewhere.
Gradients, with G = dloss/dL (allowed pairs only; I the positives):
  InfoNCE G = weight * (P + Q - k I), P = exp(L - r) row softmax, Q = exp(L - c) column softmax;
  sigmoid G = weight * (sigmoid(L) - I);
  d a = s G @ b,  d b = s G.T @ a,  d s = <a, G @ b>,  d bias = sum(G) (zero for InfoNCE).

InfoNCE: the forward is one pass over tiles (row and column LSE together, each tile merged into
running stats); the backward is one pass that recomputes each tile and feeds both gradient matmuls:
4 matmuls of B^2 D in all, against 6 for open_clip's ClipLoss. Sigmoid: no normaliser couples the
tiles, so when autograd will need it the forward pass also accumulates the gradient (3 matmuls, as
many as SigLipLoss) and the backward only scales it. Extra memory: a few tiles plus O(B) (plus the
O(B * D) gradients, which the backward returns anyway).
"""
from __future__ import annotations

import torch

# Rows x columns of one logit tile: 2048 x 1024 fp32 is 8 MB (two such buffers per pass), big enough
# that matmuls run at full speed (inner dimension D) and per-op overhead stays small; on the 2-core
# test box it beat 1024 x 1024 by ~20% in CPU time at B = 16384. Tests shrink it to get ragged tiles.
TILE: tuple[int, int] = (2048, 1024)

_NEG_INF = float("-inf")


class _Workspace:
    """Tile buffers allocated once per pass and reused by every tile: a fresh 4 MB tensor per tile
    would churn the allocator (on CPU that shows up as retained heap in the peak RSS)."""

    def __init__(self, a, b, tile):
        self.n = min(tile[0], a.shape[0]) * min(tile[1], b.shape[0])
        self.like = a
        self.buffers = {}

    def get(self, name, ti, tj, dtype=None):
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.n, device=self.like.device, dtype=dtype or self.like.dtype)
        return self.buffers[name][: ti * tj].view(ti, tj)


def _diag(i0, i1, j0, j1, offset, device):
    """Local (row, col) indices of the positives L_{i,i+offset} that fall in a tile, or None."""
    lo, hi = max(i0, j0 - offset), min(i1, j1 - offset)
    if lo >= hi:
        return None
    rows = torch.arange(lo, hi, device=device)
    return rows - i0, rows + offset - j0


def _lse(logits, dim, work):
    """Log-sum-exp along dim that gives -inf (not NaN) for an all -inf line; `work` is scratch.

    Rows and columns each take their own max: a single exp shifted by the tile max would be one
    pass cheaper but underflows lines far below that max (|L| reaches 100 at logit_scale 100)."""
    m = logits.amax(dim, keepdim=True)
    m.masked_fill_(m == _NEG_INF, 0.0)
    return torch.sub(logits, m, out=work).exp_().sum(dim).log_().add_(m.squeeze(dim))


def _tiles(R, C, tile):
    """Yield (i0, i1, j0, j1): row blocks outer so a row block's gradient stays hot in cache."""
    tr, tc = tile
    for i0 in range(0, R, tr):
        for j0 in range(0, C, tc):
            yield i0, min(i0 + tr, R), j0, min(j0 + tc, C)


def _logits(ws, a, b, i0, i1, j0, j1, scale, bias, ga, gb, diag):
    """Masked logit tile (Ti, Tj) in the workspace; same-group pairs off the diagonal are -inf."""
    t = ws.get("logits", i1 - i0, j1 - j0)  # (Ti, Tj); beta=0 ignores its old contents
    torch.addmm(t, a[i0:i1], b[j0:j1].t(), beta=0, alpha=scale, out=t)
    if bias:
        t.add_(bias)
    if ga is not None:
        excluded = torch.eq(ga[i0:i1, None], gb[None, j0:j1],
                            out=ws.get("mask", i1 - i0, j1 - j0, torch.bool))  # (Ti, Tj)
        if diag is not None:
            excluded[diag] = False
        t.masked_fill_(excluded, _NEG_INF)
    return t


def _infonce_forward(a, b, scale, ga, gb, offset, both, tile):
    """One pass over tiles: row LSE r (R,), column LSE c (C,) or None, sum of positive logits."""
    R, C = a.shape[0], b.shape[0]
    r = torch.full((R,), _NEG_INF, device=a.device, dtype=a.dtype)
    c = torch.full((C,), _NEG_INF, device=a.device, dtype=a.dtype) if both else None
    pos = torch.zeros((), device=a.device, dtype=torch.float64)
    ws = _Workspace(a, b, tile)
    for i0, i1, j0, j1 in _tiles(R, C, tile):
        d = _diag(i0, i1, j0, j1, offset, a.device)
        t = _logits(ws, a, b, i0, i1, j0, j1, scale, 0.0, ga, gb, d)  # (Ti, Tj)
        if d is not None:
            pos += t[d].sum(dtype=torch.float64)
        work = ws.get("work", i1 - i0, j1 - j0)
        torch.logaddexp(r[i0:i1], _lse(t, 1, work), out=r[i0:i1])  # merge the tile into running stats
        if c is not None:
            torch.logaddexp(c[j0:j1], _lse(t, 0, work), out=c[j0:j1])
    return r, c, pos


def _infonce_backward(a, b, scale, ga, gb, offset, r, c, k, tile):
    """One pass over tiles: G = P (+ Q) - k I; returns G @ b (R, D) and G.T @ a (C, D), unscaled."""
    R, C = a.shape[0], b.shape[0]
    da = torch.zeros_like(a)  # (R, D), becomes the gradient in place
    db = torch.zeros_like(b)  # (C, D)
    ws = _Workspace(a, b, tile)
    for i0, i1, j0, j1 in _tiles(R, C, tile):
        d = _diag(i0, i1, j0, j1, offset, a.device)
        t = _logits(ws, a, b, i0, i1, j0, j1, scale, 0.0, ga, gb, d)  # (Ti, Tj)
        g = torch.sub(t, r[i0:i1, None], out=ws.get("work", i1 - i0, j1 - j0)).exp_()  # row softmax P
        if c is not None:
            g.add_(t.sub_(c[None, j0:j1]).exp_())  # + column softmax Q
        if d is not None:
            g[d] -= k
        da[i0:i1].addmm_(g, b[j0:j1])
        db[j0:j1].addmm_(g.t(), a[i0:i1])
    return da, db


def _sigmoid_sweep(a, b, scale, bias, ga, gb, offset, tile, grads):
    """One pass: sum of softplus over allowed pairs, sum of positive logits, and (if grads)
    G @ b, G.T @ a and sum(G) with G = sigmoid(L) * allowed - I. No normaliser couples the tiles,
    so the gradient is known in the forward pass and the backward only scales it."""
    R, C = a.shape[0], b.shape[0]
    total = torch.zeros((), device=a.device, dtype=torch.float64)
    pos = torch.zeros((), device=a.device, dtype=torch.float64)
    gsum = torch.zeros((), device=a.device, dtype=torch.float64)
    da, db = (torch.zeros_like(a), torch.zeros_like(b)) if grads else (None, None)  # (R, D), (C, D)
    ws = _Workspace(a, b, tile)
    zero = torch.zeros((), device=a.device, dtype=a.dtype)
    for i0, i1, j0, j1 in _tiles(R, C, tile):
        d = _diag(i0, i1, j0, j1, offset, a.device)
        t = _logits(ws, a, b, i0, i1, j0, j1, scale, bias, ga, gb, d)  # (Ti, Tj)
        if d is not None:
            pos += t[d].sum(dtype=torch.float64)
        softplus = torch.logaddexp(t, zero, out=ws.get("work", i1 - i0, j1 - j0))  # 0 where masked
        total += softplus.sum()  # tile sums in the tile dtype (a cast copy would cost a tile)
        if not grads:
            continue
        g = t.sigmoid_()
        if d is not None:
            g[d] -= 1.0
        gsum += g.sum()
        da[i0:i1].addmm_(g, b[j0:j1])
        db[j0:j1].addmm_(g.t(), a[i0:i1])
    return total, pos, da, db, gsum


class PairwiseChunked(torch.autograd.Function):
    """Chunked InfoNCE / sigmoid loss over rows a (R, D) vs columns b (C, D); see module doc."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, ga, gb, kind, offset, both, weight, tile, track):
        # Under torch.autocast the tile matmuls would run in fp16/bf16 and round the logits.
        with torch.autocast(a.device.type, enabled=False):
            return PairwiseChunked._forward(ctx, a, b, scale, bias, ga, gb, kind, offset, both, weight,
                                            tile, track)

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return PairwiseChunked._backward(ctx, grad)

    @staticmethod
    def _forward(ctx, a, b, scale, bias, ga, gb, kind, offset, both, weight, tile, track):
        a32, b32 = _compute(a), _compute(b)  # (R, D), (C, D)
        s = float(scale)
        ctx.cfg = (kind, s, offset, weight, tile, scale.shape, None if bias is None else bias.shape,
                   a.dtype, b.dtype)
        if kind == "infonce":
            r, c, pos = _infonce_forward(a32, b32, s, ga, gb, offset, both, tile)
            ctx.save_for_backward(a, b, ga, gb, r, c)
            ctx.k = 2 if both else 1
            total = r.sum(dtype=torch.float64) + (c.sum(dtype=torch.float64) if both else 0.0)
            return (weight * (total - ctx.k * pos)).to(a32.dtype)
        bv = 0.0 if bias is None else float(bias)
        total, pos, da, db, gsum = _sigmoid_sweep(a32, b32, s, bv, ga, gb, offset, tile, track)
        ctx.save_for_backward(a)
        ctx.grads = (da, db, gsum)
        return (weight * (total - pos)).to(a32.dtype)

    @staticmethod
    def _backward(ctx, grad):
        kind, s, offset, weight, tile, scale_shape, bias_shape, a_dtype, b_dtype = ctx.cfg
        if kind == "infonce":
            a, b, ga, gb, r, c = ctx.saved_tensors
            a32 = _compute(a)
            da, db = _infonce_backward(a32, _compute(b), s, ga, gb, offset, r, c, ctx.k, tile)
            gsum = None
        else:
            a32 = _compute(ctx.saved_tensors[0])
            if ctx.grads is None or ctx.grads[0] is None:
                raise RuntimeError("the chunked sigmoid loss computes its gradient in the forward pass and "
                                   "can be backpropagated once (no retain_graph, not under no_grad)")
            (da, db, gsum), ctx.grads = ctx.grads, None
        coef = grad.to(a32.dtype) * weight  # () upstream gradient times the normaliser
        ds = dbias = None
        if ctx.needs_input_grad[2]:
            # sum_ij G_ij <a_i, b_j> = <a, G @ b>, taken before da is scaled in place.
            ds = (coef * torch.dot(a32.flatten(), da.flatten())).reshape(scale_shape)
        if ctx.needs_input_grad[3] and gsum is not None:
            dbias = (coef * gsum.to(coef.dtype)).reshape(bias_shape)
        da.mul_(coef * s)
        db.mul_(coef * s)
        return da.to(a_dtype), db.to(b_dtype), ds, dbias, *([None] * 8)


def infonce_chunked(a, b, scale, ga=None, gb=None, *, offset=0, both=True, weight=1.0, tile=None):
    """Chunked InfoNCE term (0-dim, fp32 or fp64): rows a (R, D) vs columns b (C, D).

    `scale` is a 0-dim tensor (its gradient flows) or a float; `ga`, `gb` optional group ids (R,), (C,).
    """
    return _apply(a, b, scale, None, ga, gb, "infonce", offset, both, weight, tile)


def sigmoid_chunked(a, b, scale, bias=None, ga=None, gb=None, *, offset=0, weight=1.0, tile=None):
    """Chunked sigmoid (SigLIP) term (0-dim); scale and bias 0-dim tensors or floats."""
    return _apply(a, b, scale, bias, ga, gb, "sigmoid", offset, False, weight, tile)


def _apply(a, b, scale, bias, ga, gb, kind, offset, both, weight, tile):
    if both and (offset != 0 or a.shape[0] != b.shape[0]):
        raise ValueError(f"both directions need a square problem with offset 0, got rows {a.shape[0]}, "
                         f"columns {b.shape[0]}, offset {offset}")
    scale = _scalar_tensor(scale, a)
    bias = None if bias is None else _scalar_tensor(bias, a)
    # Whether autograd will call backward (Function.forward runs with grad mode off, so ask here).
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, scale, bias))
    return PairwiseChunked.apply(a, b, scale, bias, ga, gb, kind, offset, both, weight, tile or TILE, track)


def _compute(t):
    """Features in the compute dtype: fp16/bf16 go up to fp32 (statistics never round), fp64 stays."""
    return t.to(torch.promote_types(t.dtype, torch.float32)).contiguous()


def _scalar_tensor(v, like):
    return v if torch.is_tensor(v) else torch.tensor(float(v), device=like.device)
