"""The trainer on tiny generated image-text pairs (no shards needed)."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT, Stop, eval_batches, make_pairs, pair_batches, stop_after_checkpoint

from mmft.config import Config, LoraConfig, ModelConfig, TrainConfig
from mmft.model.factory import create_model
from mmft.training.state import Checkpointer, TrainState
from mmft.training.trainer import train
from mmft.training.validate import retrieval_recall


def _cfg(tmp_path, **train_kw) -> Config:
    kw = {"output_dir": str(tmp_path / "run"), "steps": 30, "lr": 2e-3, "warmup_steps": 3, "log_every": 5,
          "seed": 0, "loss_impl": "reference"}
    kw.update(train_kw)
    cfg = Config(model=ModelConfig(name="tiny-vit", model_cfg=TINY_VIT), train=TrainConfig(**kw))
    cfg.data.batch_size = 16
    return cfg


def _data(cfg, n=64):
    torch.manual_seed(0)  # the tiny model's random init
    model, _, pv, tok = create_model(cfg.model)
    pairs = make_pairs(n)
    return model, tok, pair_batches(pv, tok, pairs, cfg.data.batch_size), eval_batches(pv, pairs)


def _train_and_check_it_learned(cfg) -> tuple[Path, list[dict]]:
    """Train on the tiny pairs; the loss falls below 0.7x its first value and mean R@1 rises 10+ points.
    Returns the run directory and its log records."""
    model, tok, batches, val = _data(cfg)
    before = retrieval_recall(model, val, tok, "cpu")
    run = train(cfg, train_data=batches, val_data=val, model=model, tokenizer=tok)
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["event"] == "train"]
    vals = [x for x in lines if x["event"] == "val"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.7 * losses[0], losses
    assert vals and vals[-1]["mean_r1"] > before["mean_r1"] + 10, (before, vals[-1])
    return run, lines


def test_training_lowers_loss_and_raises_recall(tmp_path):
    cfg = _cfg(tmp_path, steps=40, val_every=20)
    run, lines = _train_and_check_it_learned(cfg)
    vals = [x for x in lines if x["event"] == "val"]
    # later validations pair their queries with the first one's: the gain and its interval
    assert "gain" not in vals[0] and vals[-1]["gain_since"] == vals[0]["step"]
    assert vals[-1]["gain"] == pytest.approx(vals[-1]["mean"] - vals[0]["mean"])
    assert vals[-1]["gain_ci95"][0] <= vals[-1]["gain"] <= vals[-1]["gain_ci95"][1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and 0 < summary["trainable_share"] < 0.1
    # how sure the choice of the best step is, from every validation's hits
    sel = summary["selection"]
    assert sel["chosen_step"] == summary["best"]["step"] and sel["metric"] == "mean"
    assert sel["validations"] == 3  # steps 0 (the start), 20 and 40
    assert 0 <= sel["chosen_share"] <= 1 and sum(sel["contenders"].values()) <= 1 + 1e-9
    assert [x for x in lines if x["event"] == "selection"] == [{"event": "selection", "step": 40, **sel}]
    for d in ("adapter-best", "adapter-last"):
        assert (run / d / "adapter_model.safetensors").is_file()
    assert len(list((run / "checkpoints").glob("step-*.pt"))) <= cfg.train.keep_checkpoints


def test_frozen_parameters_do_not_move(tmp_path):
    cfg = _cfg(tmp_path, steps=5)
    model, tok, batches, _ = _data(cfg, n=32)
    from mmft.model.lora import apply_lora

    apply_lora(model, cfg.lora)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(cfg, train_data=batches, model=model, tokenizer=tok)
    params = dict(model.named_parameters())
    assert frozen and all(torch.equal(params[n], t) for n, t in frozen.items())
    moved = [n for n, t in trained.items() if not torch.equal(params[n], t)]
    assert any(n.endswith("lora_B") for n in moved) and "visual.proj" in moved and "text_projection" in moved


def test_resume_reaches_the_same_parameters(tmp_path, monkeypatch):
    """Stopped after a checkpoint, then resumed: the same parameters as one uninterrupted run."""
    full = _cfg(tmp_path / "a", steps=12, checkpoint_every=4)
    model, tok, batches, _ = _data(full, n=48)  # 3 batches per epoch: resume lands mid-epoch
    train(full, train_data=batches, model=model, tokenizer=tok)
    ref = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    part = _cfg(tmp_path / "b", steps=12, checkpoint_every=4)
    m1, tok1, b1, _ = _data(part, n=48)
    with monkeypatch.context() as m:  # first run: dies right after writing its step-8 checkpoint
        m.setattr(Checkpointer, "save", stop_after_checkpoint(8))
        with pytest.raises(Stop):
            train(part, train_data=b1, model=m1, tokenizer=tok1)
    m2, tok2, b2, _ = _data(part, n=48)
    train(part, train_data=b2, model=m2, tokenizer=tok2)
    got = {n: p.detach() for n, p in m2.named_parameters() if p.requires_grad}
    assert json.loads((Path(part.train.output_dir) / "summary.json").read_text())["steps"] == 12
    for n, t in ref.items():
        torch.testing.assert_close(got[n], t, atol=1e-6, rtol=1e-5, msg=n)


def test_a_resumed_run_chooses_its_step_from_every_validation(tmp_path, monkeypatch):
    """Validations before a kill are checkpointed with their hits: the resumed run's selection noise
    covers all of them, as an uninterrupted run's does, and an older checkpoint's first_val is read."""
    def run(out, die_at=None):
        cfg = _cfg(out, steps=12, checkpoint_every=4, val_every=4)
        model, tok, batches, val = _data(cfg, n=48)
        with monkeypatch.context() as m:
            m.setattr(Checkpointer, "save", stop_after_checkpoint(die_at))
            with contextlib.suppress(Stop):
                train(cfg, train_data=batches, val_data=val, model=model, tokenizer=tok)
        return Path(cfg.train.output_dir)

    ref = json.loads((run(tmp_path / "a") / "summary.json").read_text())["selection"]
    run(tmp_path / "b", die_at=8)
    got = json.loads((run(tmp_path / "b") / "summary.json").read_text())["selection"]
    assert ref["validations"] == 4 and got == ref  # steps 0, 4, 8 and 12
    first = {"step": 4, "hits": {"t2i": [[1]], "i2t": [[0]]}}
    assert TrainState.from_checkpoint({"step": 4, "first_val": first}).val_history == [first]


def test_saved_config_is_the_one_that_ran_after_a_world_size_change(tmp_path):
    """A checkpoint of a 2-process run resumed on one process doubles accum_steps; config.yaml says so."""
    from mmft.rundir import RunDir

    cfg = _cfg(tmp_path, steps=2, checkpoint_every=2)
    model, tok, batches, _ = _data(cfg, n=64)
    train(cfg, train_data=batches, model=model, tokenizer=tok)
    run = RunDir(cfg.train.output_dir)
    assert run.config().train.accum_steps == 1
    path = max(run.checkpoints.glob("step-*.pt"))
    saved = torch.load(path, weights_only=True)
    saved["world_size"], saved["rng"] = 2, [saved["rng"]] * 2  # as two ranks would have written it
    torch.save(saved, path)
    again = _cfg(tmp_path, steps=3, checkpoint_every=2)
    model, tok, batches, _ = _data(again, n=64)
    with pytest.warns(UserWarning, match="accum_steps 1 -> 2"):
        train(again, train_data=batches, model=model, tokenizer=tok)
    assert run.config().train.accum_steps == 2 and run.summary()["steps"] == 3


def test_groups_reach_the_loss(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, steps=2)
    model, _, pv, tok = create_model(cfg.model)
    batches = pair_batches(pv, tok, make_pairs(32), 16, with_groups=True)
    seen = []
    import mmft.loss.contrastive as loss_mod

    real = loss_mod.contrastive_loss

    def spy(*a, group_ids=None, **kw):
        seen.append(group_ids)
        return real(*a, group_ids=group_ids, **kw)

    monkeypatch.setattr(loss_mod, "contrastive_loss", spy)
    train(cfg, train_data=batches, model=model, tokenizer=tok)
    assert seen and all(g is not None and g.shape == (16,) for g in seen)


@pytest.mark.parametrize("precision, want", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             ("fp32", torch.float32)])
def test_the_loss_takes_features_in_the_autocast_dtype(monkeypatch, precision, want):
    """CUDA autocast returns fp32 features (F.normalize's norm runs in fp32): the trainer's loss casts
    them to the run's half dtype, so impl="auto" picks the fused kernels; the cast passes gradients."""
    import mmft.loss.contrastive as loss_mod
    from mmft.training.trainer import pick_loss

    seen = []
    real = loss_mod.contrastive_loss
    monkeypatch.setattr(loss_mod, "contrastive_loss",
                        lambda image_features, text_features, *a, **kw: seen.append(
                            (image_features.dtype, text_features.dtype, kw["extra_text_features"].dtype))
                        or real(image_features.float(), text_features.float(), *a,
                                **dict(kw, extra_text_features=kw["extra_text_features"].float())))
    model, *_ = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))
    _, loss_fn = pick_loss(model, TrainConfig(precision=precision, loss_impl="reference"))
    feats = {k: torch.nn.functional.normalize(torch.randn(n, 8), dim=-1).requires_grad_()
             for k, n in (("image_features", 4), ("text_features", 4), ("extra_text_features", 8))}
    loss_fn({**feats, "logit_scale": torch.tensor(2.0)}).backward()
    assert seen == [(want, want, want)]
    assert all(f.grad is not None and f.grad.dtype == torch.float32 and f.grad.abs().sum() > 0
               for f in feats.values())


