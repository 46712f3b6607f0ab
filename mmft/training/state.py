"""What a training run carries from step to step, and what its checkpoints and log hold.

`TrainState` is where a run stands (step, epoch, data position, best validation so far); the trainer's
step functions advance it. A checkpoint stores those counters beside the trainable tensors, the
optimizer, scheduler and scaler states and every rank's RNG state, so a resumed run continues exactly
where the killed one stopped. `Checkpointer` writes checkpoints atomically and falls back to an older
one when the newest is unreadable; `RunLog` appends the JSON log (and mirrors it to TensorBoard).

Checkpoints hold only tensors, numbers, strings, lists and dicts (RNG states included), so they load with
`torch.load(weights_only=True)`: a run directory from someone else cannot run code on resume. A newest
checkpoint that is damaged (cut short, bytes flipped: the zip's CRCs tell) is skipped with a warning, and
the run resumes from the one before; one that is intact but holds pickled objects is refused. A write
that fails (disk full, file-size limit) stops the run with one sentence naming the file, and leaves the
previous checkpoint as it was.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import pickle
import random
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmft.io import atomic_path
from mmft.rundir import RunDir

log = logging.getLogger("mmft.training.state")
# The TrainState fields a checkpoint restores (the rest belong to the process that runs).
CHECKPOINTED = ("step", "epoch", "batch_in_epoch", "best", "bad_vals", "last_val", "resumes", "val_history")
# What else a checkpoint must hold (the trainer fills them in).
REQUIRED = ("trainable", "optimizer", "scheduler", "scaler", "rng", "world_size", "accum_steps")
START_OVER = "delete its checkpoints/ folder to start the run over"


class CheckpointError(ValueError):
    """A checkpoint that mmft refuses to resume from (intact, but not a checkpoint it can load safely)."""


class RunWriteError(RuntimeError):
    """A file of the run directory could not be written (disk full, file-size limit, permissions)."""


class DamagedCheckpoint(Exception):
    """A checkpoint whose bytes are damaged; an older one is tried instead."""


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
    last_val: int | None = None  # step of the latest validation (a resumed run does not validate it again)
    resumes: list = field(default_factory=list)  # each resume: its step and the damaged checkpoints skipped
    # every validation's step and per-query hits: gains pair with the first, selection_noise reads them all
    val_history: list = field(default_factory=list)
    # this process's own bookkeeping, not checkpointed
    last_loss: float = math.nan  # global-batch loss of the latest step
    samples: int = 0  # samples trained on by all ranks since this process started
    t_start: float = 0.0  # time.perf_counter() when the loop started

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in CHECKPOINTED}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> TrainState:
        state = cls(**{k: saved[k] for k in CHECKPOINTED if k in saved})
        if "val_history" not in saved and saved.get("first_val"):  # an older mmft kept the first alone
            state.val_history = [saved["first_val"]]
        return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG of this process as tensors, lists and numbers (what weights_only=True loads)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),  # (5056,) uint8
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}  # keys (624,)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def writing(path: Path):
    """Turn a failed write of `path` (disk full, file-size limit, permissions) into one sentence."""
    try:
        yield
    except OSError as e:
        raise RunWriteError(f"could not write {path}: {e.strerror or e} (errno {e.errno}); make room (a full "
                            "disk or a file-size limit?) and run the same command again: it resumes from the "
                            "newest checkpoint") from None


def _refusal(path: Path, error: Exception) -> str:
    found = re.search(r"GLOBAL (\S+)", str(error))
    what = f" (it asks for {found.group(1)})" if found else ""
    return (f"{path} holds pickled Python objects besides tensors{what}; mmft loads checkpoints with "
            f"torch.load(weights_only=True) so that no file can run code; it was written by an older mmft or "
            f"by someone else: {START_OVER}")


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, loaded without running any code.

    Raises DamagedCheckpoint when its bytes are damaged (the zip archive is unreadable or a member fails
    its CRC), CheckpointError when it is intact but holds pickled objects or is not a training checkpoint.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC
    except Exception as e:  # noqa: BLE001 (damage shows as many kinds of error)
        raise DamagedCheckpoint(f"not a readable zip archive: {e}") from None
    if bad is not None:
        raise DamagedCheckpoint(f"its member {bad} fails the CRC check")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_refusal(path, e)) from None
    except Exception as e:  # noqa: BLE001
        raise DamagedCheckpoint(f"{type(e).__name__}: {str(e)[:200]}") from None
    missing = [k for k in (*CHECKPOINTED[:2], *REQUIRED) if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise CheckpointError(f"{path} is not an mmft training checkpoint (it lacks {', '.join(missing)}); "
                              f"{START_OVER}")
    return saved


class Checkpointer:
    """Atomic checkpoints of the trainable state in the run's checkpoints/, keeping the newest `keep`."""

    def __init__(self, run: RunDir, keep: int):
        self.run, self.dir = run, run.checkpoints
        self.keep = max(keep, 1)
        self.skipped: list[dict] = []  # the damaged checkpoints the last `latest()` passed over

    def paths(self) -> list[Path]:
        return self.run.checkpoint_paths()

    def save(self, state: dict, step: int) -> Path:
        path = self.run.checkpoint(step)
        buf = io.BytesIO()
        torch.save(state, buf)  # serialised before writing: a failed write then says why (errno)
        with writing(path), atomic_path(path) as tmp:
            tmp.write_bytes(buf.getbuffer())
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> dict | None:
        """The newest readable checkpoint (None when there is none). Damaged ones are set aside as
        `<name>.damaged` with a warning and listed in `skipped`; a refused one raises CheckpointError."""
        self.skipped = []
        for tmp in self.dir.glob(".step-*.tmp"):  # the temp file of a write that a kill interrupted
            tmp.unlink(missing_ok=True)
        for path in reversed(self.paths()):
            try:
                return read_checkpoint(path)
            except DamagedCheckpoint as e:
                aside = path.with_name(path.name + ".damaged")
                path.replace(aside)
                log.warning("checkpoint %s is damaged (%s); set aside as %s, resuming from the one before",
                            path, e, aside.name)
                self.skipped.append({"checkpoint": path.name, "reason": str(e), "set_aside_as": aside.name})
        return None


