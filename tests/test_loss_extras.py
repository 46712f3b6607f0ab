"""Extra negatives in mmft.loss.contrastive (mined hard negatives): the reference against a brute-force
loop over pairs, the chunked path against the reference (loss, every input gradient including the
extras', d logit_scale, d logit_bias), and the properties and errors of the extras API.
The Triton path is compared in tests/test_loss_triton.py, the gathered batch in tests/test_loss_dist.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmft.loss import contrastive as L
from mmft.loss.kernels import chunked

B, D, MI, MT = 37, 129, 53, 56  # odd on purpose: ragged tiles over the batch and over the extras
LOSSES = {"infonce": L.contrastive_loss, "sigmoid": L.sigmoid_loss}
DTYPES = [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.float16, 2e-3)]
NAMES = ("loss", "d_image", "d_text", "d_extra_image", "d_extra_text", "d_logit_scale", "d_logit_bias")


def unit(n, d, g, dtype=torch.float64):
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def batch(n=B, d=D, mi=MI, mt=MT, dtype=torch.float32, seed=0):
    """x, y (n, d) paired; extras near random batch items (hard negatives), (mi, d) and (mt, d)."""
    g = torch.Generator().manual_seed(seed)
    x = unit(n, d, g)
    y = F.normalize(x + 0.8 * unit(n, d, g), dim=-1)
    ex = F.normalize(x[torch.randint(0, n, (mi,), generator=g)] + 0.5 * unit(mi, d, g), dim=-1)
    ey = F.normalize(y[torch.randint(0, n, (mt,), generator=g)] + 0.5 * unit(mt, d, g), dim=-1)
    return [t.to(dtype) for t in (x, y, ex, ey)]


def groups(n=B, mi=MI, mt=MT, seed=1):
    """Batch group ids with duplicates and extras' ids drawn from the same range (some collide)."""
    g = torch.Generator().manual_seed(seed)
    k = max(2, n // 4)
    return [torch.randint(0, k, (m,), generator=g) for m in (n, mi, mt)]


def run(kind, feats, gids=None, extra_gids=True, scale=14.0, bias=-5.0, **kw):
    """[loss, d x, d y, d ex, d ey, d scale, d bias] of 2.0 * loss (grad_output != 1)."""
    x, y, ex, ey = [t.detach().clone().requires_grad_() for t in feats]
    s = torch.tensor(scale, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float32, requires_grad=True)
    if gids is not None:
        kw["group_ids"] = gids[0]
        if extra_gids:
            kw.update(extra_image_group_ids=gids[1], extra_text_group_ids=gids[2])
    loss = 2.0 * LOSSES[kind](x, y, s, b, extra_image_features=ex, extra_text_features=ey, **kw)
    loss.backward()
    return [loss.detach(), x.grad, y.grad, ex.grad, ey.grad, s.grad, b.grad]


def assert_close(actual, expected, tol, what):
    """Normwise relative error: max|a - e| <= tol * max|e|."""
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err, ref = (a - e).abs().max().item(), e.abs().max().item()
    assert err <= tol * max(ref, 1e-12), f"{what}: max error {err:.3g} vs max |ref| {ref:.3g} (tol {tol})"


def assert_parity(got, want, tol, kind):
    for name, a, e in zip(NAMES, got, want):
        if name == "d_logit_bias" and kind == "infonce":  # shift-invariant, extras included
            assert abs(a.item()) < 1e-4 and abs(e.item()) < 1e-4, (a, e)
            continue
        assert_close(a, e, tol, name)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(chunked, "TILE", (8, 5))  # ragged tiles over B = 37 and M = 53, 56


# --- the reference against the definition ---------------------------------------------------------

def brute_force(kind, x, y, ex, ey, s, b, gid, gex, gey):
    """The loss by Python loops: rows i (images) over texts y + ey, columns j (texts) over images
    x + ex; extras are negatives only and never meet each other; same-group pairs are left out."""
    n = len(x)
    dot = lambda u, v: s * float(u @ v) + b
    cols = [(y[j], gid[j], j) for j in range(n)] + [(ey[m], gey[m], None) for m in range(len(ey))]
    rows = [(x[i], gid[i], i) for i in range(n)] + [(ex[m], gex[m], None) for m in range(len(ex))]
    ok = lambda gu, i, gv, j: (i is not None and i == j) or gu != gv  # the positive, or other groups
    if kind == "sigmoid":
        total = 0.0
        for u, gu, i in rows:
            for v, gv, j in cols:
                if (i is None and j is None) or not ok(gu, i, gv, j):
                    continue
                z = 1.0 if i is not None and i == j else -1.0
                total += math.log1p(math.exp(-z * dot(u, v)))
        return total / n
    row = sum(math.log(sum(math.exp(dot(x[i], v)) for v, gv, j in cols if ok(gid[i], i, gv, j)))
              - dot(x[i], y[i]) for i in range(n))
    col = sum(math.log(sum(math.exp(dot(u, y[j])) for u, gu, i in rows if ok(gu, i, gid[j], j)))
              - dot(x[j], y[j]) for j in range(n))
    return (row + col) / (2 * n)


@pytest.mark.parametrize("kind", LOSSES)
def test_reference_with_extras_matches_brute_force(kind):
    x, y, ex, ey = batch(n=7, d=5, mi=4, mt=6, dtype=torch.float64)
    gid, gex, gey = (torch.tensor(v) for v in ([0, 1, 0, 2, 1, 0, 3], [1, 4, 3, 5], [0, 5, 6, 2, 7, 8]))
    got = LOSSES[kind](x, y, 3.0, -1.0, group_ids=gid, extra_image_features=ex, extra_text_features=ey,
                       extra_image_group_ids=gex, extra_text_group_ids=gey, impl="reference").item()
    want = brute_force(kind, x, y, ex, ey, 3.0, -1.0, gid.tolist(), gex.tolist(), gey.tolist())
    assert got == pytest.approx(want, rel=1e-12)
    # without the extras' ids nothing is excluded against them (the fresh ids 100+ never match)
    got = LOSSES[kind](x, y, 3.0, -1.0, group_ids=gid, extra_image_features=ex, extra_text_features=ey,
                       impl="reference").item()
    want = brute_force(kind, x, y, ex, ey, 3.0, -1.0, gid.tolist(), [100 + m for m in range(4)],
                       [200 + m for m in range(6)])
    assert got == pytest.approx(want, rel=1e-12)


# --- chunked against the reference -----------------------------------------------------------------

@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp64", "fp32", "fp16"])
@pytest.mark.parametrize("grouping", ["plain", "groups", "extra-groups"])
def test_chunked_extras_match_reference(small_tiles, kind, dtype, tol, grouping):
    feats = batch(dtype=dtype)
    gids = None if grouping == "plain" else groups()
    extra = grouping == "extra-groups"
    want = run(kind, feats, gids, extra, impl="reference")
    got = run(kind, feats, gids, extra, impl="chunked")
    assert_parity(got, want, tol, kind)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("side", ["image", "text"])
def test_one_side_of_extras(small_tiles, kind, side):
    """Extras on one side only: the other side's extra gradient is absent, the rest matches."""
    x, y, ex, ey = batch()
    feats = {"extra_image_features": ex} if side == "image" else {"extra_text_features": ey}
    out = {}
    for impl in ("reference", "chunked"):
        t = {k: v.clone().requires_grad_() for k, v in dict(x=x, y=y, **feats).items()}
        s = torch.tensor(10.0, requires_grad=True)
        loss = LOSSES[kind](t.pop("x"), t.pop("y"), s, -3.0, impl=impl, **t)
        loss.backward()
        out[impl] = (loss, next(iter(t.values())).grad, s.grad)
    for name, a, e in zip(("loss", "d_extra", "d_scale"), out["chunked"], out["reference"]):
        assert_close(a, e, 1e-5, name)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("kind", LOSSES)
def test_extreme_scale_with_extras_stays_finite(small_tiles, impl, kind):
    """logit_scale 100 with extras equal to batch items: logits +-100 in the extra blocks too."""
    x, _, _, _ = batch()
    y = x.clone()
    y[::3] = -x[::3]
    ex, ey = x[:MI % B].clone(), -y[: MT % B].clone()
    got = run(kind, [x, y, ex, ey], scale=100.0, bias=0.0, impl=impl)
    for name, t in zip(NAMES, got):
        assert torch.isfinite(t).all(), name
    want = run(kind, [t.double() for t in (x, y, ex, ey)], scale=100.0, bias=0.0, impl="reference")
    assert_parity(got, want, 1e-5, kind)


# --- properties ------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("kind", LOSSES)
def test_extras_raise_the_loss_and_excluded_ones_change_nothing(impl, kind):
    """A negative only adds probability mass (InfoNCE) or a positive term (sigmoid); extras in the
    group of every batch item are all excluded; no extras (or empty ones) is the plain loss."""
    x, y, ex, ey = batch(dtype=torch.float64)
    fn = LOSSES[kind]
    plain = fn(x, y, 10.0, -3.0, impl=impl)
    empty = fn(x, y, 10.0, -3.0, impl=impl, extra_image_features=ex[:0], extra_text_features=ey[:0])
    assert empty.item() == pytest.approx(plain.item(), rel=1e-12)
    hard = fn(x, y, 10.0, -3.0, impl=impl, extra_image_features=ex, extra_text_features=ey)
    assert hard.item() > plain.item() + 1e-3
    one = torch.zeros(B, dtype=torch.int64)
    alone = fn(x, y, 10.0, -3.0, impl=impl, group_ids=one)
    excluded = fn(x, y, 10.0, -3.0, impl=impl, group_ids=one, extra_image_features=ex, extra_text_features=ey,
                  extra_image_group_ids=one.new_zeros(MI), extra_text_group_ids=one.new_zeros(MT))
    assert excluded.item() == pytest.approx(alone.item(), abs=1e-12)


def test_infonce_extras_equal_a_cross_entropy_over_more_columns():
    """Image->text rows with extra texts are cross-entropy over [Y; Y']; text->image columns over [X; X']."""
    x, y, ex, ey = batch(dtype=torch.float64)
    s = 12.0
    i2t = F.cross_entropy(s * x @ torch.cat([y, ey]).T, torch.arange(B))
    t2i = F.cross_entropy(s * y @ torch.cat([x, ex]).T, torch.arange(B))
    for impl in ("reference", "chunked"):
        got = L.contrastive_loss(x, y, s, impl=impl, extra_image_features=ex, extra_text_features=ey)
        assert got.item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-12)


