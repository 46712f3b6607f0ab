"""The trainer: LoRA fine-tuning of a dual encoder, writing a run directory that every later stage reads.

`train` reads like a recipe: set the run up (model with LoRA, data, loss, DDP), read the newest
checkpoint, write the final config, build the optimizer, then epochs of steps, each step maybe
followed by a validation and a checkpoint, and at the end the adapters and the summary. The state
that moves between steps is a `TrainState`; the fixed parts of the run are a `Setup`. What the run
directory holds and what its files are called: mmft.rundir.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmft import distributed as dist_utils
from mmft.config import Config
from mmft.model.adapter import load_adapter, save_adapter
from mmft.model.factory import create_model, enable_activation_checkpointing, uses_sigmoid_loss
from mmft.model.lora import (
    TrainableSummary,
    apply_lora,
    has_adapter,
    train_mode,
    trainable_summary,
)
from mmft.rundir import RunDir
from mmft.training.forward import PairEncoder, device_normalize, plain_backward, step_inputs
from mmft.training.grad_cache import grad_cache_backward
from mmft.training.optim import autocast_for, lr_lambda, optimizer_step, param_groups
from mmft.training.remine import maybe_remine
from mmft.training.state import (
    START_OVER,
    Checkpointer,
    CheckpointError,
    RunLog,
    TrainState,
    rng_state,
    seed_everything,
    set_rng_state,
    trainable_state,
    writing,
)
from mmft.training.validate import paired_gain, selection_noise, validation_scores

log = logging.getLogger("mmft.training.trainer")


def pick_loss(model: torch.nn.Module, cfg):
    from mmft.loss.contrastive import contrastive_loss, sigmoid_loss

    kind = cfg.loss
    if kind == "auto":
        kind = "sigmoid" if uses_sigmoid_loss(model) else "infonce"
    if kind not in ("infonce", "sigmoid"):
        raise ValueError(f"train.loss must be auto, infonce or sigmoid, not '{kind}'")
    fn = sigmoid_loss if kind == "sigmoid" else contrastive_loss
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def loss(out: dict, **groups) -> torch.Tensor:
        if half is not None:
            # CUDA autocast hands back fp32 features (F.normalize's norm runs in fp32); the loss takes them
            # in the autocast dtype, the precision autocast gives open_clip's own logit matmul, so that
            # impl="auto" picks the fused kernels. The cast is differentiable: gradients reach fp32 leaves.
            out = {k: v.to(half) if k.endswith("_features") else v for k, v in out.items()}
        return fn(**out, **groups, impl=cfg.loss_impl)

    return kind, loss


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


def _build_data(cfg: Config, preprocess_val, tokenizer, device: torch.device, train_data, val_data):
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


# ---------------------------------------------------------------- the fixed parts of a run


@dataclass
class Setup:
    """Everything a run fixes before its first step (the optimizer once the run length is known)."""

    cfg: Config
    run: RunDir
    device: torch.device
    rank: int
    world: int
    model: torch.nn.Module  # the adapted model (what is validated and saved)
    ddp_model: torch.nn.Module  # what the steps call: DDP-wrapped, head-only on cached features
    tokenizer: Any
    train_data: Iterable
    val_data: Iterable | None
    loss_kind: str
    loss_fn: Callable
    params: TrainableSummary
    ckpt: Checkpointer
    log: RunLog | None  # rank 0 only
    total_steps: int = 0
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    progress: Any = None
    preprocess_val: Any = None  # the eval image transform (re-mining embeds with it)
    mined_epoch: int = 0  # the epoch whose re-mined negatives the stream holds (0 = data.hard_negatives)
    normalize: Any = None  # uint8 images -> normalised float on the device (data.uint8_images)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _build_model(cfg: Config, model, tokenizer, device: torch.device):
    """(model with LoRA on `device`, eval preprocess, tokenizer, trainable summary); None creates one."""
    preprocess_val = None
    if model is None:
        model, _, preprocess_val, tokenizer = create_model(cfg.model, device=device)
    params = trainable_summary(model) if has_adapter(model) else apply_lora(model, cfg.lora)
    if cfg.train.init_adapter:
        load_adapter(model, cfg.train.init_adapter, partial=True)
    model.to(device)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model, preprocess_val, tokenizer, params


def _setup(cfg: Config, train_data, val_data, model, tokenizer) -> Setup:
    tcfg = cfg.train
    rank, world = dist_utils.rank_world()
    device = dist_utils.device_for_rank(dist_utils.resolve_device(tcfg.device))
    run = RunDir(tcfg.output_dir)
    if rank == 0:
        run.path.mkdir(parents=True, exist_ok=True)
    seed_everything(tcfg.seed)
    model, preprocess_val, tokenizer, params = _build_model(cfg, model, tokenizer, device)
    if rank == 0:
        log.info("%s", params)
    forward_model = model
    if tcfg.cache_features and cfg.data.hard_negatives:
        raise ValueError("train.cache_features trains heads on cached pair features, which have no room for "
                         "data.hard_negatives; unset one of them")
    if tcfg.cache_features:
        from mmft.training.feature_cache import HeadOnly, cached_head_data

        train_data = cached_head_data(model, cfg, train_data, tokenizer, device, preprocess_val)
        forward_model = HeadOnly(model)
    train_data, val_data = _build_data(cfg, preprocess_val, tokenizer, device, train_data, val_data)
    loss_kind, loss_fn = pick_loss(model, tcfg)
    normalize = device_normalize(cfg.data, preprocess_val, model)
    return Setup(cfg=cfg, run=run, device=device, rank=rank, world=world, model=model,
                 ddp_model=dist_utils.wrap_ddp(PairEncoder(forward_model), device), tokenizer=tokenizer,
                 train_data=train_data, val_data=val_data, loss_kind=loss_kind, loss_fn=loss_fn,
                 params=params, ckpt=Checkpointer(run, tcfg.keep_checkpoints),
                 log=RunLog(run, tcfg.tensorboard) if rank == 0 else None, preprocess_val=preprocess_val,
                 normalize=normalize)


def _read_checkpoint(s: Setup) -> tuple[dict | None, bool]:
    """(newest checkpoint or None, same world size). Rank 0 reads it and sends it to every rank, so all
    resume from the same one (even without a shared file system); a new world size changes
    train.accum_steps to keep the global batch."""
    if not s.cfg.train.resume:
        return None, True
    saved = dist_utils.broadcast_object(s.ckpt.latest() if s.is_main else None)
    if saved is None:
        return None, True
    same = dist_utils.check_resume_world(saved["world_size"], saved["accum_steps"], s.world, s.cfg.train)
    return saved, same


def _build_optimizer(s: Setup) -> None:
    """The run length (needs the final accum_steps), AdamW, the LR schedule and the fp16 grad scaler."""
    tcfg = s.cfg.train
    per_epoch = _num_batches(s.train_data, s.cfg)
    s.total_steps = tcfg.steps or (math.ceil(tcfg.epochs * per_epoch / tcfg.accum_steps) if per_epoch else 0)
    if s.total_steps <= 0:
        raise ValueError("cannot tell the run length: set train.steps, or give data with a known length")
    s.optimizer = torch.optim.AdamW(param_groups(s.model, tcfg), betas=tuple(tcfg.betas), eps=tcfg.eps)
    schedule = lr_lambda(s.total_steps, tcfg.warmup_steps, tcfg.min_lr_ratio)
    s.scheduler = torch.optim.lr_scheduler.LambdaLR(s.optimizer, schedule)
    s.scaler = torch.amp.GradScaler("cuda", enabled=tcfg.precision == "fp16" and s.device.type == "cuda")


# ---------------------------------------------------------------- checkpoints


def _checkpoint(s: Setup, st: TrainState) -> dict:
    """What a checkpoint holds. Every rank calls it: the RNG states of all ranks are gathered."""
    return {"trainable": trainable_state(s.model), "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(), **st.counters(),
            "rng": dist_utils.gather_objects(rng_state()), "world_size": s.world,
            "accum_steps": s.cfg.train.accum_steps}


def _restore(s: Setup, saved: dict, same_world: bool) -> TrainState:
    """Load a checkpoint into the model, optimizer, scheduler, scaler and RNGs; return its TrainState."""
    params = {n: p for n, p in s.model.named_parameters() if p.requires_grad}
    shapes = {n: tuple(t.shape) for n, t in saved["trainable"].items()}
    if shapes != {n: tuple(p.shape) for n, p in params.items()}:
        raise CheckpointError(f"the newest checkpoint in {s.run.checkpoints} holds {len(shapes)} trainable "
                              f"tensors that do not fit this run's {len(params)} "
                              f"(another model or LoRA layout?); {START_OVER}, or set train.output_dir to "
                              "a new folder")
    with torch.no_grad():
        for n, t in saved["trainable"].items():
            params[n].copy_(t)
    s.optimizer.load_state_dict(saved["optimizer"])
    s.scheduler.load_state_dict(saved["scheduler"])
    s.scaler.load_state_dict(saved["scaler"])
    st = TrainState.from_checkpoint(saved)
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    set_rng_state(rngs[s.rank] if same_world else rngs[0])
    if not same_world:
        st.batch_in_epoch = 0  # per-rank positions do not carry over to another world size
    if s.is_main:
        log.info("resumed from step %d (epoch %d, batch %d)", st.step, st.epoch, st.batch_in_epoch)
    return st


def _note_resume(s: Setup, st: TrainState, saved: dict | None) -> None:
    """Record a resume, and the damaged checkpoints it passed over, in summary.json and log.jsonl (rank 0
    knows them). The log first loses what the killed run wrote past the checkpoint (this run writes those
    steps again); a run that starts from scratch keeps no record of an earlier attempt's steps."""
    if not s.is_main:
        return
    dropped = s.log.rewind(st.step if saved is not None else None)
    if saved is not None or s.ckpt.skipped:
        resume = {"step": st.step, "from": s.run.checkpoint(st.step).name if saved else None,
                  "skipped": s.ckpt.skipped}
        st.resumes.append(resume)
        s.log.write({"event": "resume", **resume, "log_records_dropped": dropped})


