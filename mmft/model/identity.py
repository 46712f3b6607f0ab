"""When two base-model identities name the same base: the one rule every identity check goes through.

A base identity (`mmft.model.factory.base_identity`) names the model, its weights (tag or file
sha256) and its architecture (a digest of the tower config). Adapters, embeddings, indexes, mined
negatives and bundles record it; adapter loading, the stale-index refusal, the merge of embedding
parts and the service's start-up checks all compare identities here, so no check can drift from the
others. Plain Python and no torch: the torch-free service checks identities too.

mmft-mini's architecture digest once included the install path of its packaged text tower, so it
changed with the folder of the virtual environment, and an adapter or index refused to load on
another machine. The digest now replaces that path with a fixed token; a model built on a machine
also carries "arch_legacy", the path-bearing digest this machine used to record. An architecture
matches when it equals the other side's "arch" or "arch_legacy": artifacts made before keep
loading on the machine that made them, and new ones, whose "arch" is the same everywhere, load on any.
"""
from __future__ import annotations

IDENTITY_KEYS = ("name", "pretrained", "sha256", "arch")


def arch_matches(a: dict, b: dict) -> bool:
    """Whether two identities have the same architecture, either one's pre-portable digest included."""
    x, y = a.get("arch"), b.get("arch")
    if x == y:
        return True
    return (x is not None and x == b.get("arch_legacy")) or (y is not None and y == a.get("arch_legacy"))


def identity_diffs(expected: dict, actual: dict) -> list[str]:
    """The IDENTITY_KEYS on which two base identities differ; empty when they name the same base."""
    diffs = [k for k in IDENTITY_KEYS if k != "arch" and expected.get(k) != actual.get(k)]
    return diffs if arch_matches(expected, actual) else [*diffs, "arch"]


def same_base(a: dict | None, b: dict | None) -> bool:
    """Whether two recorded identities name the same base model (None: an unidentified model)."""
    if a is None or b is None:
        return a is None and b is None
    return not identity_diffs(a, b)