def test_accumulation_and_bf16_run(tmp_path):
    cfg = _cfg(tmp_path, steps=3, accum_steps=2, precision="bf16")
    model, tok, batches, _ = _data(cfg, n=96)
    run = train(cfg, train_data=batches, model=model, tokenizer=tok)
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_head_only_on_cached_features(tmp_path):
    """LiT-style alignment: frozen towers, heads trained on features computed once."""
    cfg = Config(model=ModelConfig(image_size=64),
                 lora=LoraConfig(),
                 train=TrainConfig(output_dir=str(tmp_path / "run"), epochs=30, lr=5e-3, warmup_steps=2,
                                   cache_features=True, loss_impl="reference"))
    cfg.lora.image.enabled = cfg.lora.text.enabled = False
    cfg.data.batch_size = 16
    model, _, pv, tok = create_model(cfg.model)
    pairs = make_pairs(48, size=64)
    val = eval_batches(pv, pairs)
    before = retrieval_recall(model, val, tok, "cpu")
    trunk_before = model.visual.trunk.conv_stem.weight.clone()
    run = train(cfg, train_data=val, val_data=val, model=model, tokenizer=tok)
    after = json.loads((run / "summary.json").read_text())["best"]["metrics"]
    assert after["mean_r1"] > before["mean_r1"] + 20, (before, after)
    assert torch.equal(model.visual.trunk.conv_stem.weight, trunk_before)


