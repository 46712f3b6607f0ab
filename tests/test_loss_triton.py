"""The Triton kernels against the reference: on CPU through the Triton interpreter (fp32, fp16),
on a GPU (bf16, fp16, large B) when one is present.

TRITON_INTERPRET must be set before triton is first imported, so the interpreted runs happen in one
child process (whatever this process has imported already); it writes the Triton results to a file
and the comparison against the reference runs here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmft.loss import contrastive as L

pytest.importorskip("triton")

B, D, M = 37, 129, 53  # not a multiple of any block: ragged rows, columns, extras and D slices
ROOT = Path(__file__).resolve().parents[1]
NAMES = ("loss", "d_image", "d_text", "d_logit_scale", "d_logit_bias", "d_extra_image", "d_extra_text")
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def make_case(kind, dtype, groups=False, scale=14.0, extreme=False, n=B, rows=None, offset=0, seed=0,
              extras=None, extra_groups=False):
    """Inputs of one comparison; `rows` = (lo, hi) scores local rows against all n columns;
    extras = (Mi, Mt) adds extra negative images and texts (hard negatives: near the batch)."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    y = -x.clone() if extreme else F.normalize(x + 0.8 * torch.randn(n, D, generator=g), dim=-1)
    if extreme:
        y[1::2] = x[1::2]  # logits span [-100, 100]
    gid = torch.randint(0, n // 4, (n,), generator=g) if groups else None
    case = {"kind": kind, "x": x.to(dtype), "y": y.to(dtype), "scale": scale, "bias": -4.0, "gid": gid,
            "rows": rows, "offset": offset, "ex": None, "ey": None, "gex": None, "gey": None}
    if extras:
        near = lambda t, m: F.normalize(t[torch.randint(0, n, (m,), generator=g)]
                                        + 0.6 * torch.randn(m, D, generator=g), dim=-1)
        case.update(ex=near(x, extras[0]).to(dtype), ey=near(y, extras[1]).to(dtype))
        if extra_groups:
            case.update(gex=torch.randint(0, n // 4, (extras[0],), generator=g),
                        gey=torch.randint(0, n // 4, (extras[1],), generator=g))
    return case


CASES = {f"{k}-{str(dt)[6:]}-{'groups' if gr else 'plain'}": make_case(k, dt, gr, seed=i)
         for i, (k, dt, gr) in enumerate((k, dt, gr) for k in ("infonce", "sigmoid")
                                         for dt in (torch.float32, torch.float16) for gr in (False, True))}
CASES.update({f"{k}-extreme-scale": make_case(k, torch.float32, scale=100.0, extreme=True)
              for k in ("infonce", "sigmoid")})
CASES.update({f"{k}-local-rows": make_case(k, torch.float32, groups=True, rows=(16, 30), offset=16)
              for k in ("infonce", "sigmoid")})
CASES["infonce-only-diagonal"] = dict(make_case("infonce", torch.float32),
                                      gid=torch.zeros(B, dtype=torch.int64))
CASES.update({f"{k}-extras-{str(dt)[6:]}-{gr}": make_case(k, dt, gr != "plain", seed=20 + i,
                                                         extras=(M, M + 3), extra_groups=gr == "extra-groups")
              for i, (k, dt, gr) in enumerate((k, dt, gr) for k in ("infonce", "sigmoid")
                                              for dt in (torch.float32, torch.float16)
                                              for gr in ("plain", "groups", "extra-groups")
                                              if dt == torch.float32 or gr == "extra-groups")})
CASES.update({f"{k}-extras-extreme-scale": make_case(k, torch.float32, scale=100.0, extreme=True,
                                                     extras=(M, M))
              for k in ("infonce", "sigmoid")})
CASES.update({f"{k}-extras-local-rows": make_case(k, torch.float32, groups=True, rows=(16, 30), offset=16,
                                                  extras=(14 if k == "sigmoid" else 0, M), extra_groups=True)
              for k in ("infonce", "sigmoid")})


def compute(case, impl):
    """[loss, grads...] of 2.0 * loss (grad_output != 1) on the path `impl`."""
    x = case["x"].clone().requires_grad_()
    y = case["y"].clone().requires_grad_()
    ex, ey = [None if t is None or not len(t) else t.clone().requires_grad_()
              for t in (case["ex"], case["ey"])]
    s = torch.tensor(case["scale"], requires_grad=True)
    b = torch.tensor(case["bias"], requires_grad=True)
    if case["rows"] is None:
        fn = L.contrastive_loss if case["kind"] == "infonce" else L.sigmoid_loss
        loss = fn(x, y, s, b, group_ids=case["gid"], impl=impl, extra_image_features=ex,
                  extra_text_features=ey, extra_image_group_ids=case["gex"] if ex is not None else None,
                  extra_text_group_ids=case["gey"] if ey is not None else None)
    else:  # local rows against the global batch, as one rank of a gathered batch scores them
        lo, hi = case["rows"]
        gid = case["gid"]
        fn = L._kernel(case["kind"], impl)
        bias = b if case["kind"] == "sigmoid" else None
        extras = L.Extras(ex, ey, case["gex"] if ex is not None else None,
                          case["gey"] if ey is not None else None)
        loss = fn(x[lo:hi], y, s, bias, gid[lo:hi], gid, case["offset"], False, 1.0 / (hi - lo), extras)
    (2.0 * loss).backward()
    return [(2.0 * loss).detach(), x.grad, y.grad, s.grad, b.grad,
            None if ex is None else ex.grad, None if ey is None else ey.grad]


CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_loss_triton as t
cases = torch.load(sys.argv[1])
torch.save({{name: t.compute(case, "triton") for name, case in cases.items()}}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Triton results of every case, run under TRITON_INTERPRET=1 in a child process."""
    tmp = tmp_path_factory.mktemp("triton-interpret")
    torch.save(CASES, tmp / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    code = CHILD.format(tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp / "cases.pt"), str(tmp / "out.pt")],
                          env=env, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp / "out.pt")


def assert_close(actual, expected, tol, what, floor=1e-3):
    """Normwise relative error: max|a - e| <= tol * max(max|e|, floor)."""
    assert actual is not None, f"{what}: no gradient"
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err, ref = (a - e).abs().max().item(), max(e.abs().max().item(), floor)
    assert err <= tol * ref, f"{what}: max error {err:.3g} vs magnitude {ref:.3g} (tol {tol})"


def check(got, want, case, tol):
    """Compare [loss, grads...]; the scalar gradients are sums of terms of both signs, so their
    error is measured against the size of those terms, not against the (possibly tiny) sum."""
    rows = slice(*case["rows"]) if case["rows"] else slice(None)
    terms = (case["x"][rows].double() * want[1][rows].double()).sum(-1).abs().sum().item() / case["scale"]
    if want[5] is not None:  # ds sums the extra rows' terms too
        terms += (case["ex"].double() * want[5].double()).sum(-1).abs().sum().item() / case["scale"]
    floors = {"d_logit_scale": terms, "d_logit_bias": 1.0}
    for name, a, e in zip(NAMES, got, want):
        if e is None:  # an input the loss does not use
            assert a is None, name
            continue
        if name == "d_logit_bias" and case["kind"] == "infonce":
            assert a is not None and a.item() == 0.0, "InfoNCE is shift-invariant: zero bias gradient"
            continue
        assert_close(a, e, tol, name, floors.get(name, 1e-3))


@pytest.mark.parametrize("name", CASES)
def test_interpreted_triton_matches_reference(interpreted, name):
    case = CASES[name]
    want = compute(as_fp32(case), "reference")
    check(interpreted[name], want, case, TOL[case["x"].dtype])


def as_fp32(case):
    return dict(case, **{k: None if case[k] is None else case[k].float() for k in ("x", "y", "ex", "ey")})


def test_interpreted_only_diagonal_row_is_zero_not_nan(interpreted):
    got = interpreted["infonce-only-diagonal"]
    assert got[0].item() == 0.0
    assert all(torch.isfinite(t).all() and t.abs().max() < 1e-6 for t in got[1:4])


# --- GPU -----------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", [4096, 16384])
def test_gpu_triton_matches_fp32_reference(kind, dtype, n):
    g = torch.Generator(device="cuda").manual_seed(n)
    x = F.normalize(torch.randn(n, 512, device="cuda", generator=g), dim=-1)
    y = F.normalize(x + 0.8 * torch.randn(n, 512, device="cuda", generator=g), dim=-1)
    gid = torch.randint(0, n // 4, (n,), device="cuda", generator=g)
    case = {"kind": kind, "x": x.to(dtype), "y": y.to(dtype), "scale": 30.0, "bias": -10.0, "gid": gid,
            "rows": None, "ex": None, "ey": None, "gex": None, "gey": None}
    got = compute(case, "triton")
    want = compute(as_fp32(case), "reference")
    assert_close(got[0], want[0], 1e-4, "loss")  # logits accumulate in fp32: the loss is tight
    check(got, want, case, GPU_TOL[dtype])


@pytest.mark.gpu
@gpu
def test_gpu_auto_picks_triton_for_half_precision():
    x = torch.randn(8, 16, device="cuda")
    assert L._resolve("auto", x.bfloat16()) == "triton"
    assert L._resolve("auto", x) == "chunked"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_gpu_triton_extras_match_fp32_reference(kind):
    """B = 2048 with K = 4 mined negatives per sample on each side (M = 8192), bf16, groups everywhere."""
    n, m = 2048, 8192
    g = torch.Generator(device="cuda").manual_seed(m)
    unit = lambda t: F.normalize(t, dim=-1).to(torch.bfloat16)
    x = F.normalize(torch.randn(n, 512, device="cuda", generator=g), dim=-1)
    y = F.normalize(x + 0.8 * torch.randn(n, 512, device="cuda", generator=g), dim=-1)
    pick = lambda t: t[torch.randint(0, n, (m,), device="cuda", generator=g)]
    ids = lambda k: torch.randint(0, n // 4, (k,), device="cuda", generator=g)
    case = {"kind": kind, "x": x.bfloat16(), "y": y.bfloat16(), "scale": 30.0, "bias": -10.0, "gid": ids(n),
            "rows": None, "ex": unit(pick(x) + 0.5 * torch.randn(m, 512, device="cuda", generator=g)),
            "ey": unit(pick(y) + 0.5 * torch.randn(m, 512, device="cuda", generator=g)), "gex": ids(m),
            "gey": ids(m)}
    got = compute(case, "triton")
    want = compute(as_fp32(case), "reference")
    assert_close(got[0], want[0], 1e-4, "loss")
    check(got, want, case, GPU_TOL[torch.bfloat16])
