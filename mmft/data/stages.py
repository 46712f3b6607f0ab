"""Generator stages of the mmft data pipeline, each over an iterator so that a list tests it.

shard urls -> read_shard (tar members grouped by key) -> take_every / mix -> shuffled
-> decode_samples (captions, group, RGB image, transform) -> batches (exact count) -> collate.

Bad input never raises here: a stage skips it and counts it in a `SkipStats` by reason.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import random
import re
import tarfile
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

from mmft.data.tar_reader import open_shard, tar_members

logger = logging.getLogger("mmft.data.stream")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Reasons a sample (or a whole shard) is dropped; "topped_up" counts repeats that fill a short worker.
SKIP_REASONS = (
    "unreadable_shard", "truncated_shard", "unsafe_name", "missing_image", "bad_image", "oversized_image",
    "missing_caption", "empty_caption", "bad_text", "topped_up",
)
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule: key = path up to the first dot
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


class DataError(ValueError):
    """A data spec or data config that cannot work (no shard file, unreadable source, bad weights...)."""


class SkipSample(Exception):
    """Raised inside a stage for a sample that must be dropped; `reason` names the counter."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


class SkipStats:
    """Counts of skipped samples by reason, with the first example of each reason.

    Worker processes fill one and send `take_delta()` with each batch; the main process `merge`s the
    deltas into the stream's own instance, which logs one warning per reason (log=True).
    """

    def __init__(self, log: bool = False):
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}
        self.log = log
        self._sent: dict[str, int] = {}
        self._sent_examples: set[str] = set()

    def add(self, reason: str, n: int = 1, example: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        if reason not in self.examples:
            self.examples[reason] = example
            if self.log:
                logger.warning("data: skipping %s, e.g. %s (further ones are only counted)", reason, example)

    def merge(self, delta: dict) -> None:
        """Add a `take_delta()` from another process."""
        examples = delta.get("examples", {})
        for reason, n in delta.get("counts", {}).items():
            self.add(reason, n, examples.get(reason, ""))

    def take_delta(self) -> dict:
        """Counts (and first examples) added since the previous call, as plain picklable dicts."""
        counts = {r: n - self._sent.get(r, 0) for r, n in self.counts.items() if n != self._sent.get(r, 0)}
        examples = {r: e for r, e in self.examples.items() if r not in self._sent_examples}
        self._sent = dict(self.counts)
        self._sent_examples.update(examples)
        return {"counts": counts, "examples": examples}

    @property
    def total(self) -> int:
        """Samples dropped (shards and top-up repeats not included)."""
        not_samples = ("unreadable_shard", "truncated_shard", "topped_up")
        return sum(n for r, n in self.counts.items() if r not in not_samples)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def __str__(self) -> str:
        return ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items())) or "none"

    def __repr__(self) -> str:
        return f"SkipStats({self})"


# ---------------------------------------------------------------- shards -> raw samples


def unsafe_name(name: str) -> bool:
    """True for a member name that is absolute or climbs out of its folder ('..'): never a sample key.

    Keys become ids in embeddings, indexes and search results, where a caller may well join them to
    a folder; such names are refused where they enter, so no key can ever point outside it.
    """
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts


def sample_key(name: str) -> tuple[str | None, str | None]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'); metadata ('__x__') and names without a dot ->
    (None, None)."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith("__") and base.split(".", 1)[0].endswith("__"):
        return None, None
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def group_members(members: Iterable[tuple[str, bytes | None]], url: str = "",
                  progress: dict | None = None, stats: SkipStats | None = None) -> Iterator[dict]:
    """(name, data) tar members -> samples {"__key__", "__url__", ext: data}, grouping consecutive keys.

    A sample is yielded once the next key starts. If `members` fails, the sample in progress is
    yielded only when `progress["name"]` (the member being read) already belongs to the next key.
    Members with unsafe names are dropped (counted once per key as "unsafe_name" in `stats`).
    """
    current, refused = None, None
    try:
        for name, data in members:
            if unsafe_name(name):
                if stats is not None and sample_key(name)[0] != refused:
                    stats.add("unsafe_name", example=f"'{name}' in {url}: absolute or '..' member name")
                refused = sample_key(name)[0]
                continue
            key, ext = sample_key(name)
            if key is None:
                continue
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext] = data
    except _TAR_ERRORS:
        if current is not None and progress and sample_key(progress["name"])[0] != current["__key__"]:
            yield current
        raise
    if current is not None:
        yield current