class RunLog:
    """log.jsonl of a run (one JSON record per line), mirrored to TensorBoard when train.tensorboard is set.

    Numeric fields of a record become scalars named "<event>/<field>" at the record's step. A resumed run
    first rewinds the log to its checkpoint, so that no step is logged twice.
    """

    def __init__(self, run: RunDir, tensorboard: bool = False):
        self.path, self.writer, self._purge_step = run.log_path, None, None
        self._tensorboard = None  # (SummaryWriter, its folder); the writer opens with the first record
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("train.tensorboard=true needs the tensorboard package: "
                                  "pip install 'mmft[tensorboard]' (or set train.tensorboard=false)") from e
            self._tensorboard = SummaryWriter, str(run.tensorboard)

    def rewind(self, step: int | None) -> int:
        """Drop the records that the run is about to write again; returns how many were dropped.

        step: the checkpoint step the run resumes from (the killed run logged later steps before it died,
        and the resumed run logs them again), or None for a run that starts over (every record with a step
        goes). Lines a kill cut short go too, so the next record starts on a line of its own. The file is
        rewritten atomically; TensorBoard hides the old events from the same step on (its purge_step).
        """
        existed, kept, dropped = self.path.is_file(), [], 0
        for line in self.path.read_bytes().splitlines(keepends=True) if existed else []:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            at = record.get("step") if isinstance(record, dict) else None
            later = at is not None and (step is None or at > step)
            if record is None or later or not line.endswith(b"\n"):
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            with writing(self.path), atomic_path(self.path) as tmp:
                tmp.write_bytes(b"".join(kept))
        if self._tensorboard is not None and (existed or step is not None):
            self.close()  # the next record opens a writer that hides the old events past `step`
            self._purge_step = 0 if step is None else step + 1
        return dropped

    def write(self, record: dict) -> None:
        line = memoryview((json.dumps(record) + "\n").encode())
        with writing(self.path), open(self.path, "ab", buffering=0) as f:
            end = f.tell()
            try:
                while line:  # unbuffered: a short write is retried, a failing one raises here
                    line = line[f.write(line):]
            except OSError:
                f.truncate(end)  # no half line left behind for readers of the log
                raise
        if self._tensorboard is not None:
            if self.writer is None:
                writer_class, folder = self._tensorboard
                self.writer = writer_class(folder, purge_step=self._purge_step)
            for key, value in record.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if key not in ("event", "step") and numeric:
                    self.writer.add_scalar(f"{record['event']}/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
