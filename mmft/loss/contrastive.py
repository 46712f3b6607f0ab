"""Contrastive losses for CLIP-style dual encoders: InfoNCE (CLIP) and sigmoid (SigLIP).

Both take the dict an open_clip model returns, `loss(**model(images, texts))`, and come in three
implementations that agree to rounding (tests/test_loss*.py hold them to it; the formulas with
every gradient are in the docstrings of mmft.loss.kernels.chunked and the Triton modules):
- "reference": the plain formula in fp32 (or fp64 for fp64 inputs); materialises B x B.
- "chunked": PyTorch tiles with online log-sum-exp (mmft.loss.kernels.chunked); O(B*D + tile^2) memory,
  CPU and CUDA. About 2/3 of the matmuls of open_clip's ClipLoss.
- "triton": fused Triton kernels (mmft.loss.kernels.infonce_triton / sigmoid_triton) for CUDA fp16/bf16.
"auto" picks triton for CUDA fp16/bf16 inputs when triton imports, chunked otherwise.

Global batch across processes (`gather=True`, the default when torch.distributed runs with more than
one process): each rank all-gathers the features with gradient and scores its local rows against the
global batch. Convention (the one DistributedDataParallel needs): the per-rank losses average to the
single-process loss over the global batch; the gather's backward sums every rank's gradient into the
owner, so the gradient a rank sees for its features is world_size times the single-process one, and
DDP's average of per-rank parameter gradients (logit_scale, logit_bias, encoder weights) equals the
single-process gradient. Local batch sizes must be equal on all ranks.

Extra negatives (`extra_image_features` (Mi, D), `extra_text_features` (Mt, D), e.g. mined hard
negatives, Mi = Mt = B * K): candidates that are only ever negatives. InfoNCE: extra texts join each
image row's log-sum-exp, extra images each text column's; sigmoid: every (image, extra text) and
(extra image, text) pair is one more negative term, still divided by B. Extras are never scored
against extras, and the fused paths tile over them too (no B x (B + M) buffer). Their group ids
(`extra_*_group_ids`) exclude same-group pairs as in the batch; without them extras are never
excluded. With gather, each rank's extras are gathered as the batch is (equal counts on all ranks).
The formulas with every gradient: docs/losses.md.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mmft.loss.kernels import Extras

IMPLS = ("auto", "reference", "chunked", "triton")

# Forces the path that impl="auto" takes ("reference", "chunked" or "triton"); for tests and debugging.
_FORCE_IMPL: str | None = None


NO_EXTRAS = Extras()


def contrastive_loss(image_features, text_features, logit_scale, logit_bias=None, *, group_ids=None,
                     extra_image_features=None, extra_text_features=None, extra_image_group_ids=None,
                     extra_text_group_ids=None, impl="auto", gather=None, **unused):
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy over the batch.

    image_features, text_features: (B, D), usually L2-normalised. logit_scale: the temperature,
    already exponentiated (0-dim tensor or float). logit_bias: accepted because SigLIP-style models
    return one, but the softmax is shift-invariant: it does not change the loss and gets a zero
    gradient. group_ids: (B,) int64; pairs i != j with equal ids are excluded (neither positive nor
    negative), e.g. two captions of one image. impl: "auto" | "reference" | "chunked" | "triton".
    gather: score local rows against the all-gathered global batch (default: when torch.distributed
    runs with world_size > 1; see the module doc for the gradient convention).
    extra_image_features (Mi, D), extra_text_features (Mt, D): negatives only (see the module doc);
    extra_*_group_ids (Mi,), (Mt,) int64 need group_ids. Other keyword arguments (the rest of a
    model's output dict) are ignored. Returns a 0-dim fp32 tensor (fp64 for fp64 features).
    """
    x, y, gid = _check(image_features, text_features, logit_scale, group_ids)
    ex = _check_extras(x, gid, extra_image_features, extra_image_group_ids, "image")  # (Mi, D), (Mi,)
    ey = _check_extras(x, gid, extra_text_features, extra_text_group_ids, "text")  # (Mt, D), (Mt,)
    fn = _kernel("infonce", _resolve(impl, x))
    if _use_gather(gather):
        x_all, y_all, g_all, offset = _gather_batch(x, y, gid, images=True)
        ex_all, gex_all = _gather_extras(ex, "image")
        ey_all, gey_all = _gather_extras(ey, "text")
        w = 1.0 / (2 * x.shape[0])
        i2t = fn(x, y_all, logit_scale, None, gid, g_all, offset, False, w, Extras(bx=ey_all, gbx=gey_all))
        t2i = fn(y, x_all, logit_scale, None, gid, g_all, offset, False, w, Extras(bx=ex_all, gbx=gex_all))
        loss = i2t + t2i
    else:
        extras = _local(ex, ey)
        loss = fn(x, y, logit_scale, logit_bias, gid, gid, 0, True, 1.0 / (2 * x.shape[0]), extras)
    if torch.is_tensor(logit_bias) and logit_bias.requires_grad:
        loss = loss + 0.0 * logit_bias.sum()  # zero gradient, not None, so optimisers see the parameter
    return loss