def read_shard(url: str, stats: SkipStats, *, count_shard: bool = True) -> Iterator[dict]:
    """Raw samples of one shard; an unreadable or truncated shard is counted and cut short, never raised.

    count_shard=False leaves shard-level counts (bad shard, unsafe names) out of `stats`: for readers
    that each read the same shards and keep every n-th sample, so that only one of them counts them.
    """
    progress: dict = {}
    shard_stats = stats if count_shard else SkipStats()
    try:
        with open_shard(url) as stream:
            yield from group_members(tar_members(stream, progress=progress), url, progress, shard_stats)
    except _TAR_ERRORS as exn:
        reason = "truncated_shard" if progress else "unreadable_shard"  # did any member header parse?
        shard_stats.add(reason, example=f"{url}: {type(exn).__name__}: {exn}")


def read_shards(urls: Iterable[str], stats: SkipStats, *, count_shards: bool = True) -> Iterator[dict]:
    for url in urls:
        yield from read_shard(url, stats, count_shard=count_shards)


def take_every(samples: Iterable, every: int, offset: int) -> Iterator:
    """Samples whose position i satisfies i % every == offset (split one stream across readers)."""
    return itertools.islice(samples, offset, None, every)


def resampled(urls: Sequence[str], rng: random.Random, stats: SkipStats, name: str = "") -> Iterator[dict]:
    """Samples of shards drawn with replacement, forever; raises if every shard of the source is
    unreadable."""
    dead: set[str] = set()
    alive = False
    while True:
        url = rng.choice(urls)
        got = False
        for sample in read_shard(url, stats):
            got = alive = True
            yield sample
        if not got and not alive:
            dead.add(url)
            if len(dead) == len(set(urls)):
                raise DataError(f"no shard of training source '{name or urls[0]}' could be read; "
                                "check the files or remove the source from data.train")


def mix(streams: Sequence[Iterator], weights: Sequence[float], rng: random.Random) -> Iterator:
    """Each item drawn from stream i with probability weights[i] / sum(weights); ends when all end."""
    streams, weights = list(streams), list(weights)
    while streams:
        i = rng.choices(range(len(streams)), weights)[0]
        try:
            yield next(streams[i])
        except StopIteration:
            del streams[i], weights[i]


