"""Cases promised by the reliability issue that wait for other work to land; listed, never faked.

Each is a `Case` with `run=None`: the table shows it as "not yet run" with the reason.
"""
from __future__ import annotations

from faults.common import Case

TRAINER = "waits for the trainer's training-state refactor (weights_only checkpoints)"

PENDING = [
    Case("kill -9 at 20 random moments (steps, checkpoint write, validation, 2 workers, torchrun x2)",
         "training", "the resumed run's adapter is bit-identical to an uninterrupted run's", pending=TRAINER),
    Case("disk full while writing a checkpoint or adapter (RLIMIT_FSIZE)", "training",
         "one sentence naming the path and cause, previous checkpoint intact, resumes once space is back",
         pending=TRAINER),
    Case("newest checkpoint truncated or with flipped bytes", "training",
         "falls back to the previous checkpoint with a warning, recorded in summary.json", pending=TRAINER),
    Case("pickle payload planted in a training checkpoint", "training",
         "refused in one sentence, the payload never runs", pending=TRAINER),
    Case("burst of bad requests among good ones, 32 concurrent clients", "service",
         "every bad one a 4xx, every good one answered, process alive, memory back to its level",
         pending="waits for the search service to land"),
]