def _save_adapter(s: Setup, which: str) -> None:
    path = s.run.adapter(which)
    with writing(path):
        save_adapter(s.model, path)


def _maybe_checkpoint(s: Setup, st: TrainState, force: bool) -> None:
    """Checkpoint every train.checkpoint_every steps, after each validation, and when `force`d (the end)."""
    every = s.cfg.train.checkpoint_every
    if (every and st.step % every == 0) or st.last_val == st.step or force:
        state = _checkpoint(s, st)
        if s.is_main:
            s.ckpt.save(state, st.step)
        dist_utils.barrier()


# ---------------------------------------------------------------- steps


def _validate(s: Setup, st: TrainState) -> bool:
    """Score the validation set and keep the best adapter; True when early stopping triggers."""
    tcfg = s.cfg.train
    st.last_val = st.step
    if s.val_data is None or s.tokenizer is None:
        return False
    metrics = {}
    if s.is_main:
        metrics, hits = validation_scores(s.model, s.val_data, s.tokenizer, s.device)
        if st.val_history:  # what validation can see of the change since the run's first validation
            first = st.val_history[0]
            metrics.update(paired_gain(hits, first["hits"]), gain_since=first["step"])
        st.val_history.append({"step": st.step, "hits": hits})
    metrics = dist_utils.broadcast_object(metrics)
    score = metrics[tcfg.val_metric]
    improved = score > st.best["score"]
    if improved:
        st.best, st.bad_vals = {"score": score, "step": st.step, "metrics": metrics}, 0
        if s.is_main:
            _save_adapter(s, "best")
    else:
        st.bad_vals += 1
    if s.is_main:
        s.log.write({"event": "val", "step": st.step, **metrics, "best": improved})
    train_mode(s.model)
    return bool(tcfg.early_stop_patience and st.bad_vals >= tcfg.early_stop_patience)


