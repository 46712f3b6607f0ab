"""Which shards, how many samples in each, and who reads what in an epoch.

expand_specs (brace patterns, globs, directories, URLs) -> shard_sizes (sizes.json or tar headers)
-> plan_epoch: shards dealt to (rank, worker) readers with exact batch quotas.
"""
from __future__ import annotations

import glob
import heapq
import json
import logging
import os
import random
from dataclasses import dataclass

from mmft.data import stages as st
from mmft.data.stages import DataError

logger = logging.getLogger("mmft.data.stream")


def _is_remote(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def expand_specs(specs: str | list[str]) -> list[str]:
    """Shard specs -> shard urls: brace patterns, globs, directories (their *.tar), paths, URLs, 'pipe:'.

    A local spec matching no file at all is a DataError; files missing from an otherwise matching
    brace pattern are kept and later skipped as unreadable shards.
    """
    from braceexpand import braceexpand

    out: list[str] = []
    for spec in [specs] if isinstance(specs, str) else list(specs):
        if _is_remote(spec):
            out.extend(braceexpand(spec))
            continue
        paths: list[str] = []
        for path in braceexpand(os.path.expanduser(spec)):
            if os.path.isdir(path):
                paths += sorted(p for ext in ("tar", "tar.gz", "tgz")
                                for p in glob.glob(os.path.join(path, f"*.{ext}")))
            elif glob.has_magic(path):
                paths += sorted(glob.glob(path))
            else:
                paths.append(path)
        if not any(os.path.isfile(p) for p in paths):
            raise DataError(f"data spec '{spec}' matches no shard file; check the path "
                            "(brace patterns look like data/train-{00000..00009}.tar)")
        out.extend(paths)
    return out


def _sample_counts(data) -> dict[str, int]:
    """sizes.json's {"shard.tar": samples} with every count a non-negative integer, else Type/ValueError."""
    if not isinstance(data, dict):
        raise TypeError(f"a JSON {type(data).__name__} where an object of shard sizes is expected")
    for name, n in data.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"field {name!r} is {n!r}, expected a sample count (an integer >= 0)")
    return dict(data)


def _sizes_table(directory: str, cache: dict) -> dict:
    if directory not in cache:
        path = os.path.join(directory, "sizes.json")
        table = {}
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    table = _sample_counts(json.load(f))
            except (OSError, ValueError, TypeError) as exn:
                logger.warning("data: ignoring %s (%s); counting samples from tar headers instead", path, exn)
        cache[directory] = table
    return cache[directory]


def _count_headers(url: str) -> int:
    """Samples in one shard from its tar headers, grouped exactly as the reader groups them."""
    n, progress = 0, {}
    try:
        with st.open_shard(url) as stream:
            members = st.tar_members(stream, headers_only=True, progress=progress)
            for _ in st.group_members(members, url, progress):
                n += 1
    except st._TAR_ERRORS as exn:
        logger.warning("data: shard %s is unreadable or truncated (%s: %s)", url, type(exn).__name__, exn)
    return n


def shard_sizes(urls: str | list[str]) -> list[int]:
    """Samples per shard: from a sizes.json beside local shards ({"shard.tar": n}), else from tar headers."""
    from braceexpand import braceexpand

    urls = list(braceexpand(urls)) if isinstance(urls, str) else list(urls)
    cache: dict = {}
    sizes = []
    for url in urls:
        table = {} if _is_remote(url) else _sizes_table(os.path.dirname(url) or ".", cache)
        name = os.path.basename(url)
        sizes.append(table[name] if name in table else _count_headers(url))
    return sizes


def count_samples(urls: str | list[str]) -> int:
    """Total samples in the shards (sizes.json when present, else tar headers; bad shards count what
    they hold)."""
    return sum(shard_sizes(urls))


# ---------------------------------------------------------------- the epoch plan


@dataclass(frozen=True)
class Reader:
    """What one (rank, worker) reads in one epoch: shards, a sample stride, and its exact batch quota."""

    urls: tuple[str, ...]
    every: int
    offset: int
    full: int  # full batches it yields
    tail: int  # samples of its leftover partial batch, merged across workers by the main process


def _deal(sizes: list[int], order: list[int], slots: int) -> list[tuple[list[int], int]]:
    """Shards in `order` to the least-loaded slot: -> per slot (shard indices, samples)."""
    heap = [(0, s) for s in range(slots)]
    owned: list[list[int]] = [[] for _ in range(slots)]
    loads = [0] * slots
    for i in order:
        load, s = heapq.heappop(heap)
        owned[s].append(i)
        loads[s] = load + sizes[i]
        heapq.heappush(heap, (loads[s], s))
    return list(zip(owned, loads))


def _quotas(counts: list[int], batch_size: int, target: int) -> tuple[list[int], list[int]]:
    """Per-worker (full batches, tail samples) giving exactly `target` batches for the rank."""
    full = [c // batch_size for c in counts]
    tails = [c % batch_size for c in counts]
    merged = sum(tails) // batch_size
    excess = sum(full) + merged - target
    cut = min(excess, merged)
    merged, excess = merged - cut, excess - cut
    for _ in range(excess):  # only when this rank has more than the smallest rank
        j = max(range(len(full)), key=lambda k: (full[k], -k))
        full[j] -= 1
    need, kept = merged * batch_size, []
    for t in tails:
        kept.append(min(t, need))
        need -= kept[-1]
    return full, kept


def plan_epoch(urls: list[str], sizes: list[int], *, seed: int, epoch: int, world_size: int, workers: int,
               batch_size: int) -> tuple[list[list[Reader]], int]:
    """-> (readers[rank][worker], batches per rank) for one epoch; the same in every process."""
    slots = world_size * workers
    order = list(range(len(urls)))
    random.Random(f"mmft-shards:{seed}:{epoch}").shuffle(order)
    if len(urls) >= slots:
        dealt = _deal(sizes, order, slots)
        parts = [(tuple(urls[i] for i in own), 1, 0, n) for own, n in dealt]
    else:  # fewer shards than readers: everyone reads all shards and keeps every slots-th sample
        total, shuffled = sum(sizes), tuple(urls[i] for i in order)
        parts = [(shuffled, slots, s, len(range(s, total, slots))) for s in range(slots)]
    # slot s is (rank s % world_size, worker s // world_size): the least-loaded-slot dealing then
    # alternates ranks, so ranks get equal shares and few samples are cut to keep them in step
    counts = [[parts[w * world_size + r][3] for w in range(workers)] for r in range(world_size)]
    num_batches = min(sum(c) // batch_size for c in counts)
    readers = []
    for r in range(world_size):
        full, tails = _quotas(counts[r], batch_size, num_batches)
        readers.append([Reader(*parts[w * world_size + r][:3], full[w], tails[w]) for w in range(workers)])
    return readers, num_batches
