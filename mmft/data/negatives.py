"""Data stage: attach each sample's mined hard negatives (mmft.mining) to training batches.

    source = NegativeSource.from_config(cfg.data, shard_urls, seed=0)     # once, in the main process
    batches = attach_negatives(batches, source, transform, tokenizer, epoch=e)
    batch["extra_image"]        # (B, K, 3, S, S) float: K mined negative images per sample
    batch["extra_text"]         # (B, K, L) int64: K mined negative captions per sample, tokenized
    batch["extra_image_group"]  # (B, K) int64 group ids of the negatives; batch["group"] (B,) too

The trainer flattens them to (B*K, ...) and passes the features to the loss as extra negatives
(`extra_image_features`, `extra_text_features` with their group ids). Extras stay per sample (B, K, ...)
in the batch so that cutting and merging batches (the stream's tails) keeps each sample's negatives.
Each epoch a sample draws K of its k mined negatives (fewer mined: repeats), the same in any process
for a given (seed, epoch, key).

Fetching a negative's image: the negatives are training images themselves, so they are read from the
training shards, not copied: one pass over the shards' tar headers (tarfile, no decoding) maps every
mined key to (shard, byte offset, size) once; a worker then reads a negative with one seek and one read,
decodes it as the stream does (JPEG draft decode) and keeps the decoded image in a per-worker LRU cache
(CACHE_BYTES), because hard negatives repeat: the same look-alikes are mined for many pairs. Measured
costs in docs/data.md (tools/bench_negatives.py). Shards must be local, uncompressed tar files.
"""
from __future__ import annotations

import logging
import random
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from mmft.data import stages as st
from mmft.mining.format import Mined, read_mined

logger = logging.getLogger("mmft.data.negatives")

CACHE_BYTES = 256 << 20  # decoded negatives kept per worker (a 160 px RGB image is ~77 KB: ~3,400 of them)


def shard_offsets(urls: Iterable[str], keys: set[str] | None = None) -> dict[str, tuple[str, int, int, str]]:
    """key -> (shard path, byte offset, size, image extension) of every image member (only `keys`
    when given), from the tar headers alone (no member data is read)."""
    out: dict[str, tuple[str, int, int, str]] = {}
    for url in urls:
        if "://" in url or url.startswith("pipe:") or not Path(url).is_file():
            raise st.DataError(f"hard negatives read images from local shard files, but '{url}' is not one; "
                               "copy the shards to local disk or drop data.hard_negatives")
        try:
            with tarfile.open(url, "r:") as tar:
                for info in tar:
                    key, ext = st.sample_key(info.name)
                    if info.isreg() and ext in st.IMAGE_EXTS and (keys is None or key in keys):
                        out.setdefault(key, (url, info.offset_data, info.size, ext))
        except tarfile.TarError as e:
            raise st.DataError(f"cannot index shard '{url}' for hard negatives ({e}); it must be an "
                               "uncompressed tar file") from None
    return out