def _maybe_validate(s: Setup, st: TrainState) -> bool:
    """Validate every train.val_every steps; True when early stopping triggers."""
    every = s.cfg.train.val_every
    return bool(every and st.step % every == 0) and _validate(s, st)


def _forward_backward(s: Setup, st: TrainState, batch: dict, last_micro: bool) -> torch.Tensor:
    """Loss and gradients of one micro-batch (accumulated into .grad); returns the loss."""
    tcfg = s.cfg.train
    # images (B, 3, S, S), texts (B, L), extras (B, K, ...), on the device
    inputs, groups = step_inputs(batch, s.device, tcfg.use_groups, s.normalize)

    def sync(last: bool):
        # DDP all-reduces gradients on the last backward of an accumulation only; the earlier ones add
        # to the local .grad, which the last reduction then averages with the rest.
        done = (last and last_micro) or not hasattr(s.ddp_model, "no_sync")
        return contextlib.nullcontext() if done else s.ddp_model.no_sync()

    def autocast():
        return autocast_for(s.device, tcfg.precision)

    def scale_loss(loss):
        return s.scaler.scale(loss / tcfg.accum_steps)

    if tcfg.grad_cache:
        loss = grad_cache_backward(s.ddp_model, s.loss_fn, inputs, groups, tcfg.micro_batch_size,
                                   autocast=autocast, scale_loss=scale_loss, sync=sync, device=s.device)
    else:
        with sync(True):
            loss = plain_backward(s.ddp_model, s.loss_fn, inputs, groups, autocast, scale_loss)
    st.samples += inputs["images"].shape[0] * s.world
    return loss


