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

Extra negatives (rows ax (Mi, D), columns bx (Mt, D); docs/losses.md has the formulas) are more
blocks of the same passes: (a, bx) adds to the row statistics r, (ax, b) to the column statistics c
(InfoNCE) or to the sum (sigmoid), each with no positives; extra x extra is never scored. Their
gradients come from the same G: d bx = s G_x.T @ a, d ax = s G_x @ b.
"""
from __future__ import annotations

import torch

from mmft.loss.kernels import Extras

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
    """Local (row, col) indices of the positives L_{i,i+offset} that fall in a tile, or None
    (always None for offset=None: a block of extra negatives has no positives)."""
    if offset is None:
        return None
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


def _infonce_backward(a, b, scale, ga, gb, offset, r, c, k, tile, da=None):
    """One pass over tiles: G = P (+ Q) - k I; returns G @ b (R, D) and G.T @ a (C, D), unscaled.

    `da` (R, D): a buffer to add G @ b into (the rows' gradient from an earlier block)."""
    R, C = a.shape[0], b.shape[0]
    da = torch.zeros_like(a) if da is None else da  # (R, D), becomes the gradient in place
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


def _block_groups(g_main, g_extra):
    """Group ids of a block of extras: (main, extra) when the extras have ids, else no mask at all."""
    return (g_main, g_extra) if g_extra is not None else (None, None)


def _infonce_stats(a, b, s, ga, gb, offset, both, tile, ex):
    """Row LSE r (R,), column LSE c (C,) or None, and sum of positive logits, extras included."""
    r, c, pos = _infonce_forward(a, b, s, ga, gb, offset, both, tile)
    if ex.bx is not None:  # extra columns join every row's log-sum-exp
        rx = _infonce_forward(a, ex.bx, s, *_block_groups(ga, ex.gbx), None, False, tile)[0]  # (R,)
        r = torch.logaddexp(r, rx)
    if ex.ax is not None:  # extra rows join every column's log-sum-exp
        cx = _infonce_forward(b, ex.ax, s, *_block_groups(gb, ex.gax), None, False, tile)[0]  # (C,)
        c = torch.logaddexp(c, cx)
    return r, c, pos


def _infonce_grads(a, b, s, ga, gb, offset, r, c, k, tile, ex):
    """Unscaled G @ [b; bx] (R, D), G.T @ [a; ax] (C, D), and the extras' G_x.T @ a, G_x @ b."""
    da, db = _infonce_backward(a, b, s, ga, gb, offset, r, c, k, tile)
    dax = dbx = None
    if ex.bx is not None:  # G = P on (a, bx)
        _, dbx = _infonce_backward(a, ex.bx, s, *_block_groups(ga, ex.gbx), None, r, None, 0, tile, da=da)
    if ex.ax is not None:  # G = Q on (ax, b), swept as its transpose (b, ax) with c as row statistics
        _, dax = _infonce_backward(b, ex.ax, s, *_block_groups(gb, ex.gax), None, c, None, 0, tile, da=db)
    return da, db, dax, dbx


def _sigmoid_all(a, b, s, bias, ga, gb, offset, tile, grads, ex):
    """_sigmoid_sweep over the batch block and the (a, bx) and (ax, b) blocks of extras, summed."""
    total, pos, da, db, gsum = _sigmoid_sweep(a, b, s, bias, ga, gb, offset, tile, grads)
    dax = dbx = None
    if ex.bx is not None:
        t, _, da_x, dbx, g = _sigmoid_sweep(a, ex.bx, s, bias, *_block_groups(ga, ex.gbx), None, tile, grads)
        total, gsum = total + t, gsum + g
        da = da.add_(da_x) if grads else None
    if ex.ax is not None:
        groups = (ex.gax, gb) if ex.gax is not None else (None, None)
        t, _, dax, db_x, g = _sigmoid_sweep(ex.ax, b, s, bias, *groups, None, tile, grads)
        total, gsum = total + t, gsum + g
        db = db.add_(db_x) if grads else None
    return total, pos, (da, db, dax, dbx, gsum) if grads else None


class PairwiseChunked(torch.autograd.Function):
    """Chunked InfoNCE / sigmoid loss over rows a (R, D) vs columns b (C, D), plus extra rows ax and
    extra columns bx that are only negatives; see module doc."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, ga, gb, kind, offset, both, weight, tile, track, ax, bx, gax, gbx):
        # Under torch.autocast the tile matmuls would run in fp16/bf16 and round the logits.
        with torch.autocast(a.device.type, enabled=False):
            return PairwiseChunked._forward(ctx, a, b, scale, bias, ga, gb, kind, offset, both, weight,
                                            tile, track, Extras(ax, bx, gax, gbx))

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return PairwiseChunked._backward(ctx, grad)

    @staticmethod
    def _forward(ctx, a, b, scale, bias, ga, gb, kind, offset, both, weight, tile, track, ex):
        a32, b32 = _compute(a), _compute(b)  # (R, D), (C, D)
        ex32 = Extras(_compute(ex.ax), _compute(ex.bx), ex.gax, ex.gbx)  # (Mi, D), (Mt, D)
        s = float(scale)
        dtypes = [t.dtype if t is not None else None for t in (a, b, ex.ax, ex.bx)]
        ctx.cfg = (kind, s, offset, weight, tile, scale.shape, None if bias is None else bias.shape, dtypes)
        if kind == "infonce":
            r, c, pos = _infonce_stats(a32, b32, s, ga, gb, offset, both, tile, ex32)
            ctx.save_for_backward(a, b, ga, gb, r, c, ex.ax, ex.bx, ex.gax, ex.gbx)
            ctx.k = 2 if both else 1
            total = r.sum(dtype=torch.float64) + (c.sum(dtype=torch.float64) if both else 0.0)
            return (weight * (total - ctx.k * pos)).to(a32.dtype)
        bv = 0.0 if bias is None else float(bias)
        total, pos, ctx.grads = _sigmoid_all(a32, b32, s, bv, ga, gb, offset, tile, track, ex32)
        ctx.save_for_backward(a, ex.ax)
        return (weight * (total - pos)).to(a32.dtype)

    @staticmethod
    def _backward(ctx, grad):
        kind, s, offset, weight, tile, scale_shape, bias_shape, dtypes = ctx.cfg
        if kind == "infonce":
            a, b, ga, gb, r, c, ax, bx, gax, gbx = ctx.saved_tensors
            a32, ax32 = _compute(a), _compute(ax)
            ex32 = Extras(ax32, _compute(bx), gax, gbx)
            da, db, dax, dbx = _infonce_grads(a32, _compute(b), s, ga, gb, offset, r, c, ctx.k, tile, ex32)
            gsum = None
        else:
            a, ax = ctx.saved_tensors
            a32, ax32 = _compute(a), _compute(ax)
            if ctx.grads is None:
                raise RuntimeError("the chunked sigmoid loss computes its gradient in the forward pass and "
                                   "can be backpropagated once (no retain_graph, not under no_grad)")
            (da, db, dax, dbx, gsum), ctx.grads = ctx.grads, None
        coef = grad.to(a32.dtype) * weight  # () upstream gradient times the normaliser
        ds = dbias = None
        if ctx.needs_input_grad[2]:
            # sum_ij G_ij <a_i, b_j> over every block = <a, G @ [b; bx]> + <ax, G_x @ b>, before scaling.
            dot = torch.dot(a32.flatten(), da.flatten())
            if dax is not None:
                dot = dot + torch.dot(ax32.flatten(), dax.flatten())
            ds = (coef * dot).reshape(scale_shape)
        if ctx.needs_input_grad[3] and gsum is not None:
            dbias = (coef * gsum.to(coef.dtype)).reshape(bias_shape)
        out = [None if g is None else g.mul_(coef * s).to(dt) for g, dt in zip((da, db, dax, dbx), dtypes)]
        return out[0], out[1], ds, dbias, *([None] * 8), out[2], out[3], None, None


def infonce_chunked(a, b, scale, ga=None, gb=None, *, offset=0, both=True, weight=1.0, tile=None,
                    ax=None, bx=None, gax=None, gbx=None):
    """Chunked InfoNCE term (0-dim, fp32 or fp64): rows a (R, D) vs columns b (C, D).

    `scale` is a 0-dim tensor (its gradient flows) or a float; `ga`, `gb` optional group ids (R,), (C,).
    Extra negatives: columns bx (Mt, D) join the row LSE, rows ax (Mi, D) the column LSE (both=True);
    gax, gbx their group ids (None: never excluded).
    """
    return _apply(a, b, scale, None, ga, gb, "infonce", offset, both, weight, tile, Extras(ax, bx, gax, gbx))


def sigmoid_chunked(a, b, scale, bias=None, ga=None, gb=None, *, offset=0, weight=1.0, tile=None,
                    ax=None, bx=None, gax=None, gbx=None):
    """Chunked sigmoid (SigLIP) term (0-dim); scale and bias 0-dim tensors or floats; extras as
    in infonce_chunked, each (row, extra column) and (extra row, column) pair one more negative."""
    return _apply(a, b, scale, bias, ga, gb, "sigmoid", offset, False, weight, tile, Extras(ax, bx, gax, gbx))


def _apply(a, b, scale, bias, ga, gb, kind, offset, both, weight, tile, ex=None):
    ex = ex or Extras()
    if both and (offset != 0 or a.shape[0] != b.shape[0]):
        raise ValueError(f"both directions need a square problem with offset 0, got rows {a.shape[0]}, "
                         f"columns {b.shape[0]}, offset {offset}")
    if kind == "infonce" and ex.ax is not None and not both:
        raise ValueError("extra rows join only the column log-sum-exp: they need both=True")
    scale = _scalar_tensor(scale, a)
    bias = None if bias is None else _scalar_tensor(bias, a)
    # Whether autograd will call backward (Function.forward runs with grad mode off, so ask here).
    inputs = (a, b, scale, bias, ex.ax, ex.bx)
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return PairwiseChunked.apply(a, b, scale, bias, ga, gb, kind, offset, both, weight, tile or TILE, track,
                                 *ex)


def _compute(t):
    """Features in the compute dtype: fp16/bf16 go up to fp32 (statistics never round), fp64 stays."""
    if t is None:
        return None
    return t.to(torch.promote_types(t.dtype, torch.float32)).contiguous()


def _scalar_tensor(v, like):
    return v if torch.is_tensor(v) else torch.tensor(float(v), device=like.device)