def sigmoid_loss(image_features, text_features, logit_scale, logit_bias=None, *, group_ids=None,
                 extra_image_features=None, extra_text_features=None, extra_image_group_ids=None,
                 extra_text_group_ids=None, impl="auto", gather=None, **unused):
    """SigLIP pairwise sigmoid loss: -(1/B) sum_ij log sigmoid(z_ij (s <x_i, y_j> + b)), z = +1 on the
    diagonal and -1 elsewhere (divided by B as open_clip's SigLipLoss does).

    Same arguments as contrastive_loss; logit_bias (0-dim tensor, float or None = 0) gets its real
    gradient. With gather, each rank scores its local images (and local extra images) against all
    texts and its local images against all extra texts; the per-rank losses average to the global one
    (texts and extra texts only are gathered).
    """
    x, y, gid = _check(image_features, text_features, logit_scale, group_ids)
    ex = _check_extras(x, gid, extra_image_features, extra_image_group_ids, "image")  # (Mi, D), (Mi,)
    ey = _check_extras(x, gid, extra_text_features, extra_text_group_ids, "text")  # (Mt, D), (Mt,)
    fn = _kernel("sigmoid", _resolve(impl, x))
    if _use_gather(gather):
        _, y_all, g_all, offset = _gather_batch(x, y, gid, images=False)
        ey_all, gey_all = _gather_extras(ey, "text")
        extras = Extras(ex[0], ey_all, ex[1], gey_all)
        return fn(x, y_all, logit_scale, logit_bias, gid, g_all, offset, False, 1.0 / x.shape[0], extras)
    extras = _local(ex, ey)
    return fn(x, y, logit_scale, logit_bias, gid, gid, 0, False, 1.0 / x.shape[0], extras)


# ---------------------------------------------------------------------------------------------
# Reference: the plain formulas over rows a (R, D) and columns b (C, D), positive of row i at
# column i + offset, plus extra rows ax (Mi, D) and extra columns bx (Mt, D) that are only
# negatives: the logit blocks a x b, a x bx and ax x b (extras never meet extras). `both` adds the
# column (text->image) direction of a square problem; extra rows only join that direction.

def _logits_reference(a, b, scale, bias, offset):
    dt = torch.promote_types(a.dtype, torch.float32)
    s = scale.to(dt) if torch.is_tensor(scale) else scale
    logits = s * (a.to(dt) @ b.to(dt).T)  # (R, C)
    if bias is not None:
        logits = logits + (bias.to(dt) if torch.is_tensor(bias) else bias)
    rows = torch.arange(a.shape[0], device=a.device)
    return logits, rows, rows + offset


def _same_group(ga, gb):
    """Bool (R, C): pairs in one group, or None without group ids on either side."""
    return None if ga is None or gb is None else ga[:, None] == gb[None, :]


def _excluded_reference(ga, gb, rows, cols):
    """Bool (R, C): same group and not the positive pair."""
    excluded = _same_group(ga, gb)
    if excluded is not None:
        excluded[rows, cols] = False
    return excluded


def _reference_blocks(a, b, scale, bias, ga, gb, offset, extras):
    """[(logits, excluded or None)] of the batch block, then (a, bx) and (ax, b) when given; rows, cols."""
    dt = torch.promote_types(a.dtype, torch.float32)  # cast once: the blocks' gradients sum in dt
    scale, bias = [v.to(dt) if torch.is_tensor(v) else v for v in (scale, bias)]
    logits, rows, cols = _logits_reference(a, b, scale, bias, offset)
    blocks = [(logits, _excluded_reference(ga, gb, rows, cols)), None, None]
    if extras.bx is not None:  # (R, Mt)
        blocks[1] = (_logits_reference(a, extras.bx, scale, bias, 0)[0], _same_group(ga, extras.gbx))
    if extras.ax is not None:  # (Mi, C)
        blocks[2] = (_logits_reference(extras.ax, b, scale, bias, 0)[0], _same_group(extras.gax, gb))
    return blocks, rows, cols


