"""Streaming image-text data from webdataset shards (img2dataset layout) to training and eval batches.

    stream = train_loader(cfg.data, make_train_transform(preprocess_val, cfg.data), tokenizer, seed=0)
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for batch in stream:    # {"image": (B, 3, H, W), "text": (B, L), "key": [...], ("group": (B,))}
            ...
        print(stream.stats)     # skipped samples by reason, gathered from every worker

A sample is `<key>.jpg|jpeg|png|webp` plus captions in `<key>.txt` (one per line) or `<key>.json`
(data_cfg.caption_field: a string or a list); one caption per image is drawn per epoch.
Epochs: the shards are shuffled per epoch and dealt to the (rank, worker) readers, balanced by
sample count (with fewer shards than readers, each reader keeps every n-th sample instead). Each
reader yields full batches; the leftover tails of a rank's workers are merged into full batches in
the main process, so only the last incomplete batch of each rank is dropped (< batch_size samples
per rank and epoch). Every rank runs the same `num_batches` (the smallest rank's), so distributed
steps stay in lockstep. Resampled mode draws shards with replacement from each source and mixes
the sources by `train_weights`; its epoch is `epoch_samples` (or the counted size) long.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from mmft.data import stages as st
from mmft.data.augment import TrainTransform, draft_size, make_train_transform, train_transform  # noqa: F401
from mmft.data.epochs import count_samples, expand_specs, plan_epoch, shard_sizes  # noqa: F401 (public)
from mmft.data.negatives import NegativeSource, attach
from mmft.data.stages import DataError, SkipStats

logger = logging.getLogger("mmft.data.stream")


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        dist = torch.distributed
        on = dist.is_available() and dist.is_initialized()
        rank = (dist.get_rank() if on else 0) if rank is None else rank
        world_size = (dist.get_world_size() if on else 1) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    return rank, world_size


def _worker() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def _images(samples: list[dict], transform) -> torch.Tensor:
    images = [s["image"] for s in samples]
    collate = transform.collate if hasattr(transform, "collate") else default_collate
    return collate(images)  # (B, 3, H, W)


def _on_own_torch_rng(items: Iterator, seed: int) -> Iterator:
    """Run the generator `items` on a torch RNG stream of its own: the global state is swapped in and out
    around each item, so the caller's draws and the generator's never interleave."""
    own = torch.Generator().manual_seed(seed).get_state()
    while True:
        outer = torch.get_rng_state()
        torch.set_rng_state(own)
        try:
            item = next(items)
        except StopIteration:
            return
        finally:
            own = torch.get_rng_state()
            torch.set_rng_state(outer)
        yield item


class _TrainSet(IterableDataset):
    """The per-worker half of the training stream; its fields are set by TrainStream before each epoch."""

    def __init__(self, data_cfg, transform, tokenizer, *, seed, rank, workers, sources, weights, readers):
        super().__init__()
        self.cfg, self.transform, self.tokenizer = data_cfg, transform, tokenizer
        self.seed, self.rank, self.workers, self.epoch = seed, rank, workers, 0
        self.sources, self.weights, self.readers, self.resampled_quota = sources, weights, readers, []
        self.negatives = None  # a mmft.data.negatives.NegativeSource when data.hard_negatives is set

    def _raw(self, w: int, stats: SkipStats, rng: random.Random):
        """Raw samples of worker w and its (full, tail) quota."""
        if self.cfg.resampled:
            tag = f"{self.seed}:{self.epoch}:{self.rank}:{w}"
            streams = [st.resampled(urls, random.Random(f"mmft-src{i}:{tag}"), stats, name=spec)
                       for i, (spec, urls) in enumerate(self.sources)]
            raw = st.mix(streams, self.weights, rng) if len(streams) > 1 else streams[0]
            return raw, self.resampled_quota[w], 0
        reader = self.readers[w]
        raw = st.read_shards(reader.urls, stats, count_shards=reader.offset == 0)  # shared shards: one counts
        if reader.every > 1:
            raw = st.take_every(raw, reader.every, reader.offset)
        return raw, reader.full, reader.tail

    def __iter__(self):
        # Augmentation draws from torch's RNG on a stream of its own, seeded per (seed, epoch, rank, worker):
        # re-reading skipped batches on resume, or dropout between batches with num_workers=0, never
        # shifts the draws of the other.
        aug_seed = random.Random(f"mmft-aug:{self.seed}:{self.epoch}:{self.rank}:{_worker()}").getrandbits(63)
        return _on_own_torch_rng(self._batches(), aug_seed)

    def _batches(self):
        w, cfg = _worker(), self.cfg
        stats, rng = SkipStats(), random.Random(f"mmft-order:{self.seed}:{self.epoch}:{self.rank}:{w}")
        raw, full, tail = self._raw(w, stats, rng)
        raw = st.shuffled(raw, cfg.shuffle_buffer, rng)
        samples = st.decode_samples(raw, getattr(self.transform, "pixels", self.transform), stats,
                                    caption_key=cfg.caption_key, caption_field=cfg.caption_field,
                                    group_field=cfg.group_field, draft_size=draft_size(self.transform))
        for kind, batch in st.batches(samples, cfg.batch_size, full, tail, stats):
            captions = [st.choose_caption(s["captions"], self.seed, self.epoch, s["key"]) for s in batch]
            out = {"image": _images(batch, self.transform), "text": self.tokenizer(captions).long(),  # (B, L)
                   "key": [s["key"] for s in batch], "kind": kind, "skipped": stats.take_delta()}
            if cfg.group_field:  # a sample without a group is its own group
                groups = [st.group_id(s["group"] or s["key"]) for s in batch]
                out["group"] = torch.tensor(groups)  # (B,) int64
            if self.negatives is not None:  # mined hard negatives: (B, K, ...) extras per sample
                out = attach(out, self.negatives, getattr(self.transform, "pixels", self.transform),
                             lambda pixels: _images([{"image": x} for x in pixels], self.transform),
                             self.tokenizer, self.epoch)
            yield out
        if not cfg.resampled:  # read on past the quota, undecoded: a bad shard there is still counted
            for _ in raw:
                pass
        yield {"kind": "stats", "skipped": stats.take_delta()}


def _concat(parts: list[dict]) -> dict:
    """Merge tail pieces from several workers (text padded with 0 to the longest length)."""
    width = max(p["text"].shape[1] for p in parts)
    out = {"image": torch.cat([p["image"] for p in parts]),  # (N, 3, H, W)
           "text": torch.cat([torch.nn.functional.pad(p["text"], (0, width - p["text"].shape[1]))
                              for p in parts]),
           "key": [k for p in parts for k in p["key"]]}
    if "group" in parts[0]:
        out["group"] = torch.cat([p["group"] for p in parts])  # (N,)
    for name in ("extra_image", "extra_image_group", "extra_text_group"):  # (N, K, ...) hard negatives
        if name in parts[0]:
            out[name] = torch.cat([p[name] for p in parts])
    if "extra_text" in parts[0]:
        width = max(p["extra_text"].shape[-1] for p in parts)
        pad = torch.nn.functional.pad
        out["extra_text"] = torch.cat([pad(p["extra_text"], (0, width - p["extra_text"].shape[-1]))
                                       for p in parts])  # (N, K, L)
    return out


def _head(batch: dict, n: int) -> tuple[dict, dict]:
    return ({k: v[:n] for k, v in batch.items()}, {k: v[n:] for k, v in batch.items()})


class TrainStream:
    """Training batches for one rank; `len()` = `num_batches` of the current epoch, exact.

    `stats` (a SkipStats) accumulates the skipped samples of every worker over the stream's life.
    Call `set_epoch(e)` before each epoch: it reshuffles deterministically from (seed, e).
    """

    def __init__(self, dataset: _TrainSet, loader: DataLoader, sizes: list[int], world_size: int, pin: bool):
        self._set, self._loader, self._sizes, self._pin = dataset, loader, sizes, pin
        self.world_size = world_size
        self.batch_size = dataset.cfg.batch_size
        self.stats = SkipStats(log=True)
        self.num_batches = 0
        self.set_epoch(0)

    @property
    def epoch(self) -> int:
        return self._set.epoch

    def set_epoch(self, epoch: int) -> None:
        ds, cfg, b = self._set, self._set.cfg, self.batch_size
        ds.epoch = epoch
        loader_seed = random.Random(f"mmft-loader:{ds.seed}:{epoch}:{ds.rank}").getrandbits(63)
        self._loader.generator.manual_seed(loader_seed)  # the workers' base seed: a function of the epoch
        if cfg.resampled:
            per_rank = (cfg.epoch_samples or sum(self._sizes)) // (self.world_size * b)
            ds.resampled_quota = [per_rank // ds.workers + (w < per_rank % ds.workers)
                                  for w in range(ds.workers)]
            self.num_batches = per_rank
        else:
            urls = [u for _, us in ds.sources for u in us]
            readers, self.num_batches = plan_epoch(urls, self._sizes, seed=ds.seed, epoch=epoch,
                                                   world_size=self.world_size, workers=ds.workers,
                                                   batch_size=b)
            ds.readers = readers[ds.rank]
        if self.num_batches == 0:
            raise DataError(f"the training data holds fewer samples than one batch per rank (batch_size {b} "
                            f"x world_size {self.world_size}); lower data.batch_size or add data")

    def __len__(self) -> int:
        return self.num_batches

    def reload_negatives(self, path: str | None = None) -> None:
        """Read the mined negatives again, from `path` when given (else data.hard_negatives): negatives
        re-mined with the current model take effect from the next epoch (workers start per epoch)."""
        ds = self._set
        if path is not None:
            ds.cfg = dataclasses.replace(ds.cfg, hard_negatives=str(path))
        urls = [u for _, us in ds.sources for u in us]
        ds.negatives = NegativeSource.from_config(ds.cfg, urls, ds.seed, draft_size(ds.transform))

    def __iter__(self):
        made, pending = 0, None
        for item in self._loader:
            self.stats.merge(item.pop("skipped"))
            kind = item.pop("kind")
            if kind == "tail":
                pending = _concat([pending, item] if pending else [item])
                while len(pending["key"]) >= self.batch_size and made < self.num_batches:
                    batch, pending = _head(pending, self.batch_size)
                    made += 1
                    yield {k: v.pin_memory() if self._pin and torch.is_tensor(v) else v
                           for k, v in batch.items()}
            elif kind == "full" and made < self.num_batches:
                made += 1
                yield item
        if made < self.num_batches:
            logger.warning("data: epoch %d ended after %d of %d batches (%s)", self.epoch, made,
                           self.num_batches, self.stats)


def _sources(data_cfg) -> list[tuple[str, list[str]]]:
    if not data_cfg.train:
        raise DataError("data.train is empty; give it shard specs such as data/train-{00000..00009}.tar")
    if data_cfg.caption_key not in ("txt", "json"):
        raise DataError(f"data.caption_key '{data_cfg.caption_key}' must be 'txt' or 'json'")
    if data_cfg.train_weights and len(data_cfg.train_weights) != len(data_cfg.train):
        raise DataError(f"data.train_weights has {len(data_cfg.train_weights)} weights for "
                        f"{len(data_cfg.train)} train specs; give one weight per spec")
    if data_cfg.train_weights and not data_cfg.resampled:
        raise DataError("data.train_weights needs data.resampled=true "
                        "(weighted mixing samples with replacement)")
    weights = data_cfg.train_weights
    if any(w < 0 for w in weights) or (weights and not sum(weights)):
        raise DataError(f"data.train_weights {data_cfg.train_weights} must be >= 0 with a positive sum")
    return [(spec, expand_specs(spec)) for spec in data_cfg.train]


def train_loader(data_cfg, preprocess_train: Callable, tokenizer: Callable, *, seed: int = 0,
                 epoch: int = 0, rank: int | None = None, world_size: int | None = None,
                 device_type: str = "cpu") -> TrainStream:
    """A TrainStream over data_cfg.train for this rank (rank/world_size default to torch.distributed).

    preprocess_train: PIL image -> (3, H, W) float; a TrainTransform takes the faster batched path.
    tokenizer: list[str] -> (N, L) integer tensor; it runs in the DataLoader workers.
    """
    rank, world_size = _rank_world(rank, world_size)
    sources = _sources(data_cfg)
    resampled, weights = data_cfg.resampled, list(data_cfg.train_weights)
    need_sizes = not resampled or not data_cfg.epoch_samples or (len(sources) > 1 and not weights)
    sizes_by_source = [shard_sizes(urls) if need_sizes else [] for _, urls in sources]
    if resampled and not weights:  # no weights: as if the sources were concatenated
        weights = [float(sum(s)) or 1.0 for s in sizes_by_source] if len(sources) > 1 else [1.0]
    sizes = [n for s in sizes_by_source for n in s]
    if not resampled and data_cfg.epoch_samples:  # declared epoch size: shards taken as equal
        n = len(sizes)
        sizes = [data_cfg.epoch_samples // n + (i < data_cfg.epoch_samples % n) for i in range(n)]
    workers = max(1, data_cfg.num_workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF tokenizers would warn once forked
    dataset = _TrainSet(data_cfg, preprocess_train, tokenizer, seed=seed, rank=rank, workers=workers,
                        sources=sources, weights=weights, readers=[])
    dataset.negatives = NegativeSource.from_config(data_cfg, [u for _, us in sources for u in us], seed,
                                                   draft_size(preprocess_train))
    pin = device_type == "cuda"
    # a generator of its own: starting the workers draws their base seed from it, not from torch's global
    # RNG, which belongs to the training step (dropout) and is restored from checkpoints on resume
    loader = DataLoader(dataset, batch_size=None, num_workers=data_cfg.num_workers, pin_memory=pin,
                        generator=torch.Generator())
    stream = TrainStream(dataset, loader, sizes, world_size, pin)
    if epoch:
        stream.set_epoch(epoch)
    return stream


class _EvalSet(IterableDataset):
    """Eval samples in shard order; worker w reads shards w, w+W, ... (or every W-th sample if few shards)."""

    def __init__(self, urls: list[str], data_cfg, transform, batch_size: int, workers: int):
        super().__init__()
        self.urls, self.cfg, self.transform = urls, data_cfg, transform
        self.batch_size, self.workers = batch_size, workers

    def __iter__(self):
        w, n, cfg = _worker(), self.workers, self.cfg
        stats = SkipStats()
        if len(self.urls) >= n:
            raw = st.read_shards(self.urls[w::n], stats)
        else:  # every worker reads every shard: worker 0 alone counts a bad shard
            raw = st.take_every(st.read_shards(self.urls, stats, count_shards=w == 0), n, w)
        samples = st.decode_samples(raw, self.transform, stats, caption_key=cfg.caption_key,
                                    caption_field=cfg.caption_field, group_field=cfg.group_field,
                                    draft_size=draft_size(self.transform))
        while batch := list(itertools.islice(samples, self.batch_size)):
            yield {"image": default_collate([s["image"] for s in batch]),  # (B, 3, H, W)
                   "key": [s["key"] for s in batch], "captions": [s["captions"] for s in batch],
                   "group": [s["group"] or s["key"] for s in batch] if cfg.group_field else None,
                   "skipped": stats.take_delta()}
        yield {"skipped": stats.take_delta()}


class EvalStream:
    """Eval batches {"image", "key", "captions" (all of them), "group" (list[str] or None)}; `stats` as in
    training."""

    def __init__(self, loader: DataLoader):
        self._loader = loader
        self.stats = SkipStats(log=True)

    def __iter__(self):
        for item in self._loader:
            self.stats.merge(item.pop("skipped"))
            if item:
                yield item


def eval_loader(specs: str | list[str], data_cfg, preprocess_val: Callable, *, batch_size: int | None = None,
                num_workers: int | None = None, device_type: str = "cpu") -> EvalStream:
    """Every sample of `specs` exactly once, unshuffled, partial last batches kept.

    Order: shard order then in-shard order with one worker; with W workers, the DataLoader takes one
    batch from each worker in turn (worker w reads shards w, w+W, ...), deterministic for a given W.
    """
    urls = expand_specs(specs)
    workers = data_cfg.num_workers if num_workers is None else num_workers
    dataset = _EvalSet(urls, data_cfg, preprocess_val, batch_size or data_cfg.batch_size, max(1, workers))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device_type == "cuda",
                        generator=torch.Generator())  # validation leaves the training RNG alone
    return EvalStream(loader)
