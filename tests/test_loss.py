"""mmft.loss.contrastive on CPU: the reference against open_clip and a brute-force loop, the chunked path
against the reference (loss, d image, d text, d logit_scale, d logit_bias), numerics, dispatch and errors."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmft.loss import contrastive as L
from mmft.loss.kernels import chunked

B, D = 37, 129  # odd on purpose: every tile is ragged
LOSSES = {"infonce": L.contrastive_loss, "sigmoid": L.sigmoid_loss}
DTYPES = [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.float16, 2e-3)]


def features(n=B, d=D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(x + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x.to(dtype), y.to(dtype)


def dup_groups(n=B, seed=1):
    """Group ids with plenty of duplicates (about n/4 groups)."""
    return torch.randint(0, max(2, n // 4), (n,), generator=torch.Generator().manual_seed(seed))


def run(fn, x, y, scale=14.0, bias=-5.0, out_scale=2.0, **kw):
    """[loss, d image, d text, d scale, d bias] of out_scale * fn(...) (so grad_output != 1)."""
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float32, requires_grad=True)
    loss = out_scale * fn(x, y, s, b, **kw)
    loss.backward()
    return [loss.detach(), x.grad, y.grad, s.grad, b.grad]


def assert_close(actual, expected, tol, what=""):
    """Normwise relative error: max|a - e| <= tol * max|e| (elementwise rtol is meaningless near 0)."""
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err, ref = (a - e).abs().max().item(), e.abs().max().item()
    assert err <= tol * max(ref, 1e-12), f"{what}: max error {err:.3g} vs max |ref| {ref:.3g} (tol {tol})"


NAMES = ("loss", "d_image", "d_text", "d_logit_scale", "d_logit_bias")


def assert_parity(got, want, tol, kind):
    for name, a, e in zip(NAMES, got, want):
        if e is None:  # an input the loss does not use
            assert a is None, name
            continue
        if name == "d_logit_bias" and kind == "infonce":
            # shift-invariant: zero (exactly on the fast paths, to rounding on the reference)
            assert a is not None and abs(a.item()) < 1e-4 and abs(e.item()) < 1e-4

            continue
        assert_close(a, e, tol, name)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(chunked, "TILE", (8, 5))  # 5 x 8 ragged tiles over B = 37


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp64", "fp32", "fp16"])
@pytest.mark.parametrize("groups", [False, True], ids=["plain", "groups"])
def test_chunked_matches_reference(small_tiles, kind, dtype, tol, groups):
    x, y = features(dtype=dtype)
    gid = dup_groups() if groups else None
    want = run(LOSSES[kind], x, y, group_ids=gid, impl="reference")
    got = run(LOSSES[kind], x, y, group_ids=gid, impl="chunked")
    assert_parity(got, want, tol, kind)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("groups", [False, True], ids=["plain", "groups"])
def test_chunked_rectangular_offset(kind, groups):
    """Local rows 7..15 against 23 global columns, the positive of row i at column i + 7."""
    x, y = features(n=23)
    ga, gb = (dup_groups(23)[7:16], dup_groups(23)) if groups else (None, None)
    ref = L.infonce_reference if kind == "infonce" else L.sigmoid_reference

    def want(a, b, s, bias):
        return ref(a, b, s, bias if kind == "sigmoid" else None, ga, gb, 7, False, 0.25)

    def got(a, b, s, bias):
        return chunked._apply(a, b, s, bias if kind == "sigmoid" else None, ga, gb, kind, 7, False, 0.25,
                              (4, 6))

    assert_parity(run(got, x[7:16], y), run(want, x[7:16], y), 1e-5, kind)


def test_both_directions_need_square_problem():
    x, y = features(n=8)
    with pytest.raises(ValueError, match="square"):
        chunked.infonce_chunked(x[:4], y, 2.0, offset=4, both=True)


# --- the reference itself ------------------------------------------------------------------------

def test_reference_matches_open_clip():
    from open_clip.loss import ClipLoss, SigLipLoss

    x, y = features()
    want = run(lambda x_, y_, s_, b_: ClipLoss()(x_, y_, s_), x, y)
    got = run(L.contrastive_loss, x, y, impl="reference")
    for name, a, e in list(zip(NAMES, got, want))[:4]:
        assert_close(a, e, 1e-5, name)
    want = run(lambda x_, y_, s_, b_: SigLipLoss()(x_, y_, s_, b_), x, y)
    got = run(L.sigmoid_loss, x, y, impl="reference")
    for name, a, e in zip(NAMES, got, want):
        assert_close(a, e, 1e-5, name)


def brute_force(kind, x, y, s, b, gid):
    """The loss by Python loops over pairs, straight from the definition."""
    n = x.shape[0]
    logit = [[s * float(x[i] @ y[j]) + b for j in range(n)] for i in range(n)]
    ok = [[i == j or gid[i] != gid[j] for j in range(n)] for i in range(n)]
    if kind == "sigmoid":
        return sum(math.log1p(math.exp(-(1 if i == j else -1) * logit[i][j]))
                   for i in range(n) for j in range(n) if ok[i][j]) / n
    row = sum(math.log(sum(math.exp(logit[i][j]) for j in range(n) if ok[i][j])) - logit[i][i]
              for i in range(n))
    col = sum(math.log(sum(math.exp(logit[i][j]) for i in range(n) if ok[i][j])) - logit[j][j]
              for j in range(n))
    return (row + col) / (2 * n)


@pytest.mark.parametrize("kind", LOSSES)
def test_reference_group_mask_matches_brute_force(kind):
    x, y = features(n=7, d=5, dtype=torch.float64)
    gid = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    got = LOSSES[kind](x, y, 3.0, -1.0, group_ids=gid, impl="reference").item()
    assert got == pytest.approx(brute_force(kind, x, y, 3.0, -1.0, gid.tolist()), rel=1e-12)


# --- numerics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("kind", LOSSES)
def test_extreme_scale_stays_finite(small_tiles, impl, kind):
    """logit_scale = 100 on unit vectors: logits span [-100, 100]; exp must follow a max subtraction."""
    x, _ = features(n=B)
    y = x.clone()
    y[::3] = -x[::3]  # anti-aligned pairs: positives at -100, others far above
    got = run(LOSSES[kind], x, y, scale=100.0, bias=0.0, impl=impl)
    for name, t in zip(NAMES, got):
        assert torch.isfinite(t).all(), name
    want = run(LOSSES[kind], x.double(), y.double(), scale=100.0, bias=0.0, impl="reference")
    assert_parity(got, want, 1e-5, kind)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_only_diagonal_allowed_gives_zero(small_tiles, impl):
    """All pairs in one group: each row's only allowed entry is its positive, loss 0, gradients 0."""
    x, y = features(n=11)
    got = run(L.contrastive_loss, x, y, group_ids=torch.zeros(11, dtype=torch.int64), impl=impl)
    assert got[0].item() == 0.0
    for t in got[1:]:
        assert torch.isfinite(t).all() and t.abs().max().item() < 1e-6


