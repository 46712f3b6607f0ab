"""Bad data: every bad sample and bad shard skipped and counted exactly once, no good sample lost.

Readers are run the way that used to double count: fewer shards than readers, where every reader
reads every shard and keeps every n-th sample. Train runs use 2 ranks x 2 DataLoader workers, their
counts summed over the ranks (each rank counts only what it reads).
"""
from __future__ import annotations

import uuid
from pathlib import Path

from faults.common import Outcome, good_sample, image_bytes, png_bomb, preprocess, tokenize
from mmft.data.shard_writer import write_tar


def bad_samples() -> dict[str, tuple[list, str, str]]:
    """kind -> (members of the bad sample "bad", skip reason it must be counted under, caption source)."""
    caption = ("bad.txt", b"c")
    return {
        "undecodable image": ([("bad.png", b"\x89PNG\r\n\x1a\n not an image"), caption], "bad_image", "txt"),
        "truncated image": ([("bad.png", image_bytes(1)[:70]), caption], "bad_image", "txt"),
        "decompression bomb": ([("bad.png", png_bomb(12_000, 12_000)), caption], "oversized_image", "txt"),
        "empty caption": ([("bad.png", image_bytes(2)), ("bad.txt", b" \n \n")], "empty_caption", "txt"),
        "non-UTF-8 caption": ([("bad.png", image_bytes(3)), ("bad.txt", b"caf\xe9 \xff")], "bad_text", "txt"),
        "missing image member": ([("bad.txt", b"a caption, no image")], "missing_image", "txt"),
        "missing caption member": ([("bad.png", image_bytes(4))], "missing_caption", "txt"),
        "broken JSON": ([("bad.png", image_bytes(5)), ("bad.json", b'{"caption": "cut')], "bad_text", "json"),
    }


def _data_cfg(specs: list[str], **kw):
    from mmft.config import DataConfig

    return DataConfig(**{"train": specs, "batch_size": 2, "num_workers": 2, "shuffle_buffer": 1, **kw})


def _eval(specs: list[str], workers: int = 2, **kw) -> tuple[list[str], dict]:
    from mmft.data.stream import eval_loader

    stream = eval_loader(specs, _data_cfg(specs, **kw), preprocess(), num_workers=workers)
    return [k for batch in stream for k in batch["key"]], stream.stats.as_dict()


def _train(specs: list[str], world: int = 2, **kw) -> tuple[set[str], dict]:
    """Keys seen and skip counts (top-ups left out) summed over `world` ranks x 2 workers."""
    from mmft.data.stream import train_loader

    keys: set[str] = set()
    counts: dict[str, int] = {}
    for rank in range(world):
        stream = train_loader(_data_cfg(specs, **kw), preprocess(), tokenize, rank=rank, world_size=world)
        keys.update(k for batch in stream for k in batch["key"])
        for reason, n in stream.stats.counts.items():
            if reason != "topped_up":
                counts[reason] = counts.get(reason, 0) + n
    return keys, counts


def _judge(out: Outcome, label: str, expected: dict, counts: dict, good: set[str] | None, seen) -> None:
    """Judged once per reader: survived = counted exactly as expected; data lost = good keys never seen."""
    out.survived = out.injected if counts == expected else 0
    lost = "" if good is None else f"; good samples lost {len(good - set(seen))}"
    out.data_lost += 0 if good is None else len(good - set(seen))
    out.notes.append(f"{label}: counted {counts or 'nothing'} (expected {expected}){lost}")


def bad_samples_eval(work: Path) -> Outcome:
    """Each kind alone in a shard between good samples, one shard read by 2 eval workers."""
    out = Outcome()
    for i, (kind, (members, reason, caption_key)) in enumerate(bad_samples().items()):
        good = [f"good{j}" for j in range(4)]
        parts = good_sample(good[0], 1) + good_sample(good[1], 2) + members + good_sample(good[2], 3)
        path = write_tar(work / f"kind{i}.tar", parts + good_sample(good[3], 4))
        seen, counts = _eval([path], caption_key=caption_key)
        one = Outcome(injected=1)
        _judge(one, kind, {reason: 1}, counts, set(good), seen)
        out.add(one)
    return out


