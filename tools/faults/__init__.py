"""The fault cases of tools/fault_suite.py, one module per kind of fault; CASES is the table's row order."""
from __future__ import annotations

from faults import checkpoints, data, files, service, shards, training
from faults.common import Case, Outcome
from faults.pending import PENDING

_REFUSED = "refused in one sentence naming the file, the folder left as it was"
_COUNTED = "skipped and counted once under its reason, every good sample delivered"
_RESUMED = ("each kill followed by a clean resume, every checkpoint on disk readable, the final adapter "
            "bit-identical to an uninterrupted run's")
_TINY = "tiny ViT 32 px, 48 steps, LoRA dropout + augmentation"

CASES = [
    Case("index: index.faiss truncated", "damaged files", _REFUSED, files.index_truncated),
    Case("index: ids.json missing", "damaged files", _REFUSED, files.index_missing_ids),
    Case("index: manifest.json edited", "damaged files", _REFUSED, files.index_edited_manifest),
    Case("embeddings: partial or damaged folder", "damaged files", _REFUSED, files.embeddings_partial),
    Case("adapter: tensors do not match adapter_config.json", "damaged files", _REFUSED,
         files.adapter_mismatch),
    Case("base checkpoint carrying a pickle payload", "damaged files", _REFUSED + ", the payload never runs",
         files.checkpoint_pickle),
    Case("bad samples, one of each kind (2 eval workers)", "bad data", _COUNTED, data.bad_samples_eval),
    Case("bad samples mixed in one shard (2 ranks x 2 train workers)", "bad data", _COUNTED,
         data.bad_samples_train),
    Case("bad shards: truncated, unreadable, missing", "bad data", _COUNTED, data.bad_shards),
    Case("truncated shard shared by more readers than shards", "bad data", _COUNTED,
         data.truncated_shard_shared),
    Case("tar members named '../x' or '/abs/x'", "bad data", _COUNTED + "; nothing written anywhere",
         data.unsafe_member_names),
    Case("shards: table whose image paths resolve to nothing", "shard writer",
         "exit non-zero, one sentence saying where it looked and how many rows it read",
         shards.table_paths_resolve_to_nothing),
    Case("shards: folder with no images", "shard writer",
         "exit non-zero, one sentence saying where it looked", shards.folder_without_images),
    Case("shards: table with some images missing", "shard writer",
         "exit 0, good rows written, missing counted", shards.table_with_some_missing_images),
    Case(f"kill -9 at random moments in steps ({_TINY}, 1 worker)", "training", _RESUMED,
         training.kill_during_steps, fast=False),
    Case(f"kill -9 in the middle of a checkpoint write ({_TINY})", "training", _RESUMED,
         training.kill_during_checkpoint_writes, fast=False),
    Case(f"kill -9 during validation ({_TINY}, val every 4 steps)", "training", _RESUMED,
         training.kill_during_validation, fast=False),
    Case(f"kill -9 with 2 DataLoader workers ({_TINY})", "training", _RESUMED,
         training.kill_with_two_workers, fast=False),
    Case(f"kill -9 under torchrun, 2 processes on gloo ({_TINY})", "training", _RESUMED,
         training.kill_under_torchrun, fast=False),
    Case(f"kill -9 with gradient caching, mined negatives and re-mining ({_TINY}, micro-batch 3, K=2)",
         "training", _RESUMED, training.kill_with_grad_cache_and_negatives, fast=False),
    Case("kill -9 at random moments: the demo's LoRA config (mmft-mini 160 px, 8 steps)", "training",
         _RESUMED,
         training.kill_demo_lora, fast=False),
    Case("disk full while writing a checkpoint or adapter (RLIMIT_FSIZE)", "training",
         "one sentence naming the file and the cause, the previous checkpoint intact, the run resumes once "
         "there is room and ends with the uninterrupted run's adapter", checkpoints.disk_full, fast=False),
    Case("newest checkpoint truncated or with a flipped bit", "training",
         "falls back to the previous checkpoint with a warning, recorded in summary.json, the final adapter "
         "the uninterrupted run's", checkpoints.damaged_newest_checkpoint),
    Case("training checkpoint carrying a pickle payload (or an older mmft's pickles)", "training",
         _REFUSED + ", the payload never runs", checkpoints.pickled_checkpoint),
    Case("burst of bad requests among good ones, 32 concurrent clients", "service",
         "every bad one a 4xx in one sentence, every good one answered, process alive, memory back to its "
         "level",
         service.bad_request_burst, fast=False),
    *PENDING,
]

__all__ = ["CASES", "Case", "Outcome"]