def test_sigmoid_only_diagonal_allowed_is_the_positive_term():
    x, y = features(n=11)
    gid = torch.zeros(11, dtype=torch.int64)
    got = L.sigmoid_loss(x, y, 5.0, -2.0, group_ids=gid, impl="chunked")
    want = -F.logsigmoid(5.0 * (x * y).sum(-1) - 2.0).sum() / 11
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_logit_bias_does_not_change_infonce():
    x, y = features()
    for impl in ("reference", "chunked"):
        a = L.contrastive_loss(x, y, 10.0, None, impl=impl)
        b = L.contrastive_loss(x, y, 10.0, 7.0, impl=impl)
        assert b.item() == pytest.approx(a.item(), rel=1e-6)
    bias = torch.tensor(7.0, requires_grad=True)
    L.contrastive_loss(x, y, 10.0, bias, impl="chunked").backward()
    assert bias.grad is not None and bias.grad.item() == 0.0


def test_python_float_scale_and_model_output_dict():
    x, y = features(n=8, d=16)
    x.requires_grad_()
    out = {"image_features": x, "text_features": y, "logit_scale": 10.0, "logit_bias": -3.0,
           "extra_output": torch.zeros(1)}
    a = L.contrastive_loss(**out, impl="chunked")
    b = L.sigmoid_loss(**out, impl="chunked")
    (a + b).backward()
    assert torch.isfinite(x.grad).all()
    assert a.item() == pytest.approx(L.contrastive_loss(**out, impl="reference").item(), rel=1e-6)
    assert b.item() == pytest.approx(L.sigmoid_loss(**out, impl="reference").item(), rel=1e-6)


