"""The trainer: LoRA fine-tuning of a dual encoder, writing a run directory that every later stage reads.

Run directory:
    config.yaml          the resolved config (load_model rebuilds the model from it)
    log.jsonl            one JSON line per log/validation event
    checkpoints/         step-XXXXXXXX.pt: trainable tensors, optimizer, scheduler, step, RNG, data position
    adapter-best/        adapter of the best validation score (or of the end when there is no validation)
    adapter-last/        adapter at the end of training
    summary.json         final metrics, skipped samples by reason, speed, trainable parameters
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mmft import distributed as dist_utils
from mmft.model.adapter import save_adapter
from mmft.config import Config, to_dict
from mmft.io import atomic_path, write_json
from mmft.model.lora import apply_lora, train_mode, trainable_summary
from mmft.model.factory import create_model, uses_sigmoid_loss
from mmft.training.validate import retrieval_recall

log = logging.getLogger("mmft.training.trainer")
RUN_CONFIG = "config.yaml"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_groups(model: torch.nn.Module, cfg) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and the temperature; head_lr for fully trained tensors."""
    full = set(model.mmft_lora["full"]) if getattr(model, "mmft_lora", None) else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "logit_scale" in name or "logit_bias" in name or "norm" in name.lower()
        is_head = name in full
        groups.setdefault((no_decay, is_head), []).append(p)
    out = []
    for (no_decay, is_head), params in sorted(groups.items()):
        lr = cfg.head_lr if (is_head and cfg.head_lr > 0) else cfg.lr
        out.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    return out


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warmup then cosine decay to min_ratio of the peak."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return fn


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"train.precision must be fp32, bf16 or fp16, not '{precision}'")
    return torch.autocast(device.type, dtype=dtype)


def pick_loss(model: torch.nn.Module, cfg):
    from mmft.loss.contrastive import contrastive_loss, sigmoid_loss

    kind = cfg.loss
    if kind == "auto":
        kind = "sigmoid" if uses_sigmoid_loss(model) else "infonce"
    if kind not in ("infonce", "sigmoid"):
        raise ValueError(f"train.loss must be auto, infonce or sigmoid, not '{kind}'")
    fn = sigmoid_loss if kind == "sigmoid" else contrastive_loss
    return kind, lambda out, groups: fn(**out, group_ids=groups, impl=cfg.loss_impl)


class Checkpointer:
    """Atomic checkpoints of the trainable state, keeping the newest `keep`."""

    def __init__(self, run_dir: Path, keep: int):
        self.dir = run_dir / "checkpoints"
        self.keep = max(keep, 1)

    def paths(self) -> list[Path]:
        return sorted(self.dir.glob("step-*.pt"))

    def save(self, state: dict, step: int) -> Path:
        path = self.dir / f"step-{step:08d}.pt"
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> dict | None:
        for path in reversed(self.paths()):
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001 (a damaged file raises many kinds): fall back to the previous one
                log.warning("checkpoint %s is unreadable (%s); trying an older one", path, e)
        return None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_step(model, optimizer, scheduler, scaler, grad_clip: float) -> None:
    """Unscale, clip, step, schedule; then clamp the temperature as CLIP does (logits stay <= 100)."""
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


def _epoch_batches(data, epoch: int, skip: int) -> Iterable:
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch)
    it = iter(data)
    for _ in range(skip):
        next(it, None)
    return it


def _num_batches(data, cfg: Config) -> int | None:
    try:
        return len(data)
    except TypeError:
        n = cfg.data.epoch_samples // cfg.data.batch_size
        return n or None