@pytest.mark.slow
def test_killed_process_resumes_from_its_checkpoint(tmp_path):
    """A real SIGKILL mid-run: the next run continues from the newest checkpoint, which is never
    half-written."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_trainer import _cfg, _data
from mmft.training.trainer import train
from pathlib import Path
cfg = _cfg(Path({str(tmp_path)!r}), steps=400, checkpoint_every=2, keep_checkpoints=2)
model, tok, batches, _ = _data(cfg, n=32)
train(cfg, train_data=batches, model=model, tokenizer=tok)
""")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(ckpts.glob("step-*.pt"))) < 2:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(ckpts.glob("step-*.pt"))
    assert saved, "no checkpoint before the kill"
    step_at_kill = torch.load(saved[-1], weights_only=True)["step"]
    assert 0 < step_at_kill < 400
    from test_trainer import _cfg as cfg_fn

    cfg = cfg_fn(tmp_path, steps=step_at_kill + 4, checkpoint_every=2)
    model, tok, batches, _ = _data(cfg, n=32)
    train(cfg, train_data=batches, model=model, tokenizer=tok)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == step_at_kill + 4 and step_at_kill + 4 in steps
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == step_at_kill + 4


def test_load_model_returns_the_trained_model(tmp_path):
    torch.manual_seed(0)
    base, *_ = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))
    torch.save(base.state_dict(), tmp_path / "base.pt")
    cfg = _cfg(tmp_path, steps=6, val_every=3)
    cfg.model.pretrained = str(tmp_path / "base.pt")
    model, _, pv, tok = create_model(cfg.model)
    pairs = make_pairs(32)
    run = train(cfg, train_data=pair_batches(pv, tok, pairs, 16), val_data=eval_batches(pv, pairs),
                model=model, tokenizer=tok)
    from mmft.model.adapter import load_model

    loaded = load_model(run, adapter="last")
    model.eval()
    x, t = torch.randn(2, 3, 32, 32), tok(["a red square", "a blue circle"])
    with torch.no_grad():
        a, b = model(x, t), loaded.model(x, t)
    assert torch.equal(a["image_features"], b["image_features"])
    assert torch.equal(a["text_features"], b["text_features"])
    assert (run / "adapter-best" / "adapter_config.json").is_file()