# --- dispatch and errors -------------------------------------------------------------------------

def test_auto_is_chunked_on_cpu_and_force_overrides(monkeypatch):
    x, _ = features(n=4, d=8)
    assert L._resolve("auto", x) == "chunked"
    assert L._resolve("auto", x.half()) == "chunked"
    monkeypatch.setattr(L, "_FORCE_IMPL", "reference")
    assert L._resolve("auto", x) == "reference"


def test_errors_name_the_offending_value(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, y = features(n=4, d=8)
    with pytest.raises(ValueError, match="'fast'"):
        L.contrastive_loss(x, y, 1.0, impl="fast")
    with pytest.raises(ValueError, match="CUDA"):
        L.contrastive_loss(x, y, 1.0, impl="triton")
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(3, 8\)"):
        L.contrastive_loss(x, y[:3], 1.0)
    with pytest.raises(ValueError, match=r"group_ids.*\(5,\)"):
        L.sigmoid_loss(x, y, 1.0, group_ids=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="init_process_group"):
        L.contrastive_loss(x, y, 1.0, gather=True)


def test_import_does_not_import_triton():
    code = ("import sys, mmft.loss.contrastive, mmft.loss.kernels; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sigmoid_chunked_without_autograd_and_twice():
    """Its gradient is computed in the forward pass only when autograd will ask for it."""
    x, y = features(n=12, d=8)
    want = L.sigmoid_loss(x, y, 4.0, -1.0, impl="reference")
    x.requires_grad_()
    with torch.no_grad():
        assert L.sigmoid_loss(x, y, 4.0, -1.0, impl="chunked").item() == pytest.approx(want.item(), rel=1e-6)
    loss = L.sigmoid_loss(x, y, 4.0, -1.0, impl="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_triton_configs_fit_the_hardware(monkeypatch):
    """The autotune lists for Ampere and Hopper fit shared memory; the D-slice pruning works."""
    pytest.importorskip("triton")
    from mmft.loss.kernels import _triton_common as tc

    smem = {8: 160 * 1024, 9: 224 * 1024}  # A100 / H100 per-block limits (bytes)
    for major, limit in smem.items():
        monkeypatch.setattr(tc, "_capability_major", lambda major=major: major)
        for cfg in tc.fwd_configs() + tc.bwd_configs():
            k = cfg.kwargs
            tiles = (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * 2 * cfg.num_stages  # 16-bit inputs
            assert tiles + k["BLOCK_N"] * k.get("BLOCK_D", 0) * 2 <= limit, (major, k)
        kept = tc.prune_bwd(tc.bwd_configs(), {"D": 129})
        assert kept and all(c.kwargs["BLOCK_D"] <= 256 for c in kept)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("kind", LOSSES)
def test_autocast_does_not_round_the_logits(impl, kind):
    """Called inside torch.autocast (as in a mixed-precision train step) the loss stays fp32."""
    x, y = features()

    def under_autocast(*args, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return LOSSES[kind](*args, **kw)  # backward runs outside, as torch.autocast advises

    assert_parity(run(under_autocast, x, y, impl=impl), run(LOSSES[kind], x, y, impl=impl), 1e-6, kind)
