"""What a training run carries from step to step, and what its checkpoints and log hold.

`TrainState` is where a run stands (step, epoch, data position, best validation so far); the trainer's
step functions advance it. A checkpoint stores those counters beside the trainable tensors, the
optimizer, scheduler and scaler states and every rank's RNG state, so a resumed run continues exactly
where the killed one stopped. `Checkpointer` writes checkpoints atomically and falls back to an older
one when the newest is unreadable; `RunLog` appends the JSON log (and mirrors it to TensorBoard).
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmft.io import atomic_path
from mmft.rundir import RunDir

log = logging.getLogger("mmft.training.state")
# The TrainState fields a checkpoint restores (the rest belong to the process that runs).
CHECKPOINTED = ("step", "epoch", "batch_in_epoch", "best", "bad_vals")


def _no_best() -> dict:
    return {"score": -math.inf, "step": None, "metrics": None}


@dataclass
class TrainState:
    """Where a run stands. Steps count optimizer steps; batches count micro-batches of this rank."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained on (skipped on resume)
    best: dict = field(default_factory=_no_best)  # the best validation: score, step, metrics
    bad_vals: int = 0  # validations in a row without improvement (early stopping)
    # this process's own bookkeeping, not checkpointed
    last_val: int | None = None  # step of the latest validation
    last_loss: float = math.nan  # global-batch loss of the latest step
    samples: int = 0  # samples trained on by all ranks since this process started
    t_start: float = 0.0  # time.perf_counter() when the loop started

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in CHECKPOINTED}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> TrainState:
        return cls(**{k: saved[k] for k in CHECKPOINTED})


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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


class Checkpointer:
    """Atomic checkpoints of the trainable state in the run's checkpoints/, keeping the newest `keep`."""

    def __init__(self, run: RunDir, keep: int):
        self.dir = run.checkpoints
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
            except Exception as e:  # noqa: BLE001 (a damaged file raises many kinds): try the previous one
                log.warning("checkpoint %s is unreadable (%s); trying an older one", path, e)
        return None


class RunLog:
    """log.jsonl of a run (one JSON record per line), mirrored to TensorBoard when train.tensorboard is set.

    Numeric fields of a record become scalars named "<event>/<field>" at the record's step.
    """

    def __init__(self, run: RunDir, tensorboard: bool = False):
        self.path, self.writer = run.log_path, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("train.tensorboard=true needs the tensorboard package: "
                                  "pip install 'mmft[tensorboard]' (or set train.tensorboard=false)") from e
            self.writer = SummaryWriter(str(run.tensorboard))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if key not in ("event", "step") and numeric:
                    self.writer.add_scalar(f"{record['event']}/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