def _step(s: Setup, st: TrainState, loss: torch.Tensor) -> None:
    """Apply the accumulated gradients, count the step and report it (progress bar, log.jsonl)."""
    tcfg = s.cfg.train
    optimizer_step(s.model, s.optimizer, s.scheduler, s.scaler, tcfg.grad_clip)
    st.step += 1
    st.last_loss = dist_utils.mean_over_ranks(loss.detach())  # the global-batch loss
    sps = st.samples / max(time.perf_counter() - st.t_start, 1e-9)
    skipped = getattr(s.train_data, "stats", None)
    s.progress.update(1)
    s.progress.set_postfix(loss=f"{st.last_loss:.4f}", sps=f"{sps:.1f}",
                           **({"skipped": skipped.total} if skipped is not None and skipped.total else {}))
    if s.is_main and (st.step % tcfg.log_every == 0 or st.step == s.total_steps):
        s.log.write({"event": "train", "step": st.step, "epoch": st.epoch, "loss": st.last_loss,
                     "lr": s.scheduler.get_last_lr()[0], "samples_per_s": sps,
                     "logit_scale": s.model.logit_scale.exp().item(),
                     **({"skipped": dict(skipped.counts)} if skipped is not None else {})})


def _train_epoch(s: Setup, st: TrainState) -> bool:
    """The rest of the current epoch, step by step; True when the run is over (length or early stop)."""
    accum = s.cfg.train.accum_steps
    seen = micro = 0
    maybe_remine(s, st.epoch)
    for batch in _epoch_batches(s.train_data, st.epoch, st.batch_in_epoch):
        seen += 1
        st.batch_in_epoch += 1
        loss = _forward_backward(s, st, batch, last_micro=micro + 1 == accum)
        micro += 1
        if micro < accum:
            continue
        micro = 0
        _step(s, st, loss)
        early = _maybe_validate(s, st)
        stop = st.step >= s.total_steps or early
        _maybe_checkpoint(s, st, force=stop)
        if stop:
            return True
    if seen == 0 and st.batch_in_epoch == 0:
        raise ValueError("the training data yielded no batches")
    st.epoch, st.batch_in_epoch = st.epoch + 1, 0
    return False


def _finish(s: Setup, st: TrainState) -> None:
    """adapter-last (and adapter-best when no validation kept one), then summary.json, the run's last file."""
    elapsed = time.perf_counter() - st.t_start
    if s.is_main:
        selection = selection_noise(st.val_history, s.cfg.train.val_metric, st.best["step"])
        if selection:
            s.log.write({"event": "selection", "step": st.step, **selection})
        s.log.close()
        _save_adapter(s, "last")
        if st.best["step"] is None:
            _save_adapter(s, "best")
        skipped = getattr(s.train_data, "stats", None)
        with writing(s.run.summary_path):
            _write_summary(s, st, elapsed, skipped, selection)
    dist_utils.barrier()


def _write_summary(s: Setup, st: TrainState, elapsed: float, skipped, selection: dict) -> None:
    """summary.json: what the run did, how fast, what it skipped, how often it was resumed, and how sure
    the choice of the best step is (validate.selection_noise)."""
    s.run.write_summary({
        "steps": st.step, "epochs_completed": st.epoch, "loss": st.last_loss, "loss_kind": s.loss_kind,
        "samples_per_s": st.samples / max(elapsed, 1e-9), "train_seconds": elapsed, "world_size": s.world,
        "trainable_parameters": s.params.trainable, "total_parameters": s.params.total,
        "trainable_share": s.params.share, "best": st.best,
        "skipped": dict(skipped.counts) if skipped is not None else {}, "resumes": st.resumes,
        "selection": selection,
    })


# ---------------------------------------------------------------- the recipe


def train(cfg: Config, *, train_data: Iterable | None = None, val_data: Iterable | None = None,
          model: torch.nn.Module | None = None, tokenizer=None) -> Path:
    """Fine-tune per `cfg` and return the run directory.

    `train_data` is any re-iterable of batches {"image": (B,3,S,S), "text": (B,L) int64[, "group": (B,)]}
    (default: the WebDataset pipeline over cfg.data.train); `val_data` an iterable of eval batches
    {"image": (B,3,S,S), "captions": list[list[str]]} (default: cfg.data.val). Resumes from the newest
    checkpoint in cfg.train.output_dir when cfg.train.resume is set.
    """
    s = _setup(cfg, train_data, val_data, model, tokenizer)
    saved, same_world = _read_checkpoint(s)
    if s.is_main:
        with writing(s.run.config_path):
            s.run.write_config(cfg)  # after the checkpoint may have changed accum_steps: the config that runs
    _build_optimizer(s)
    st = _restore(s, saved, same_world) if saved is not None else TrainState()
    _note_resume(s, st, saved)
    if st.step == 0 and cfg.train.val_every:
        _validate(s, st)  # the starting point's score: the bar every later step must beat
    s.progress = dist_utils.progress(s.total_steps, initial=st.step, enabled=s.is_main)
    train_mode(s.model)
    st.t_start = time.perf_counter()
    done = st.step >= s.total_steps
    try:
        while not done:
            done = _train_epoch(s, st)
    finally:
        s.progress.close()  # before any error message, so that the message is the last line a user sees
    if st.last_val != st.step:
        _validate(s, st)
    _finish(s, st)
    return s.run.path
