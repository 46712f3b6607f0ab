"""The run directory: what one training run leaves behind, and the one module that knows its names.

    run = RunDir("runs/x")
    cfg = run.config()            # the resolved config the run trained with
    run.adapter("best")           # runs/x/adapter-best
    run.is_complete()             # summary.json is written last, so it marks a finished run

Layout:
    config.yaml     the resolved config, written once it is final (load_model rebuilds the model from it)
    log.jsonl       one JSON line per log/validation event (tensorboard/ beside it with train.tensorboard)
    checkpoints/    step-XXXXXXXX.pt: trainable tensors, optimizer, scheduler, step, RNG, data position
    adapter-best/   adapter of the best validation score (or of the end when there is no validation)
    adapter-last/   adapter at the end of training
    summary.json    final metrics, skipped samples by reason, speed, trainable parameters (written last)
    mined/          epoch-XXXX.jsonl: hard negatives re-mined with the model being trained (data.remine_every)
    index/, eval/   where `mmft index build` and `mmft eval` write by default

The trainer writes a run directory through this class and every later stage (model loading,
evaluation, indexing, the demo) reads it through it, so readers never import the trainer and a
file name changes in one place.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from mmft.config import Config, load_config, to_dict
from mmft.io import atomic_path, write_json

ADAPTERS = ("best", "last")


def _entry(name: str, doc: str) -> property:
    """A path inside the run directory, as a read-only attribute."""
    return property(lambda self: self.path / name, doc=doc)


class RunDir:
    """Paths and readers of one run directory (nothing is created until a writer is called)."""

    CONFIG, LOG, SUMMARY = "config.yaml", "log.jsonl", "summary.json"
    CHECKPOINTS, TENSORBOARD, INDEX, EVAL, MINED = "checkpoints", "tensorboard", "index", "eval", "mined"

    config_path = _entry(CONFIG, "the resolved config")
    log_path = _entry(LOG, "the JSON log, one record per line")
    summary_path = _entry(SUMMARY, "the summary of a finished run")
    checkpoints = _entry(CHECKPOINTS, "the folder of step-XXXXXXXX.pt checkpoints")
    tensorboard = _entry(TENSORBOARD, "the TensorBoard event folder (train.tensorboard)")
    index_dir = _entry(INDEX, "where `mmft index build --run` puts the index unless told otherwise")
    eval_dir = _entry(EVAL, "where `mmft eval` writes its report unless told otherwise")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir('{self.path}')"

    def __fspath__(self) -> str:
        return str(self.path)

    def adapter(self, which: str = "best") -> Path:
        """adapter-best/ or adapter-last/ (whether or not it exists yet)."""
        if which not in ADAPTERS:
            raise ValueError(f"a run keeps the adapters {ADAPTERS}, not {which!r}")
        return self.path / f"adapter-{which}"

    def mined(self, epoch: int) -> Path:
        """mined/epoch-XXXX.jsonl: the negatives re-mined before `epoch` (data.remine_every)."""
        return self.path / self.MINED / f"epoch-{epoch:04d}.jsonl"

    def checkpoint(self, step: int) -> Path:
        """checkpoints/step-XXXXXXXX.pt: the checkpoint written after optimizer step `step`."""
        return self.checkpoints / f"step-{step:08d}.pt"

    def checkpoint_paths(self) -> list[Path]:
        """The checkpoints present, oldest first (damaged ones set aside as *.pt.damaged are not listed)."""
        return sorted(self.checkpoints.glob("step-*.pt"))

    def find_adapter(self, which: str = "best") -> Path:
        """The adapter folder to load: "best" (adapter-last/ when the run kept none), "last", or a path."""
        if which not in ADAPTERS:
            return Path(which)
        best = self.adapter(which)
        return self.adapter("last") if which == "best" and not best.is_dir() else best

    def config(self) -> Config:
        """The run's resolved config.yaml as a Config."""
        if not self.config_path.is_file():
            raise FileNotFoundError(f"'{self.path}' is not an mmft run directory ({self.CONFIG} is missing)")
        return load_config(self.config_path)

    def write_config(self, cfg: Config) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.config_path) as tmp:
            tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return self.config_path

    def summary(self) -> dict:
        """summary.json of a finished run."""
        if not self.summary_path.is_file():
            raise FileNotFoundError(f"run '{self.path}' has no {self.SUMMARY}: it has not finished; "
                                    "run `mmft train` with its config again to resume it")
        return json.loads(self.summary_path.read_text())

    def write_summary(self, summary: dict) -> Path:
        write_json(self.summary_path, summary)
        return self.summary_path

    def is_complete(self) -> bool:
        """True once training finished: the summary is written after both adapters."""
        return self.summary_path.is_file() and self.adapter("best").is_dir()