class RunLog:
    """log.jsonl of a run (one JSON record per line), mirrored to TensorBoard when train.tensorboard is set.

    Numeric fields of a record become scalars named "<event>/<field>" at the record's step.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path, self.writer = run_dir / "log.jsonl", None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("train.tensorboard=true needs the tensorboard package: "
                                  "pip install 'mmft[tensorboard]' (or set train.tensorboard=false)") from e
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("event", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{record['event']}/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _build_data(cfg: Config, model, preprocess_train, preprocess_val, tokenizer, device, train_data, val_data):
    from mmft.data import stream as data_mod

    if train_data is None:
        if not cfg.data.train:
            raise ValueError("no training data: set data.train to shard specs or pass train_data=")
        transform = data_mod.make_train_transform(preprocess_val, cfg.data)  # augmentation from cfg.data
        train_data = data_mod.train_loader(cfg.data, transform, tokenizer, seed=cfg.train.seed,
                                           device_type=device.type)
    if val_data is None and cfg.data.val:
        val_data = data_mod.eval_loader(cfg.data.val, cfg.data, preprocess_val)
    return train_data, val_data


def train(cfg: Config, *, train_data: Iterable | None = None, val_data: Iterable | None = None,
          model: torch.nn.Module | None = None, tokenizer=None) -> Path:
    """Fine-tune per `cfg` and return the run directory.

    `train_data` is any re-iterable of batches {"image": (B,3,S,S), "text": (B,L) int64[, "group": (B,)]}
    (default: the WebDataset pipeline over cfg.data.train); `val_data` an iterable of eval batches
    {"image": (B,3,S,S), "captions": list[list[str]]} (default: cfg.data.val). Resumes from the newest
    checkpoint in cfg.train.output_dir when cfg.train.resume is set.
    """
    tcfg = cfg.train
    rank, world = dist_utils.rank_world()
    device = dist_utils.device_for_rank(resolve_device(tcfg.device))
    run_dir = Path(tcfg.output_dir)
    is_main = rank == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / RUN_CONFIG) as tmp:
            tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    seed_everything(tcfg.seed)

    if model is None:
        model, preprocess_train, preprocess_val, tokenizer = create_model(cfg.model, device=device)
    else:
        preprocess_train = preprocess_val = None
    summary_params = apply_lora(model, cfg.lora) if getattr(model, "mmft_lora", None) is None else trainable_summary(model)
    if tcfg.init_adapter:
        from mmft.model.adapter import load_adapter

        load_adapter(model, tcfg.init_adapter, partial=True)
    model.to(device)
    if tcfg.activation_checkpointing:
        from mmft.model.factory import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    if is_main:
        log.info("%s", summary_params)
    forward_model = model
    if tcfg.cache_features:
        from mmft.training.feature_cache import HeadOnly, cached_head_data

        train_data = cached_head_data(model, cfg, train_data, tokenizer, device, preprocess_val)
        forward_model = HeadOnly(model)
    train_data, val_data = _build_data(cfg, model, preprocess_train, preprocess_val, tokenizer, device,
                                       train_data, val_data)
    loss_kind, loss_fn = pick_loss(model, tcfg)
    ddp_model = dist_utils.wrap_ddp(forward_model, device)

    ckpt = Checkpointer(run_dir, tcfg.keep_checkpoints)
    run_log = RunLog(run_dir, tcfg.tensorboard) if is_main else None
    # Rank 0 reads the checkpoint and sends it to every rank, so all resume from the same one (even
    # without a shared file system); a new world size changes accum_steps before the length is derived.
    state = dist_utils.broadcast_object(ckpt.latest() if is_main else None) if tcfg.resume else None
    if state is not None:
        same_world = dist_utils.check_resume_world(state["world_size"], state["accum_steps"], world, tcfg)
    per_epoch = _num_batches(train_data, cfg)
    total_steps = tcfg.steps or (math.ceil(tcfg.epochs * per_epoch / tcfg.accum_steps) if per_epoch else 0)
    if total_steps <= 0:
        raise ValueError("cannot tell the run length: set train.steps, or give data with a known length")
    optimizer = torch.optim.AdamW(param_groups(model, tcfg), betas=tuple(tcfg.betas), eps=tcfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, tcfg.warmup_steps, tcfg.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda", enabled=tcfg.precision == "fp16" and device.type == "cuda")

    step, epoch, batch_in_epoch = 0, 0, 0
    best = {"score": -math.inf, "step": None, "metrics": None}
    bad_vals, last_val = 0, None
    if state is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        best, bad_vals = state["best"], state["bad_vals"]
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        set_rng_state(rngs[rank] if same_world else rngs[0])
        if not same_world:
            batch_in_epoch = 0  # per-rank positions do not carry over to another world size
        if is_main:
            log.info("resumed from step %d (epoch %d, batch %d)", step, epoch, batch_in_epoch)

    def make_state() -> dict:
        return {"trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "best": best, "bad_vals": bad_vals,
                "rng": dist_utils.gather_objects(rng_state()), "world_size": world,
                "accum_steps": tcfg.accum_steps}

    def validate() -> bool:
        """Run validation, keep the best adapter; return True when early stopping triggers."""
        nonlocal best, bad_vals
        if val_data is None or tokenizer is None:
            return False
        metrics = retrieval_recall(model, val_data, tokenizer, device) if is_main else {}
        metrics = dist_utils.broadcast_object(metrics)
        score = metrics[tcfg.val_metric]
        improved = score > best["score"]
        if improved:
            best, bad_vals = {"score": score, "step": step, "metrics": metrics}, 0
            if is_main:
                save_adapter(model, run_dir / "adapter-best")
        else:
            bad_vals += 1
        if is_main:
            run_log.write({"event": "val", "step": step, **metrics, "best": improved})
        train_mode(model)
        return bool(tcfg.early_stop_patience and bad_vals >= tcfg.early_stop_patience)

    if step == 0 and tcfg.val_every:
        validate()  # the starting point's score: the bar every later step must beat
        last_val = 0
    progress = dist_utils.progress(total_steps, initial=step, enabled=is_main)
    train_mode(model)
    samples, t_start = 0, time.perf_counter()
    last_loss = float("nan")
    stop = step >= total_steps
    while not stop:
        seen = 0
        micro = 0
        for batch in _epoch_batches(train_data, epoch, batch_in_epoch):
            seen += 1
            batch_in_epoch += 1
            images = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
            texts = batch["text"].to(device, non_blocking=True)  # (B, L)
            groups = batch.get("group") if tcfg.use_groups else None
            groups = groups.to(device) if groups is not None else None
            # DDP all-reduces gradients on the last micro-step of an accumulation only; the earlier ones add
            # to the local .grad, which the last reduction then averages with the rest.
            sync = micro + 1 == tcfg.accum_steps or not hasattr(ddp_model, "no_sync")
            with contextlib.nullcontext() if sync else ddp_model.no_sync():
                with autocast_for(device, tcfg.precision):
                    out = ddp_model(images, texts)
                loss = loss_fn({k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}, groups)
                scaler.scale(loss / tcfg.accum_steps).backward()
            samples += images.shape[0] * world
            micro += 1
            if micro < tcfg.accum_steps:
                continue
            micro = 0
            optimizer_step(model, optimizer, scheduler, scaler, tcfg.grad_clip)
            step += 1
            last_loss = dist_utils.mean_over_ranks(loss.detach())  # the global-batch loss
            elapsed = time.perf_counter() - t_start
            skipped = getattr(train_data, "stats", None)
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}", sps=f"{samples / max(elapsed, 1e-9):.1f}",
                                 **({"skipped": skipped.total} if skipped is not None and skipped.total else {}))
            if is_main and (step % tcfg.log_every == 0 or step == total_steps):
                run_log.write({"event": "train", "step": step, "epoch": epoch, "loss": last_loss,
                                    "lr": scheduler.get_last_lr()[0], "samples_per_s": samples / max(elapsed, 1e-9),
                                    "logit_scale": model.logit_scale.exp().item(),
                                    **({"skipped": dict(skipped.counts)} if skipped is not None else {})})
            early = False
            if tcfg.val_every and step % tcfg.val_every == 0:
                early, last_val = validate(), step
            at_ckpt = (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or last_val == step
            stop = step >= total_steps or early
            if at_ckpt or stop:
                st = make_state()
                if is_main:
                    ckpt.save(st, step)
                dist_utils.barrier()
            if stop:
                break
        else:
            if seen == 0 and batch_in_epoch == 0:
                raise ValueError("the training data yielded no batches")
            epoch, batch_in_epoch = epoch + 1, 0
    progress.close()

    if last_val != step:
        validate()
    elapsed = time.perf_counter() - t_start
    if is_main:
        run_log.close()
        save_adapter(model, run_dir / "adapter-last")
        if best["step"] is None:
            save_adapter(model, run_dir / "adapter-best")
        skipped = getattr(train_data, "stats", None)
        write_json(run_dir / "summary.json", {
            "steps": step, "epochs_completed": epoch, "loss": last_loss, "loss_kind": loss_kind,
            "samples_per_s": samples / max(elapsed, 1e-9), "train_seconds": elapsed, "world_size": world,
            "trainable_parameters": summary_params.trainable, "total_parameters": summary_params.total,
            "trainable_share": summary_params.share, "best": best,
            "skipped": dict(skipped.counts) if skipped is not None else {},
        })
    dist_utils.barrier()
    return run_dir


def run_config(run_dir: str | Path) -> dict[str, Any]:
    return yaml.safe_load((Path(run_dir) / RUN_CONFIG).read_text())
