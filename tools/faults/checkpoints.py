"""Checkpoint faults: a full disk mid-run, a damaged newest checkpoint, a checkpoint that carries pickles.

Each case trains the tiny configuration of faults.training (8 steps, a checkpoint every 2) and injects
its fault into the run directory; a run that goes on afterwards must end with the adapter of an
uninterrupted run (`data lost` counts the tensors that differ).
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from faults.common import ROOT, Outcome, PicklePayload, expect_refusal
from faults.training import CHILD, _adapter, _env, tiny_config

STEPS = 8


def _config(work: Path, run: Path):
    from mmft.config import load_config

    overrides = [f"train.steps={STEPS}", "train.keep_checkpoints=3", "data.num_workers=0",
                 f"train.output_dir={run}"]
    return load_config(tiny_config(work), overrides)


def _train_quietly(cfg) -> Path:
    """mmft.train in this process, its progress bar kept off the suite's output."""
    from mmft.training.trainer import train

    with contextlib.redirect_stderr(io.StringIO()):
        return train(cfg)


def _differing(got: dict, want: dict) -> int:
    return sum(k not in got or not bool((got[k] == want[k]).all()) for k in want)


def _finished_run(work: Path) -> tuple[Path, dict]:
    """A finished tiny run (checkpoints 4, 6, 8 kept) and its adapter: the reference of every variant."""
    run = work / "finished"
    _train_quietly(_config(work, run))
    return run, _adapter(run)


# ---------------------------------------------------------------- a full disk


def _limited(config: Path, run: Path, after: int) -> subprocess.CompletedProcess:
    """`mmft train` in a child whose file-size limit drops to 4 KiB once checkpoint `after` is written."""
    cmd = [sys.executable, str(CHILD), str(config), f"train.steps={STEPS}", "data.num_workers=0",
           f"train.output_dir={run}", "--full-disk-after", str(after)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(1), timeout=300,
                          check=False)


def disk_full(work: Path) -> Outcome:
    """The file-size limit drops to 4 KiB after checkpoint 2 (the step-4 checkpoint cannot be written) or
    after checkpoint 8 (adapter-last cannot): one sentence naming the file, the previous checkpoint intact,
    and the same command, run again with room, finishes with the uninterrupted run's adapter."""
    from mmft.rundir import RunDir
    from mmft.training.state import read_checkpoint

    config = tiny_config(work)
    _, reference = _finished_run(work)
    out = Outcome()
    for after, victim in ((2, "checkpoints/step-00000004.pt"), (STEPS, "adapter-last")):
        out.injected += 1
        run = RunDir(work / f"full-after-{after}")
        failed = _limited(config, run.path, after)
        last = (failed.stderr.strip().splitlines() or ["(no output)"])[-1]
        said = f"mmft train: error: could not write {run.path / victim}: File too large"
        problems = []
        if failed.returncode != 2 or not last.startswith(said):
            problems.append(f"exit {failed.returncode}, last line {last[:300]!r}")
        try:
            read_checkpoint(run.checkpoint(after))
        except Exception as e:  # noqa: BLE001
            problems.append(f"the previous checkpoint does not read back: {e}")
            out.data_lost += 1
        if list(run.path.rglob("*.tmp")):
            problems.append("a temp file was left behind")
        try:  # room again: the same run, here in this process
            _train_quietly(_config(work, run.path))
            out.data_lost += _differing(_adapter(run.path), reference)
        except Exception as e:  # noqa: BLE001 (reported as the case's crash)
            out.crashes += 1
            problems.append(f"the run did not resume: {type(e).__name__}: {str(e)[:300]}")
        label = f"disk full after checkpoint {after}"
        if problems:
            out.notes.append(f"{label}: " + "; ".join(problems))
        else:
            out.survived += 1
            out.notes.append(f"{label}: {last.replace(str(run.path), '<run>')}; resumed with room: the "
                             f"uninterrupted run's adapter")
    return out


# ---------------------------------------------------------------- damaged or planted checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor's bytes (what a bad disk or copy does)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: ("/data/" in i.filename, i.compress_size))
    at = info.header_offset + 28
    start = info.header_offset + 30 + len(info.filename.encode()) + int.from_bytes(data[at:at + 2], "little")
    data[start + info.compress_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def damaged_newest_checkpoint(work: Path) -> Outcome:
    """The newest checkpoint of a run cut in half or with a flipped bit: the run goes back to the one
    before with a warning, records it in summary.json, and ends with the uninterrupted run's adapter."""
    from mmft.rundir import RunDir

    finished, reference = _finished_run(work)
    out = Outcome()
    for label, damage in (("truncated", _truncate), ("flipped bit", _flip)):
        out.injected += 1
        run = RunDir(work / label.replace(" ", "-"))
        shutil.copytree(finished, run.path)
        damage(run.checkpoint(STEPS))
        warnings, logger = _Warnings(), logging.getLogger("mmft.training.state")
        logger.addHandler(warnings)
        try:
            _train_quietly(_config(work, run.path))
        finally:
            logger.removeHandler(warnings)
        resumes = run.summary().get("resumes", [])
        skipped = [s["checkpoint"] for r in resumes for s in r["skipped"]]
        lost = _differing(_adapter(run.path), reference)
        out.data_lost += lost
        warned = [w for w in warnings.messages if run.checkpoint(STEPS).name in w]
        if warned and skipped == [run.checkpoint(STEPS).name] and not lost:
            out.survived += 1
            out.notes.append(f"{label}: warned '{warned[0].replace(str(run.path), '<run>')[:200]}'; "
                             f"summary.json resumes {resumes[-1]['step']} skipping {skipped}")
        else:
            out.notes.append(f"{label}: warnings {warnings.messages}, summary resumes {resumes}, {lost} "
                             f"tensors differ")
    return out


def pickled_checkpoint(work: Path) -> Outcome:
    """A checkpoint carrying a pickle payload, and one holding numpy RNG state as older mmft wrote it:
    both refused in one sentence naming the file, nothing run, the file untouched."""
    import numpy as np
    import torch

    from mmft.rundir import RunDir
    from mmft.training.state import CheckpointError, read_checkpoint

    finished, _ = _finished_run(work)
    marker, out = work / "payload-ran", Outcome()
    plants = {"pickle payload": lambda saved: saved.update(trainable=PicklePayload(marker)),
              "older mmft's numpy RNG state": lambda saved: saved["rng"].update(numpy=np.random.get_state())}
    for label, plant in plants.items():
        run = RunDir(work / label.split()[0])
        shutil.copytree(finished, run.path)
        saved = read_checkpoint(run.checkpoint(STEPS))
        plant(saved)
        torch.save(saved, run.checkpoint(STEPS))
        cfg = _config(work, run.path)
        out.add(expect_refusal(lambda c=cfg: _train_quietly(c), CheckpointError, run.checkpoint(STEPS),
                               label))
    if marker.exists():
        out.survived, out.crashes = 0, out.crashes + 1
        out.notes.append("the payload ran")
    return out