class NegativeSource:
    """The mined table and where each negative image lives; picklable, so DataLoader workers get a copy."""

    def __init__(self, mined: Mined, offsets: dict, k: int, seed: int = 0, draft_size: int | None = None):
        self.mined, self.offsets, self.k, self.seed = mined, offsets, int(k), seed
        self.draft_size = draft_size
        self.fallback = sorted(offsets)  # negatives for a sample that has none of its own
        self._cache: OrderedDict = OrderedDict()
        self._cached_bytes = 0
        self._files: dict = {}
        missing = {key for rec in mined.records.values() for key in rec["images"]} - set(offsets)
        if missing:
            logger.warning("data: %d mined negative images are not in the training shards (e.g. '%s'); "
                           "they are left out", len(missing), next(iter(missing)))
        if not self.fallback:
            raise st.DataError(f"none of the negatives in {mined.path} is an image of the training shards; "
                               "mine them from the same shards as data.train")

    @classmethod
    def from_config(cls, data_cfg, urls: list[str], seed: int = 0, draft_size: int | None = None):
        """The source for data_cfg.hard_negatives over shard `urls`, or None when it is ""."""
        if not data_cfg.hard_negatives:
            return None
        k = data_cfg.negatives_per_sample
        mined = read_mined(data_cfg.hard_negatives)
        if k < 1 or k > mined.k:
            raise st.DataError(f"data.negatives_per_sample={k} must be between 1 and the k={mined.k} mined "
                               f"per pair in {data_cfg.hard_negatives}; lower it or mine again with "
                               f"--k {max(k, 1)}")
        if mined.header.get("group_field", "") != data_cfg.group_field:
            raise st.DataError(f"{data_cfg.hard_negatives} was mined with data.group_field="
                               f"'{mined.header.get('group_field', '')}' but training uses "
                               f"'{data_cfg.group_field}': mine again with the training config")
        wanted = {key for rec in mined.records.values() for key in rec["images"]}
        if not wanted:  # every image neighbour was a near-duplicate: random training images stand in
            logger.warning("data: %s holds no image negatives (all above its near-duplicate threshold?); "
                           "random training images are the image negatives", data_cfg.hard_negatives)
        return cls(mined, shard_offsets(urls, wanted or None), k, seed, draft_size)

    def choose(self, key: str, epoch: int) -> tuple[list[str], list[str], list[str]]:
        """K negative image keys, K negative captions and the K keys those captions come from."""
        rng = random.Random(f"mmft-neg:{self.seed}:{epoch}:{key}")
        rec = self.mined.records.get(key, {})
        images = [i for i in rec.get("images", []) if i in self.offsets] or [rng.choice(self.fallback)]
        texts = list(zip(rec.get("texts", []), rec.get("text_keys", [])))
        if not texts:  # a pair mined with no caption negative: borrow a caption of a negative's pair
            texts = [(c, i) for i in images for c in self.mined.records.get(i, {}).get("texts", [])[:1]] \
                or [("", key)]
        picked_texts = _draw(texts, self.k, rng)
        return _draw(images, self.k, rng), [t for t, _ in picked_texts], [i for _, i in picked_texts]

    def group_id(self, key: str) -> int:
        return st.group_id(self.mined.group(key))

    def image(self, key: str):
        """The decoded RGB image of `key` (cached)."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        url, offset, size, ext = self.offsets[key]
        f = self._files.get(url)
        if f is None:
            f = self._files[url] = open(url, "rb")  # noqa: SIM115 (kept open for the worker's life)
        f.seek(offset)
        image = st.decode_image({ext: f.read(size)}, self.draft_size)
        nbytes = image.width * image.height * 3
        self._cache[key] = image
        self._cached_bytes += nbytes
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.width * old.height * 3
        return image

    def __getstate__(self):  # workers start with an empty cache and their own file handles
        return {**self.__dict__, "_cache": OrderedDict(), "_cached_bytes": 0, "_files": {}}


def _draw(items: list, k: int, rng: random.Random) -> list:
    """k of `items` without repeats when there are enough, else all of them plus random repeats."""
    if len(items) >= k:
        return rng.sample(items, k)
    return items + rng.choices(items, k=k - len(items))


def attach(batch: dict, source: NegativeSource, prepare: Callable, collate: Callable, tokenizer: Callable,
           epoch: int) -> dict:
    """Add extra_image (B, K, 3, S, S), extra_text (B, K, L), extra_image_group, extra_text_group (B, K)
    and group (B,) to one batch {"key": [...], ...}. prepare: PIL image -> per-sample pixels (the
    stream's transform.pixels); collate: list of those -> (N, 3, S, S)."""
    keys = batch["key"]
    b, k = len(keys), source.k
    chosen = [source.choose(key, epoch) for key in keys]
    pixels = [prepare(source.image(i)) for img_keys, _, _ in chosen for i in img_keys]
    images = collate(pixels)  # (B*K, 3, S, S)
    tokens = tokenizer([t for _, texts, _ in chosen for t in texts]).long()  # (B*K, L)
    batch["extra_image"] = images.view(b, k, *images.shape[1:])  # (B, K, 3, S, S)
    batch["extra_text"] = tokens.view(b, k, -1)  # (B, K, L)
    batch["extra_image_group"] = torch.tensor([[source.group_id(i) for i in c[0]] for c in chosen])  # (B, K)
    batch["extra_text_group"] = torch.tensor([[source.group_id(i) for i in c[2]] for c in chosen])  # (B, K)
    if "group" not in batch:  # without a group field each sample is its own group (the stream's rule)
        batch["group"] = torch.tensor([st.group_id(key) for key in keys])  # (B,)
    return batch


def attach_negatives(batches: Iterable[dict], source: NegativeSource, prepare: Callable, collate: Callable,
                     tokenizer: Callable, epoch: int = 0) -> Iterator[dict]:
    """The generator form of `attach` over a stream of batches; items without "key" pass through."""
    for batch in batches:
        yield attach(batch, source, prepare, collate, tokenizer, epoch) if "key" in batch else batch