def bad_samples_train(work: Path) -> Outcome:
    """Every .txt-caption kind in one shard among 25 good samples (32 in all), 2 ranks x 2 workers."""
    kinds = [v for v in bad_samples().values() if v[2] == "txt"]
    members, expected, good = [], {}, set()
    for i, (bad, reason, _) in enumerate(kinds):
        for j in range(3):
            members += good_sample(f"g{i}{j}", 10 * i + j)
            good.add(f"g{i}{j}")
        members += [(name.replace("bad", f"bad{i}"), data) for name, data in bad]
        expected[reason] = expected.get(reason, 0) + 1
    for j in range(32 - len(good) - len(kinds)):  # 4 readers x 4 batches of 2: nothing cut for lockstep
        members += good_sample(f"h{j}", 100 + j)
        good.add(f"h{j}")
    out = Outcome(injected=len(kinds))
    seen, counts = _train([write_tar(work / "mixed.tar", members)])
    _judge(out, "all kinds in one shard", expected, counts, good, seen)
    return out


def _cut_inside(path: Path, member: str) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.index(member.encode()) + 900])  # 900: inside the member's data


def bad_shards(work: Path) -> Outcome:
    """A truncated, an unreadable and a missing shard beside a good one: 2 eval workers, 2 train workers."""
    write_tar(work / "s-00000.tar", [m for i in range(8) for m in good_sample(f"a{i}", i)])
    write_tar(work / "s-00001.tar", [m for i in range(3) for m in good_sample(f"b{i}", 10 + i)])
    _cut_inside(work / "s-00001.tar", "b1.png")  # b0 survives
    (work / "s-00002.tar").write_bytes(b"this is not a tar file" * 50)
    spec = [str(work / "s-{00000..00003}.tar")]  # s-00003.tar does not exist
    good, expected = {f"a{i}" for i in range(8)} | {"b0"}, {"truncated_shard": 1, "unreadable_shard": 2}
    out, train = Outcome(injected=3), Outcome(injected=3)
    seen, counts = _eval(spec)
    _judge(out, "eval, 2 workers", expected, counts, good, seen)
    seen, counts = _train(spec, world=1, batch_size=1)
    _judge(train, "train, 2 workers", expected, counts, good, seen)
    return _both(out, train)


def _both(first: Outcome, second: Outcome) -> Outcome:
    """One row for two readers of the same faults: survived only what both survived."""
    first.survived = min(first.survived, second.survived)
    first.data_lost += second.data_lost
    first.crashes += second.crashes
    first.notes += second.notes
    return first


def truncated_shard_shared(work: Path) -> Outcome:
    """One truncated shard, fewer shards than readers: every reader reads it, one alone may count it."""
    cut = work / "only.tar"
    write_tar(cut, [m for i in range(6) for m in good_sample(f"c{i}", i)])
    _cut_inside(cut, "c5.png")
    good, expected = {f"c{i}" for i in range(5)}, {"truncated_shard": 1}
    out, train = Outcome(injected=1), Outcome(injected=1)
    seen, counts = _eval([str(cut)])
    _judge(out, "eval, 2 workers", expected, counts, good, seen)
    seen, counts = _train([str(cut)], batch_size=1)  # ranks keep in step: samples cut for that are not lost
    _judge(train, "train, 2 ranks x 2 workers", expected, counts, None, seen)
    return _both(out, train)


def unsafe_member_names(work: Path) -> Outcome:
    """Members named '../x' or '/abs/x' are dropped and counted, and nothing is written anywhere."""
    outside = Path("/tmp") / f"mmft-fault-{uuid.uuid4().hex}"
    image, before = image_bytes(7), sorted(p.name for p in work.parent.iterdir())
    members = (good_sample("ok0", 1) + [("../escape.png", image), ("../escape.txt", b"up and out")]
               + [(f"{outside}/abs.png", image), (f"{outside}/abs.txt", b"absolute")] + good_sample("ok1", 2))
    path = write_tar(work / "names.tar", members)
    out = Outcome(injected=2)
    seen, counts = _eval([path], workers=1)
    _judge(out, "'../' and absolute member names", {"unsafe_name": 2}, counts, {"ok0", "ok1"}, seen)
    if outside.exists() or sorted(p.name for p in work.parent.iterdir()) != before:
        out.survived, out.crashes = 0, out.crashes + 1
        out.notes.append("a member name reached the file system")
    return out