def _masked(block, value):
    logits, excluded = block
    return logits if excluded is None else logits.masked_fill(excluded, value)


def infonce_reference(a, b, scale, bias, ga, gb, offset, both, weight, extras=NO_EXTRAS):
    """weight * sum_i (lse_j L_ij - L_{i,i+offset}) [+ the same over columns]; fp32, B x (B + M)."""
    if extras.ax is not None and not both:
        raise ValueError("extra rows join only the column log-sum-exp: they need both=True")
    with torch.autocast(a.device.type, enabled=False):
        return _infonce_reference(a, b, scale, bias, ga, gb, offset, both, weight, extras)


def _infonce_reference(a, b, scale, bias, ga, gb, offset, both, weight, extras):
    (main, row_x, col_x), rows, cols = _reference_blocks(a, b, scale, bias, ga, gb, offset, extras)
    logits = _masked(main, float("-inf"))  # (R, C)
    pos = logits[rows, cols]  # (R,)
    row_logits = logits if row_x is None else torch.cat([logits, _masked(row_x, float("-inf"))], 1)
    loss = (row_logits.logsumexp(1) - pos).sum()
    if both:
        col_logits = logits if col_x is None else torch.cat([logits, _masked(col_x, float("-inf"))], 0)
        loss = loss + (col_logits.logsumexp(0) - pos).sum()
    return weight * loss


def sigmoid_reference(a, b, scale, bias, ga, gb, offset, both, weight, extras=NO_EXTRAS):
    """-weight * sum_ij log sigmoid(z_ij L_ij) over allowed pairs; fp32, B x (B + M)."""
    with torch.autocast(a.device.type, enabled=False):
        return _sigmoid_reference(a, b, scale, bias, ga, gb, offset, both, weight, extras)


def _sigmoid_reference(a, b, scale, bias, ga, gb, offset, both, weight, extras):
    (main, *extra_blocks), rows, cols = _reference_blocks(a, b, scale, bias, ga, gb, offset, extras)
    logits, excluded = main
    labels = -torch.ones_like(logits)
    labels[rows, cols] = 1.0
    total = _masked((-F.logsigmoid(labels * logits), excluded), 0.0).sum()  # (R, C) terms
    for block in extra_blocks:  # extras are negatives: label -1
        if block is not None:
            total = total + _masked((-F.logsigmoid(-block[0]), block[1]), 0.0).sum()
    return weight * total


# ---------------------------------------------------------------------------------------------
# Dispatch

