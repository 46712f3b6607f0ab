"""Gradient caching (mmft.training.grad_cache) against the plain full-batch step: the same gradients on
every trainable parameter and the temperature, with extra negatives, odd micro-batches, dropout replayed,
through the trainer with accumulation, and across 2 gloo ranks."""
from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT, make_pairs, pair_batches

from mmft.config import Config, LoraConfig, ModelConfig, TrainConfig
from mmft.loss.contrastive import contrastive_loss, sigmoid_loss
from mmft.model.factory import create_model
from mmft.model.lora import apply_lora, train_mode
from mmft.training.forward import PairEncoder, plain_backward, step_inputs
from mmft.training.grad_cache import grad_cache_backward, micro_slices

B, K = 13, 2


def _model(dropout=0.0):
    torch.manual_seed(0)
    model, _, pre, tok = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))
    lcfg = LoraConfig()
    lcfg.image.dropout = lcfg.text.dropout = dropout
    apply_lora(model, lcfg)
    for p in model.parameters():  # B starts at zero: move it so the LoRA A factors get gradients too
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    train_mode(model)
    return PairEncoder(model), pre, tok


def _batch(pre, tok):
    pairs = make_pairs(B + B * K, seed=1)
    batch = pair_batches(pre, tok, pairs[:B], B, with_groups=True)[0]
    extra = pair_batches(pre, tok, pairs[B:], B * K, with_groups=True)[0]
    batch["extra_image"] = extra["image"].view(B, K, *extra["image"].shape[1:])  # (B, K, 3, S, S)
    batch["extra_text"] = extra["text"].view(B, K, -1)  # (B, K, L)
    batch["extra_image_group"] = batch["extra_text_group"] = extra["group"].view(B, K) + 100  # (B, K)
    return step_inputs(batch, torch.device("cpu"), use_groups=True)


def _grads(model) -> dict:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _loss(kind):
    fn = sigmoid_loss if kind == "sigmoid" else contrastive_loss
    return lambda out, **groups: fn(**out, **groups, impl="reference")


def _assert_close(a: dict, b: dict):
    """rtol 1e-4 per element; the absolute floor scales with the tensor (float32 sums of terms ~1e1)."""
    assert a.keys() == b.keys() and any("logit_scale" in n for n in a) and any("lora_A" in n for n in a)
    for n, a_n in a.items():
        atol = 1e-6 * max(1.0, b[n].abs().max().item())
        torch.testing.assert_close(a_n, b[n], rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def _no_sync(last):
    return contextlib.nullcontext()


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
@pytest.mark.parametrize("micro", [4, 13])
def test_grad_cache_equals_the_full_batch_step(kind, micro):
    model, pre, tok = _model()
    inputs, groups = _batch(pre, tok)
    plain = plain_backward(model, _loss(kind), inputs, groups, contextlib.nullcontext, lambda x: 2.0 * x)
    ref = _grads(model)
    cached = grad_cache_backward(model, _loss(kind), inputs, groups, micro, autocast=contextlib.nullcontext,
                                 scale_loss=lambda x: 2.0 * x, sync=_no_sync, device=torch.device("cpu"))
    torch.testing.assert_close(cached, plain.detach(), rtol=1e-5, atol=1e-6)
    _assert_close(_grads(model), ref)


def test_dropout_replays_the_first_pass():
    """With LoRA dropout, the masks of the autograd pass are those the embeddings were cached with: the
    gradients equal autograd through the same micro-batch forwards, and the RNG ends where they leave it."""
    model, pre, tok = _model(dropout=0.3)
    inputs, groups = _batch(pre, tok)
    loss_fn = _loss("infonce")
    torch.manual_seed(5)
    outs = [model(**{k: v[s] for k, v in inputs.items()}) for s in micro_slices(B, 5)]
    joined = {k: torch.cat([o[k] for o in outs]) if k.endswith("_features") else outs[0][k] for k in outs[0]}
    loss_fn(joined, **groups).backward()
    ref, after_ref = _grads(model), torch.rand(3)
    torch.manual_seed(5)
    grad_cache_backward(model, loss_fn, inputs, groups, 5, autocast=contextlib.nullcontext,
                        scale_loss=lambda x: x, sync=_no_sync, device=torch.device("cpu"))
    _assert_close(_grads(model), ref)
    assert torch.equal(torch.rand(3), after_ref)
    torch.manual_seed(6)  # another draw of masks gives other gradients: the test can tell them apart
    grad_cache_backward(model, loss_fn, inputs, groups, 5, autocast=contextlib.nullcontext,
                        scale_loss=lambda x: x, sync=_no_sync, device=torch.device("cpu"))
    other = _grads(model)
    assert not torch.allclose(other["model.visual.proj"], ref["model.visual.proj"], rtol=1e-4)


def test_micro_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="micro_batch_size"):
        micro_slices(8, 0)


# ---------------------------------------------------------------- through the trainer


