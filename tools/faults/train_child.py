#!/usr/bin/env python
"""`mmft train --config CFG` for the kill -9 cases, optionally stopping still at a chosen moment.

    python tools/faults/train_child.py CFG [OVERRIDES ...]
    python tools/faults/train_child.py CFG --hang checkpoint-write:6 --flag /tmp/x [OVERRIDES ...]
    python tools/faults/train_child.py CFG --hang validation:2 --flag /tmp/x
    python tools/faults/train_child.py CFG --full-disk-after 2

Random kills need nothing here: the parent kills at a random moment. To kill inside a moment too short
to hit by chance, `--hang WHERE:N` makes the run stop still there and create `--flag`, and the parent
then sends SIGKILL: `checkpoint-write:N` leaves checkpoint N half-written in its temp file (as a kill in
the middle of the write would), `validation:N` stops after the first batch of this process's N-th
validation. Under torchrun every rank runs this script; rank 0 alone writes and validates.
`--full-disk-after N` lowers the file-size limit (RLIMIT_FSIZE) to 4 KiB once checkpoint N is written:
every later write that grows a file past it fails as on a full disk.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _stand_still(flag: Path) -> None:
    flag.write_text("ready to be killed\n")
    deadline = time.monotonic() + 600  # bounded: the parent kills it long before
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise SystemExit("train_child: nobody killed me")


def _hang_in_checkpoint_write(step: int, flag: Path) -> None:
    from mmft.training import state

    real = state.atomic_path

    @contextlib.contextmanager
    def half_written(path):
        with real(path) as tmp:
            yield tmp
            if Path(path).name == f"step-{step:08d}.pt":
                data = tmp.read_bytes()
                tmp.write_bytes(data[: len(data) // 2])
                _stand_still(flag)

    state.atomic_path = half_written


def _hang_in_validation(ordinal: int, flag: Path) -> None:
    from mmft.training import trainer

    real, calls = trainer.validation_scores, [0]

    def stopping(model, batches, tokenizer, device):
        calls[0] += 1

        def first_batch_then_still():
            for i, batch in enumerate(batches):
                if i == 1 and calls[0] == ordinal:
                    _stand_still(flag)
                yield batch
        return real(model, first_batch_then_still(), tokenizer, device)

    trainer.validation_scores = stopping


def _full_disk_after(step: int) -> None:
    import resource

    from mmft.training import state

    real = state.Checkpointer.save

    def save(self, saved, at):
        path = real(self, saved, at)
        if at == step:
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return path

    state.Checkpointer.save = save


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--hang", default="", help="checkpoint-write:STEP or validation:N")
    p.add_argument("--flag", type=Path, help="file created once the run stands still")
    p.add_argument("--full-disk-after", type=int, help="no file may grow past 4 KiB after this checkpoint")
    args, overrides = p.parse_known_args()
    if args.full_disk_after is not None:
        _full_disk_after(args.full_disk_after)
    if args.hang:
        where, n = args.hang.split(":")
        hang = {"checkpoint-write": _hang_in_checkpoint_write, "validation": _hang_in_validation}[where]
        hang(int(n), args.flag)
    from mmft import cli

    return cli.main(["train", "--config", args.config, *overrides])


if __name__ == "__main__":
    sys.exit(main())
