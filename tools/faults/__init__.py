"""The fault cases of tools/fault_suite.py, one module per kind of fault; CASES is the table's row order."""
from __future__ import annotations

from faults import data, files, shards
from faults.common import Case, Outcome
from faults.pending import PENDING

_REFUSED = "refused in one sentence naming the file, the folder left as it was"
_COUNTED = "skipped and counted once under its reason, every good sample delivered"

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
    *PENDING,
]

__all__ = ["CASES", "Case", "Outcome"]