def shuffled(samples: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """Shuffle through a buffer of `bufsize` items (each output drawn at random from the buffer)."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(bufsize)
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


# ---------------------------------------------------------------- raw sample -> decoded sample


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exn:
        raise SkipSample("bad_text", f"not UTF-8 ({exn})") from None


def _json(sample: dict) -> dict | None:
    if "json" not in sample:
        return None
    if "_meta" not in sample:  # parsed once, for the caption and the group
        try:
            meta = json.loads(_text(sample["json"]))
        except json.JSONDecodeError as exn:
            raise SkipSample("bad_text", f"invalid JSON ({exn})") from None
        sample["_meta"] = meta if isinstance(meta, dict) else {}
    return sample["_meta"]


def parse_captions(sample: dict, caption_key: str = "txt", caption_field: str = "caption") -> list[str]:
    """All non-empty captions of a raw sample: lines of .txt, or a string / list of strings in .json."""
    if caption_key == "txt":
        if "txt" not in sample:
            raise SkipSample("missing_caption", "no .txt member")
        captions = [line.strip() for line in _text(sample["txt"]).splitlines()]
    else:
        meta = _json(sample)
        if meta is None or caption_field not in meta:
            raise SkipSample("missing_caption", f"no .json field '{caption_field}'")
        value = meta[caption_field]
        values = value if isinstance(value, list) else [value]
        captions = [v.strip() for v in values if isinstance(v, str)]
    captions = [c for c in captions if c]
    if not captions:
        raise SkipSample("empty_caption", "no non-empty caption")
    return captions


def parse_group(sample: dict, group_field: str) -> str | None:
    """The group/label id of a raw sample as a string; None when the sample has none."""
    meta = _json(sample)
    value = None if meta is None else meta.get(group_field)
    return None if value is None or value == "" else str(value)


def too_many_pixels(image) -> str:
    """Why an opened (not yet decoded) PIL image is too large to decode, or "" when it is not.

    PIL refuses images over twice Image.MAX_IMAGE_PIXELS (~179M pixels) and only warns above it;
    a small file that claims 150M pixels (a decompression bomb) would decode to ~450 MB, so mmft
    refuses from the limit itself.
    """
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    w, h = image.size
    if limit and w * h > limit:
        return f"{w} x {h} pixels is over PIL's Image.MAX_IMAGE_PIXELS ({limit}): a decompression bomb?"
    return ""


def decode_image(sample: dict, draft_size: int | None = None):
    """The first image member as an RGB PIL image; JPEGs decode at reduced scale when >= 2x draft_size."""
    from PIL import Image

    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise SkipSample("missing_image", "no .jpg/.jpeg/.png/.webp member")
    try:
        with warnings.catch_warnings():  # PIL warns between 1x and 2x its limit: refused below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(sample[ext]))  # reads the header only
    except Image.DecompressionBombError as exn:
        raise SkipSample("oversized_image", str(exn)) from None
    except Exception as exn:  # noqa: BLE001 (corrupt data raises OSError, ValueError, SyntaxError...)
        raise SkipSample("bad_image", f"{type(exn).__name__}: {exn}") from None
    if reason := too_many_pixels(image):
        raise SkipSample("oversized_image", reason)
    try:
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image = image.convert("RGB") if image.mode != "RGB" else image
        image.load()
    except Exception as exn:  # noqa: BLE001 (corrupt data raises OSError, ValueError, SyntaxError...)
        raise SkipSample("bad_image", f"{type(exn).__name__}: {exn}") from None
    return image


def decode_samples(samples: Iterable[dict], transform: Callable, stats: SkipStats, *,
                   caption_key: str = "txt", caption_field: str = "caption", group_field: str = "",
                   draft_size: int | None = None) -> Iterator[dict]:
    """Raw samples -> {"key", "image": transform(RGB image), "captions": list[str], "group": str | None}."""
    for sample in samples:
        try:
            captions = parse_captions(sample, caption_key, caption_field)
            group = parse_group(sample, group_field) if group_field else None
            image = decode_image(sample, draft_size)
        except SkipSample as exn:
            stats.add(exn.reason, example=f"'{sample['__key__']}' in {sample['__url__']}: {exn}")
            continue
        yield {"key": sample["__key__"], "image": transform(image), "captions": captions, "group": group}


# ---------------------------------------------------------------- decoded samples -> batches


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def choose_caption(captions: Sequence[str], seed: int, epoch: int, key: str) -> str:
    """One caption per image and step, the same for a given (seed, epoch, key) in any process."""
    if len(captions) == 1:
        return captions[0]
    return captions[int.from_bytes(_digest(f"{seed}:{epoch}:{key}"), "little") % len(captions)]


def group_id(group: str) -> int:
    """A deterministic signed int64 for a string group id (blake2b, stable across processes and runs)."""
    return int.from_bytes(_digest(group), "little", signed=True)


def batches(samples: Iterable, batch_size: int, full: int, tail: int, stats: SkipStats) -> Iterator[tuple]:
    """Exactly `full` ("full", list of batch_size) then one ("tail", list of `tail`) when tail > 0.

    When bad samples leave the stream short, earlier samples are repeated (counted as "topped_up"),
    taken from the previous batch so that no batch holds the same sample twice; surplus is dropped.
    """
    source = iter(samples)
    previous: deque = deque(maxlen=batch_size)
    reused = 0
    for kind, size in [("full", batch_size)] * full + ([("tail", tail)] if tail else []):
        batch = list(itertools.islice(source, size))
        pool = previous or batch
        if len(batch) < size and pool:
            fill = [pool[(reused + i) % len(pool)] for i in range(size - len(batch))]
            reused += len(fill)
            stats.add("topped_up", len(fill), example=f"{len(fill)} earlier samples repeated to fill a batch")
            batch += fill
        if len(batch) < size:
            logger.warning("data: a reader found no valid sample; its share of the epoch is missing")
            return
        previous.extend(batch)
        yield kind, batch