def test_package_level_api_is_the_functions():
    # importing modules must not shadow the public functions of the same pipeline stage
    import mmft
    import mmft.embeddings
    import mmft.evaluation.core
    import mmft.model.adapter
    import mmft.training.trainer

    assert mmft.train is mmft.training.trainer.train and mmft.embed is mmft.embeddings.embed
    assert mmft.evaluate is mmft.evaluation.core.evaluate
    assert set(mmft.__all__) >= {"load_config", "create_model", "apply_lora", "merge_lora", "save_adapter",
                                 "load_adapter", "export", "contrastive_loss", "train", "load_model"}


def test_tensorboard_mirrors_the_json_log(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, steps=10, log_every=5, val_every=5, tensorboard=True)
    model, tok, batches, val = _data(cfg)
    run = train(cfg, train_data=batches, val_data=val, model=model, tokenizer=tok)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in records if r["event"] == "train"]
    val_r1 = [(e.step, e.value) for e in acc.Scalars("val/t2i_r1")]
    assert val_r1 == [(r["step"], pytest.approx(r["t2i_r1"])) for r in records if r["event"] == "val"]
    assert "val/best" not in acc.Tags()["scalars"]  # flags are not plotted as numbers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("grad_cache", [False, True], ids=["plain", "grad-cache"])
def test_cuda_bf16_training_with_the_triton_loss(tmp_path, monkeypatch, grad_cache):
    """The whole CUDA step: bf16 autocast, the fused Triton loss (which the spy sees), and gradient caching
    in micro-batches of 4; the model learns as on CPU and its checkpoint loads back on the CPU."""
    from mmft.loss.kernels import infonce_triton as kernel

    dtypes = []  # the feature dtype of each call of the fused kernel
    real = kernel.infonce_triton
    monkeypatch.setattr(kernel, "infonce_triton",
                        lambda a, *r, **kw: dtypes.append(a.dtype) or real(a, *r, **kw))
    cfg = _cfg(tmp_path, steps=40, val_every=20, device="cuda", precision="bf16", loss_impl="triton",
               grad_cache=grad_cache, micro_batch_size=4 if grad_cache else 0)
    run, _ = _train_and_check_it_learned(cfg)
    assert len(dtypes) >= 40 and set(dtypes) == {torch.bfloat16}
    ckpt = torch.load(max((run / "checkpoints").glob("step-*.pt")), map_location="cpu", weights_only=True)
    assert ckpt["step"] == 40
