"""Global-batch losses across 2 processes (gloo, CPU) against one process on the concatenated batch.

Each rank encodes its half of the batch with the same linear encoder, computes the loss with the
default gather, and backpropagates. DistributedDataParallel would then average the per-rank
parameter gradients; that average (encoder weight, logit_scale, logit_bias) must equal the
single-process gradient, the per-rank losses must average to the single-process loss, and each
rank's feature gradient must be world_size times its rows of the single-process one. With extra
negatives (K per sample, per rank), the extra features follow the same rules.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmft.loss import contrastive as L

WORLD, LOCAL, D_IN, D, K = 2, 9, 12, 16, 3
ROOT = Path(__file__).resolve().parents[1]
CASES = [(kind, impl, groups, extras) for kind in ("infonce", "sigmoid") for impl in ("reference", "chunked")
         for groups in (False, True) for extras in (False, True)]


def inputs():
    g = torch.Generator().manual_seed(0)
    return {"img": torch.randn(WORLD * LOCAL, D_IN, generator=g),
            "txt": torch.randn(WORLD * LOCAL, D_IN, generator=g),
            "w_img": torch.randn(D, D_IN, generator=g), "w_txt": torch.randn(D, D_IN, generator=g),
            "gid": torch.randint(0, 5, (WORLD * LOCAL,), generator=g),
            "ex_img": torch.randn(WORLD * LOCAL * K, D_IN, generator=g),
            "ex_txt": torch.randn(WORLD * LOCAL * K, D_IN, generator=g),
            "ex_gid": torch.randint(0, 5, (2, WORLD * LOCAL * K), generator=g)}


def step(data, kind, impl, gid, rows, extras=False, **kw):
    """One forward/backward on `rows` of the batch (and their K extras each); returns the loss and
    every gradient."""
    w_img = data["w_img"].clone().requires_grad_()
    w_txt = data["w_txt"].clone().requires_grad_()
    scale = torch.tensor(8.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    x = F.normalize(data["img"][rows] @ w_img.T, dim=-1)  # (n, D)
    y = F.normalize(data["txt"][rows] @ w_txt.T, dim=-1)
    x.retain_grad()
    y.retain_grad()
    fn = L.contrastive_loss if kind == "infonce" else L.sigmoid_loss
    if extras:
        erows = slice(rows.start * K if rows.start else None, rows.stop * K if rows.stop else None)
        ex = F.normalize(data["ex_img"][erows] @ w_img.T, dim=-1)  # (n K, D)
        ey = F.normalize(data["ex_txt"][erows] @ w_txt.T, dim=-1)
        ex.retain_grad()
        ey.retain_grad()
        kw.update(extra_image_features=ex, extra_text_features=ey)
        if gid is not None:
            kw.update(extra_image_group_ids=data["ex_gid"][0, erows],
                      extra_text_group_ids=data["ex_gid"][1, erows])
    loss = fn(x, y, scale, bias, group_ids=None if gid is None else gid[rows], impl=impl, **kw)
    (2.0 * loss).backward()
    return {"loss": loss.detach(), "x": x.grad, "y": y.grad, "w_img": w_img.grad, "w_txt": w_txt.grad,
            "scale": scale.grad, "bias": bias.grad, "ex": ex.grad if extras else None,
            "ey": ey.grad if extras else None}


def worker(rank, port, out):
    """Entry point of one rank (run in a child process)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    data = inputs()
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    results = {case: step(data, case[0], case[1], data["gid"] if case[2] else None, rows, case[3])
               for case in CASES}
    try:  # unequal local batches must fail with a clear message on every rank
        n = LOCAL - rank
        L.contrastive_loss(torch.randn(n, D), torch.randn(n, D), 1.0, impl="chunked")
    except ValueError as err:
        results["unequal"] = str(err)
    try:  # so must unequal counts of extra negatives
        x = torch.randn(LOCAL, D)
        L.sigmoid_loss(x, x, 1.0, extra_text_features=torch.randn(K + rank, D), impl="chunked")
    except ValueError as err:
        results["unequal_extras"] = str(err)
    dist.destroy_process_group()
    torch.save(results, out)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_loss_dist as t; " \
           "t.worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT / "tests"), str(r), str(port),
                               str(tmp / f"rank{r}.pt")], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(WORLD)]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errors)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_ranks_reproduce_single_process(ranks, case):
    kind, _impl, groups, extras = case
    data = inputs()
    single = step(data, kind, "reference", data["gid"] if groups else None, slice(None), extras, gather=False)
    per_rank = [r[case] for r in ranks]

    def close(a, b, what):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")

    close(torch.stack([r["loss"] for r in per_rank]).mean(), single["loss"], "mean of rank losses")
    for name in ("w_img", "w_txt", "scale", "bias"):  # what DDP's gradient averaging produces
        if single[name] is None or kind == "infonce" and name == "bias":
            assert all(r[name] is None or r[name].abs().max() < 1e-6 for r in per_rank)
            continue
        close(torch.stack([r[name] for r in per_rank]).mean(0), single[name], f"DDP-averaged d {name}")
    for name in ("x", "y", "ex", "ey")[:4 if extras else 2]:  # the gather's backward sums into the owner
        close(torch.cat([r[name] for r in per_rank]) / WORLD, single[name], f"d features {name}")


def test_unequal_local_batches_fail_clearly(ranks):
    for r in ranks:
        assert "local batch sizes differ" in r["unequal"] and "[9, 8]" in r["unequal"]
        assert "extra text counts differ" in r["unequal_extras"] and "[3, 4]" in r["unequal_extras"]