def _kernel(kind, path):
    """The (a, b, scale, bias, ga, gb, offset, both, weight, extras) -> loss function of one path."""
    if path == "reference":
        return infonce_reference if kind == "infonce" else sigmoid_reference
    if path == "chunked":
        from mmft.loss.kernels import chunked as mod
    else:
        try:
            if kind == "infonce":
                from mmft.loss.kernels import infonce_triton as mod
            else:
                from mmft.loss.kernels import sigmoid_triton as mod
        except ImportError as err:
            raise ImportError(f"impl='triton' needs the triton package ({err}); install it "
                              "(pip install triton) or use impl='chunked'") from err
    fast = getattr(mod, f"{kind}_{path}")

    def run(a, b, s, bias, ga, gb, offset, both, w, extras=NO_EXTRAS):
        kw = dict(offset=offset, weight=w, **extras._asdict())
        if kind == "infonce":
            return fast(a, b, s, ga, gb, both=both, **kw)
        return fast(a, b, s, bias, ga, gb, **kw)

    return run


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def _resolve(impl, x) -> str:
    """The concrete path for `impl` and features x."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        if _FORCE_IMPL is not None:
            return _resolve(_FORCE_IMPL, x)
        fused = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
        return "triton" if fused and _triton_importable() else "chunked"
    if impl == "triton" and not x.is_cuda and not _interpreting():
        raise ValueError(f"impl='triton' needs CUDA tensors, got features on {x.device}; use "
                         "impl='chunked' on CPU (or set TRITON_INTERPRET=1 before importing triton "
                         "to debug the kernels)")
    return impl


def _check(image_features, text_features, logit_scale, group_ids):
    """Validate shapes and dtypes; returns (x, y, group_ids) with x, y in one floating dtype."""
    x, y = image_features, text_features
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"image_features {tuple(x.shape)} and text_features {tuple(y.shape)} must both "
                         "be (B, D) with the same B and D")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise TypeError(f"features must be floating point, got {x.dtype} and {y.dtype}")
    if x.dtype != y.dtype:
        dt = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(dt), y.to(dt)
    if torch.is_tensor(logit_scale) and logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
    if group_ids is not None:
        if group_ids.shape != (x.shape[0],) or group_ids.is_floating_point():
            raise ValueError(f"group_ids must be an integer tensor of shape ({x.shape[0]},), got "
                             f"{group_ids.dtype} {tuple(group_ids.shape)}")
        group_ids = group_ids.to(device=x.device, dtype=torch.int64).contiguous()
    return x, y, group_ids


def _check_extras(x, gid, extra, extra_gid, side):
    """(extra features in x's dtype or None, their group ids or None) of one side, validated."""
    name = f"extra_{side}_features"
    if extra is None:
        if extra_gid is not None:
            raise ValueError(f"extra_{side}_group_ids given without {name}; pass both or neither")
        return None, None
    if extra.dim() != 2 or extra.shape[1] != x.shape[1] or not extra.is_floating_point():
        raise ValueError(f"{name} must be a floating (M, {x.shape[1]}) tensor like the batch features, got "
                         f"{extra.dtype} {tuple(extra.shape)}")
    extra = extra.to(x.dtype)
    if extra_gid is not None:
        if gid is None:
            raise ValueError(f"extra_{side}_group_ids need group_ids for the batch too (extras are excluded "
                             "against batch items of the same group); pass group_ids or drop them")
        if extra_gid.shape != (extra.shape[0],) or extra_gid.is_floating_point():
            raise ValueError(f"extra_{side}_group_ids must be an integer tensor of shape "
                             f"({extra.shape[0]},), got {extra_gid.dtype} {tuple(extra_gid.shape)}")
        extra_gid = extra_gid.to(device=x.device, dtype=torch.int64).contiguous()
    return extra, extra_gid


def _local(ex, ey):
    """Extras of a one-process call from (features, group ids) per side; empty ones are dropped."""
    ex = ex if ex[0] is not None and ex[0].shape[0] else (None, None)
    ey = ey if ey[0] is not None and ey[0].shape[0] else (None, None)
    return Extras(ex[0], ey[0], ex[1], ey[1])


# ---------------------------------------------------------------------------------------------
# Global batch across processes

def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _use_gather(gather) -> bool:
    if gather is None:
        return _world_size() > 1
    if gather and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("gather=True needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group); pass gather=False for one process")
    return bool(gather)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums every rank's gradient and returns this rank's rows."""

    @staticmethod
    def forward(ctx, t):
        dist = torch.distributed
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), t.shape[0]
        return torch.cat(parts)  # (world * n, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)  # every rank's loss depends on every gathered row
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def _gather_batch(x, y, gid, images):
    """(x_all or None, y_all, gid_all or None, offset of this rank's rows in the global batch)."""
    dist = torch.distributed
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device))
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"local batch sizes differ across ranks {sizes}; the global-batch loss needs "
                         "equal sizes: use drop_last=True in the data loader")
    x_all = _GatherWithGrad.apply(x) if images else None  # (world * B, D)
    y_all = _GatherWithGrad.apply(y)  # (world * B, D)
    g_all = None
    if gid is not None:
        parts = [torch.empty_like(gid) for _ in range(world)]
        dist.all_gather(parts, gid)
        g_all = torch.cat(parts)  # (world * B,)
    return x_all, y_all, g_all, rank * x.shape[0]


def _gather_extras(extra, side):
    """(all ranks' extra features (world * M, D) with gradient, their group ids) or (None, None)."""
    feats, gid = extra
    if feats is None:
        return None, None
    dist = torch.distributed
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=feats.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([feats.shape[0]], dtype=torch.int64, device=feats.device))
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"extra {side} counts differ across ranks {sizes}; give every rank the same number "
                         "of extra negatives (data.negatives_per_sample times the local batch size)")
    g_all = None
    if gid is not None:
        parts = [torch.empty_like(gid) for _ in range(world)]
        dist.all_gather(parts, gid)
        g_all = torch.cat(parts)  # (world * M,)
    return _GatherWithGrad.apply(feats), g_all  # (world * M, D)
