"""Bad input to the data stream: every bad sample and shard skipped and counted exactly once.

Shards are written on the fly; readers are run with fewer shards than workers (each worker reads
every shard and keeps every n-th sample), where a bad shard used to be counted once per worker.
"""
from __future__ import annotations

import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from test_data import PREPROCESS, cfg, keys_of, sample, tokenize

from mmft.data import stages as st
from mmft.data.shard_writer import write_tar
from mmft.data.stream import SkipStats, count_samples, eval_loader, train_loader


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: a few KB that decode to width*height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def truncated_shard(path: Path) -> str:
    """Three samples, the file cut inside the second one's image."""
    write_tar(path, sample("t1", seed=1) + sample("t2", seed=2) + sample("t3", seed=3))
    with tarfile.open(path) as tar:
        cut = tar.getmember("t2.png").offset_data + 50
    path.write_bytes(path.read_bytes()[:cut])
    return str(path)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_truncated_shard_read_by_several_eval_workers_is_counted_once(tmp_path, workers):
    path = truncated_shard(tmp_path / "s-00000.tar")
    stream = eval_loader([path], cfg([path]), PREPROCESS, num_workers=workers)
    assert keys_of(stream) == ["t1"]
    assert stream.stats.as_dict() == {"truncated_shard": 1}


def test_bad_shards_shared_by_train_workers_are_counted_once(tmp_path):
    good = write_tar(tmp_path / "s-00000.tar", [m for i in range(8) for m in sample(f"g{i}", seed=i)])
    cut = truncated_shard(tmp_path / "s-00001.tar")
    (tmp_path / "s-00002.tar").write_bytes(b"not a tar" * 100)
    specs = [good, cut, str(tmp_path / "s-00002.tar")]  # 3 shards for 2 ranks x 2 workers
    counts: dict[str, int] = {}
    for rank in (0, 1):
        stream = train_loader(cfg(specs, num_workers=2, batch_size=2), PREPROCESS, tokenize,
                              rank=rank, world_size=2)
        keys_of(stream)
        for reason, n in stream.stats.counts.items():
            counts[reason] = counts.get(reason, 0) + n
    counts.pop("topped_up", None)
    assert counts == {"truncated_shard": 1, "unreadable_shard": 1}


def test_members_named_outside_the_shard_never_become_keys(tmp_path):
    members = (sample("ok", seed=1) + [("../evil.png", sample("x")[0][1]), ("../evil.txt", b"escape")]
               + [("/abs/evil.png", sample("y")[0][1]), ("/abs/evil.txt", b"absolute")]
               + [("a/../../up.txt", b"climb")] + sample("ok2", seed=2))
    path = write_tar(tmp_path / "s.tar", members)
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    stream = eval_loader([path], cfg([path]), PREPROCESS, num_workers=1)
    assert keys_of(stream) == ["ok", "ok2"]
    assert stream.stats.as_dict() == {"unsafe_name": 3}  # one per refused key
    assert count_samples([path]) == 2  # the counter agrees with the reader
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before
    assert not Path("/abs").exists()
    assert [st.unsafe_name(n) for n in ("a/b.jpg", "a..b.jpg", "../x", "/x", "a\\..\\x")] == [
        False, False, True, True, True]


def test_a_decompression_bomb_is_refused_before_decoding():
    from PIL import Image

    bomb = png_claiming(12_000, 12_000)  # 144M pixels: PIL itself only warns below 2x its limit
    assert len(bomb) < 40_000 and 12_000 ** 2 > Image.MAX_IMAGE_PIXELS
    with pytest.raises(st.SkipSample) as exn:
        st.decode_image({"png": bomb})
    assert exn.value.reason == "oversized_image" and "12000 x 12000" in str(exn.value)
    with pytest.raises(st.SkipSample) as exn:
        st.decode_image({"png": png_claiming(20_000, 20_000)})  # over PIL's hard limit
    assert exn.value.reason == "oversized_image"
    assert st.decode_image({"png": png_claiming(64, 48)}).size == (64, 48)


def test_each_kind_of_bad_sample_is_counted_once_with_two_workers(tmp_path):
    from test_data import image_bytes

    bad = {
        "undecodable": [("k.png", b"\x89PNG not an image"), ("k.txt", b"c")],
        "truncated_image": [("k.png", image_bytes(1)[:60]), ("k.txt", b"c")],
        "bomb": [("k.png", png_claiming(12_000, 12_000)), ("k.txt", b"c")],
        "empty_caption": [("k.png", image_bytes(2)), ("k.txt", b"  \n")],
        "non_utf8": [("k.png", image_bytes(3)), ("k.txt", b"caf\xe9")],
        "no_image": [("k.txt", b"caption only")],
        "no_caption": [("k.png", image_bytes(4))],
    }
    members = []
    for i, (name, parts) in enumerate(bad.items()):
        members += sample(f"good{i}", seed=10 + i)
        members += [(f"{name}.{n.split('.', 1)[1]}", data) for n, data in parts]
    path = write_tar(tmp_path / "s.tar", members)
    stream = eval_loader([path], cfg([path]), PREPROCESS, num_workers=2)
    assert sorted(keys_of(stream)) == [f"good{i}" for i in range(len(bad))]
    assert stream.stats.as_dict() == {"bad_image": 2, "bad_text": 1, "empty_caption": 1,
                                      "missing_caption": 1, "missing_image": 1, "oversized_image": 1}


def test_broken_json_is_a_bad_sample_when_captions_come_from_json(tmp_path):
    broken = [("bad.png", sample("x")[0][1]), ("bad.json", b'{"caption": "unterminated')]
    members = sample("good", seed=1) + broken
    path = write_tar(tmp_path / "s.tar", members)
    stream = eval_loader([path], cfg([path], caption_key="json"), PREPROCESS, num_workers=1)
    assert keys_of(stream) == ["good"] and stream.stats.as_dict() == {"bad_text": 1}


def test_read_shard_without_counting_still_cuts_the_shard_short(tmp_path):
    path = truncated_shard(tmp_path / "s.tar")
    stats = SkipStats()
    assert [s["__key__"] for s in st.read_shard(path, stats, count_shard=False)] == ["t1"]
    assert stats.as_dict() == {}


@pytest.mark.parametrize("sizes", ['{"s.tar": -3}', '{"s.tar": "12"}', '{"s.tar": true}', '[12]',
                                   '{"s.tar": 1'])
def test_a_bad_sizes_json_is_ignored_with_a_warning_naming_it(tmp_path, caplog, sizes):
    path = write_tar(tmp_path / "s.tar", sample("a", seed=1) + sample("b", seed=2))
    (tmp_path / "sizes.json").write_text(sizes)
    assert count_samples([path]) == 2  # counted from the tar headers instead
    assert str(tmp_path / "sizes.json") in caplog.text


def test_a_truncation_past_the_readers_quota_is_still_counted(tmp_path):
    path = truncated_shard(tmp_path / "s.tar")  # t1 readable; the header count says 1 sample
    stream = train_loader(cfg([path], batch_size=1, num_workers=0, shuffle_buffer=1), PREPROCESS, tokenize)
    assert keys_of(stream) == ["t1"]  # the quota is met before the reader reaches the cut
    assert stream.stats.as_dict() == {"truncated_shard": 1}