def record_grads(train_mod, grads: list) -> None:
    """Keep the gradients of every optimizer step (before clipping); undone by the caller."""
    step = train_mod.optimizer_step

    def recording(model, *args):
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(model, *args)

    train_mod.optimizer_step = recording
    return step


def _train_grads(tmp: Path, base: str, batches, **train_kw) -> list:
    train_mod = importlib.import_module("mmft.training.trainer")
    kw = {"output_dir": str(tmp), "steps": 2, "lr": 2e-3, "warmup_steps": 1, "log_every": 1, "device": "cpu",
          "loss_impl": "reference", "resume": False}
    kw.update(train_kw)
    cfg = Config(model=ModelConfig(name="tiny-vit", model_cfg=TINY_VIT, pretrained=base),
                 train=TrainConfig(**kw))
    cfg.data.batch_size = batches[0]["image"].shape[0]
    grads: list = []
    step = record_grads(train_mod, grads)
    try:
        train_mod.train(cfg, train_data=batches, model=create_model(cfg.model)[0])
    finally:
        train_mod.optimizer_step = step
    return grads


def _base(path: Path) -> str:
    torch.manual_seed(0)
    base, *_ = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))
    torch.save(base.state_dict(), path)
    return str(path)


def test_trainer_grad_cache_with_accumulation_equals_plain(tmp_path):
    base = _base(tmp_path / "base.pt")
    _, _, pre, tok = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))
    batches = pair_batches(pre, tok, make_pairs(44, seed=2), 11)  # 4 batches: 2 steps of 2 accumulated
    plain = _train_grads(tmp_path / "plain", base, batches, accum_steps=2)
    cached = _train_grads(tmp_path / "cached", base, batches, accum_steps=2, grad_cache=True,
                          micro_batch_size=3)
    assert len(plain) == len(cached) == 2
    for a, b in zip(plain, cached):
        _assert_close(b, a)


# ---------------------------------------------------------------- 2 gloo ranks (child processes)


def grad_cache_rank(tmp: str) -> None:
    from mmft import distributed as du

    torch.set_num_threads(1)
    assert du.init_from_env()
    rank = du.rank_world()[0]
    tmp = Path(tmp)
    data = torch.load(tmp / "inputs.pt")
    local = [{k: v[rank * 6:(rank + 1) * 6] for k, v in b.items()} for b in data["batches"]]
    plain = _train_grads(tmp / f"plain{rank}", data["base"], local, accum_steps=2)
    cached = _train_grads(tmp / f"cached{rank}", data["base"], local, accum_steps=2, grad_cache=True,
                          micro_batch_size=4)
    torch.save({"plain": plain, "cached": cached}, tmp / f"grads{rank}.pt")


def test_grad_cache_under_two_gloo_ranks(tmp_path):
    from test_distributed import spawn_ranks

    _, _, pre, tok = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))
    batches = pair_batches(pre, tok, make_pairs(48, seed=4), 12)  # global batches of 12: 6 per rank
    torch.save({"base": _base(tmp_path / "base.pt"), "batches": batches}, tmp_path / "inputs.pt")
    spawn_ranks("grad_cache_rank", tmp_path, module="test_grad_cache")
    runs = [torch.load(tmp_path / f"grads{r}.pt") for r in range(2)]
    for r in runs:
        assert len(r["plain"]) == len(r["cached"]) == 2
        for a, b in zip(r["plain"], r["cached"]):
            _assert_close(b, a)
    for n in runs[0]["cached"][0]:  # all-reduced: every rank steps with the same gradient
        torch.testing.assert_close(runs[0]["cached"][0][n], runs[1]["cached"][0][n])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_grad_cache_equals_the_full_batch_step_on_cuda_in_bf16(kind):
    """On CUDA under bf16 autocast with the fused Triton loss and extra negatives: the cached gradients
    equal the plain step's to bf16 accuracy, and a wrong cached gradient (half of it) is told apart."""
    model, pre, tok = _model()
    model.cuda()
    inputs, groups = _batch(pre, tok)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    groups = {k: v.cuda() for k, v in groups.items()}
    fn = sigmoid_loss if kind == "sigmoid" else contrastive_loss
    loss_fn = lambda out, **g: fn(**out, **g, impl="triton")
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    plain = plain_backward(model, loss_fn, inputs, groups, bf16, lambda x: x)
    ref = _grads(model)
    cached = grad_cache_backward(model, loss_fn, inputs, groups, 4, autocast=bf16, scale_loss=lambda x: x,
                                 sync=_no_sync, device=torch.device("cuda"))
    got = _grads(model)
    torch.testing.assert_close(cached, plain.detach(), rtol=2e-2, atol=1e-3)
    assert got.keys() == ref.keys() and any("lora_A" in n for n in got)
    for n, g in got.items():
        err = (g - ref[n]).norm() / ref[n].norm().clamp_min(1e-12)
        assert err < 0.05, (n, err.item())
    half = {n: 0.5 * g for n, g in got.items()}
    assert max(((h - ref[n]).norm() / ref[n].norm().clamp_min(1e-12)).item() for n, h in half.items()) > 0.4