def test_extra_gradients_keep_their_dtype_and_no_autograd_works():
    x, y, ex, ey = batch(dtype=torch.float16)
    ex.requires_grad_()
    for fn in LOSSES.values():
        want = fn(x, y, 8.0, -2.0, impl="reference", extra_image_features=ex, extra_text_features=ey)
        with torch.no_grad():
            got = fn(x, y, 8.0, -2.0, impl="chunked", extra_image_features=ex, extra_text_features=ey)
        assert got.item() == pytest.approx(want.item(), rel=1e-3)
        fn(x, y, 8.0, -2.0, impl="chunked", extra_image_features=ex, extra_text_features=ey).backward()
        assert ex.grad.dtype == torch.float16 and ey.grad is None
        ex.grad = None


def test_extras_errors_name_the_offending_value():
    x, y, ex, ey = batch(n=4, d=8, mi=3, mt=3)
    with pytest.raises(ValueError, match=r"extra_text_features.*\(3, 7\)"):
        L.contrastive_loss(x, y, 1.0, extra_text_features=ey[:, :7])
    with pytest.raises(ValueError, match="need group_ids"):
        L.sigmoid_loss(x, y, 1.0, extra_image_features=ex,
                       extra_image_group_ids=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"extra_image_group_ids.*\(3,\)"):
        L.sigmoid_loss(x, y, 1.0, group_ids=torch.zeros(4, dtype=torch.int64), extra_image_features=ex,
                       extra_image_group_ids=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="without extra_text_features"):
        L.contrastive_loss(x, y, 1.0, extra_text_group_ids=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="both=True"):
        chunked.infonce_chunked(x, y, 1.0, both=False, ax=ex)
