"""The streaming data pipeline: tiny tar shards written on the fly, stages tested on lists."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mmft.config import DataConfig
from mmft.data import stages as st
from mmft.data.shard_writer import write_tar
from mmft.data.stream import (
    DataError,
    SkipStats,
    count_samples,
    eval_loader,
    expand_specs,
    make_train_transform,
    plan_epoch,
    shard_sizes,
    train_loader,
    train_transform,
)

L = 6  # token length of the test tokenizer


def tokenize(texts: list[str]) -> torch.Tensor:
    """A stand-in tokenizer: words hashed to ids, padded to L."""
    rows = []
    for text in texts:
        ids = [int(hashlib.md5(w.encode()).hexdigest(), 16) % 997 + 1 for w in text.split()][:L]
        rows.append(ids + [0] * (L - len(ids)))
    return torch.tensor(rows)


PREPROCESS = T.Compose([T.Resize((16, 16)), T.ToTensor()])


def image_bytes(seed: int, fmt: str = "png", size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG" if fmt == "jpg" else fmt.upper())
    return buf.getvalue()


def sample(key: str, captions=("a photo",), group: str | None = None, fmt: str = "png",
           seed: int = 0) -> list:
    """Members of one sample as mmft's writer lays them out: image, .txt (one caption a line), .json."""
    meta = {"caption": list(captions)}
    if group is not None:
        meta["group"] = group
    return [(f"{key}.{fmt}", image_bytes(seed, fmt)), (f"{key}.txt", "\n".join(captions).encode()),
            (f"{key}.json", json.dumps(meta).encode())]


def write_dataset(root, shards: int, per_shard: int, prefix: str = "s", group_every: int = 0) -> list[str]:
    """`shards` shards of `per_shard` samples, keys '<prefix><shard>_<i>', two captions each."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"{prefix}{s:02d}_{i:03d}"
            group = f"g{(s * per_shard + i) // group_every}" if group_every else None
            members += sample(key, (f"first {key}", f"second {key}"), group=group, seed=s * 1000 + i)
        paths.append(write_tar(root / f"{prefix}-{s:05d}.tar", members))
    return paths


def cfg(tmp_path_or_specs, **kw) -> DataConfig:
    specs = tmp_path_or_specs if isinstance(tmp_path_or_specs, list) else [str(tmp_path_or_specs)]
    base = {"train": specs, "batch_size": 8, "num_workers": 0, "shuffle_buffer": 16}
    base.update(kw)
    return DataConfig(**base)


def keys_of(stream) -> list[str]:
    return [k for batch in stream for k in batch["key"]]


# ---------------------------------------------------------------- stages on lists


def test_group_members_and_sample_key():
    members = [("a/001.jpg", b"i"), ("a/001.TXT", b"t"), ("__meta__", b"m"), ("a/002.json", b"j"),
               ("noext", b"x")]
    out = list(st.group_members(members, "u"))
    assert [s["__key__"] for s in out] == ["a/001", "a/002"]
    assert out[0]["jpg"] == b"i" and out[0]["txt"] == b"t" and out[1]["json"] == b"j"
    assert st.sample_key("d.x/k.seg.png") == ("d.x/k", "seg.png")


def test_parse_captions_txt_json_and_bad_text():
    s = {"txt": b"one\n\n  two  \n", "json": json.dumps({"caption": ["x", " ", "y"], "group": 7}).encode()}
    assert st.parse_captions(s, "txt") == ["one", "two"]
    assert st.parse_captions(dict(s), "json") == ["x", "y"]
    assert st.parse_captions({"json": b'{"text": "solo"}'}, "json", "text") == ["solo"]
    assert st.parse_group(dict(s), "group") == "7"
    for bad, reason in [({"txt": b" \n\n"}, "empty_caption"), ({"txt": b"\xff\xfe caf\xe9"}, "bad_text"),
                        ({"jpg": b""}, "missing_caption")]:
        with pytest.raises(st.SkipSample) as exn:
            st.parse_captions(bad, "txt")
        assert exn.value.reason == reason
    with pytest.raises(st.SkipSample) as exn:
        st.parse_captions({"json": b"{not json"}, "json")
    assert exn.value.reason == "bad_text"


def test_shuffled_is_a_seeded_permutation():
    items = list(range(100))
    a = list(st.shuffled(items, 10, random.Random(1)))
    assert sorted(a) == items and a != items
    assert a == list(st.shuffled(items, 10, random.Random(1)))
    assert a != list(st.shuffled(items, 10, random.Random(2)))


def test_take_every_splits_a_stream_exactly():
    parts = [list(st.take_every(iter(range(23)), 4, k)) for k in range(4)]
    assert sorted(x for p in parts for x in p) == list(range(23))


def test_mix_follows_weights():
    def forever(tag):
        while True:
            yield tag
    draws = st.mix([forever("a"), forever("b")], [0.8, 0.2], random.Random(0))
    counts = Counter(next(draws) for _ in range(5000))
    assert abs(counts["a"] / 5000 - 0.8) < 0.03


def test_batches_exact_count_and_top_up_without_in_batch_repeats():
    stats = SkipStats()
    items = [{"key": str(i)} for i in range(13)]  # 3 short of 2 full batches of 8
    out = list(st.batches(items, 8, full=2, tail=0, stats=stats))
    assert [k for k, _ in out] == ["full", "full"] and all(len(b) == 8 for _, b in out)
    assert len({s["key"] for s in out[1][1]}) == 8  # repeats come from the previous batch
    assert stats.counts == {"topped_up": 3}
    out = list(st.batches(items, 8, full=1, tail=3, stats=SkipStats()))  # surplus dropped
    assert [(k, len(b)) for k, b in out] == [("full", 8), ("tail", 3)]


def test_skip_stats_deltas_merge():
    worker, main = SkipStats(), SkipStats(log=False)
    worker.add("bad_image", example="k1")
    main.merge(worker.take_delta())
    worker.add("bad_image")
    worker.add("empty_caption", 2)
    main.merge(worker.take_delta())
    main.merge(worker.take_delta())  # nothing new
    assert main.as_dict() == {"bad_image": 2, "empty_caption": 2}
    assert main.examples["bad_image"] == "k1" and main.total == 4


def test_caption_choice_and_group_id_are_stable():
    caps = ["a", "b", "c"]
    assert st.choose_caption(caps, 0, 0, "k") == st.choose_caption(caps, 0, 0, "k")
    assert {st.choose_caption(caps, 0, e, "k") for e in range(30)} == set(caps)
    ids = {st.group_id(f"g{i}") for i in range(100)}
    assert len(ids) == 100 and all(-(2**63) <= i < 2**63 for i in ids)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_tar_reader_matches_tarfile(fmt):
    from mmft.data.tar_reader import fast_tar_members, reference_tar_members, tar_members

    buf = io.BytesIO()
    names = ["k1.jpg", "k1.txt", "d" * 120 + "/k2.jpg", "caf\u00e9/k3.png", "k4.txt"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append("e" * 150 + ".json")  # too long for ustar's name + prefix
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(_dir_info("adir"))
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            data = bytes(range(256)) * i + b"end"  # sizes 3, 259, 515...: ragged 512-byte blocks
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k1.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "k1.jpg"
        tar.addfile(link)
    raw = buf.getvalue()
    ref = list(reference_tar_members(io.BytesIO(raw)))
    assert [n for n, _ in ref] == names
    assert list(fast_tar_members(io.BytesIO(raw))) == ref
    assert list(tar_members(io.BytesIO(raw), headers_only=True)) == [(n, None) for n in names]
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb") as f:
        f.write(raw)
    assert list(tar_members(io.BytesIO(gz.getvalue()))) == ref  # compressed: the tarfile path
    for bad in (b"garbage" * 100, raw[:700]):  # not a tar; cut inside a member
        with pytest.raises(tarfile.ReadError):
            list(tar_members(io.BytesIO(bad)))


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


# ---------------------------------------------------------------- specs, sizes, plan


def test_expand_specs_braces_globs_dirs_and_missing(tmp_path):
    paths = write_dataset(tmp_path / "d", 3, 2)
    assert expand_specs(str(tmp_path / "d" / "s-{00000..00002}.tar")) == paths
    assert expand_specs([str(tmp_path / "d" / "s-*.tar")]) == paths
    assert expand_specs(str(tmp_path / "d")) == paths
    assert expand_specs("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]
    kept = expand_specs(str(tmp_path / "d" / "s-{00000..00003}.tar"))  # one missing: kept, skipped later
    assert len(kept) == 4
    missing = str(tmp_path / "nope-{00000..00009}.tar")
    with pytest.raises(DataError, match="nope-"):
        expand_specs(missing)


def test_count_samples_with_and_without_sizes_json(tmp_path):
    paths = write_dataset(tmp_path, 2, 5)
    assert count_samples(paths) == 10
    (tmp_path / "sizes.json").write_text(json.dumps({"s-00000.tar": 7}))
    assert shard_sizes(paths) == [7, 5]  # listed shard from sizes.json, the other from its headers
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(bytes(range(256)) * 8)
    assert count_samples([str(garbage), str(tmp_path / "missing.tar")]) == 0


def test_plan_covers_every_sample_once_with_equal_rank_lengths():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 9)
        sizes = [rng.randint(0, 40) for _ in range(n)]
        world, workers, b = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 8)
        if sum(sizes) < world * b:
            continue
        urls = [f"u{i}" for i in range(n)]
        readers, nb = plan_epoch(urls, sizes, seed=1, epoch=2, world_size=world, workers=workers,
                                 batch_size=b)
        seen = []
        for rank in readers:
            assert sum(r.full for r in rank) + sum(r.tail for r in rank) // b == nb
            assert sum(r.tail for r in rank) % b == 0
            for r in rank:  # the samples this reader can see
                pos = [(u, i) for u in r.urls for i in range(sizes[urls.index(u)])]
                seen += pos[r.offset::r.every]
        assert len(seen) == len(set(seen)) == sum(sizes)


def test_plan_balances_equal_shards_across_ranks():
    """6 equal shards on 2 ranks x 2 workers: 3 shards a rank, nothing cut (rank-first dealing cut 1/3)."""
    urls = [f"u{i}" for i in range(6)]
    readers, nb = plan_epoch(urls, [10] * 6, seed=0, epoch=0, world_size=2, workers=2, batch_size=5)
    assert [sum(len(r.urls) for r in rank) for rank in readers] == [3, 3]
    assert nb == 6  # 30 samples per rank, batch 5: every sample used


# ---------------------------------------------------------------- loaders


def test_train_epoch_two_workers_each_sample_once_and_deterministic(tmp_path):
    write_dataset(tmp_path, 4, 10, group_every=2)  # 40 samples, 5 batches of 8
    c = cfg(tmp_path, num_workers=2, group_field="group")
    stream = train_loader(c, PREPROCESS, tokenize, seed=3)
    batches = list(stream)
    assert len(batches) == len(stream) == stream.num_batches == 5
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(f"s{s:02d}_{i:03d}" for s in range(4) for i in range(10))
    b = batches[0]
    assert b["image"].shape == (8, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["text"].shape == (8, L) and b["text"].dtype == torch.int64
    for key, text, group in zip(b["key"], b["text"], b["group"]):
        assert any(torch.equal(text, tokenize([f"{w} {key}"])[0]) for w in ("first", "second"))
        s, i = int(key[1:3]), int(key[4:])
        assert group.item() == st.group_id(f"g{(s * 10 + i) // 2}")
    assert keys == keys_of(stream)  # same epoch, same order
    stream.set_epoch(1)
    assert keys_of(stream) != keys
    assert stream.stats.as_dict() == {}


def test_augmented_stream_is_reproducible(tmp_path):
    write_dataset(tmp_path, 2, 8)
    c = cfg(tmp_path, num_workers=2, augment_scale=[0.5, 1.0], augment_hflip=True)
    stream = train_loader(c, train_transform(16, (0.5,) * 3, (0.5,) * 3, c), tokenize, seed=1)
    first, again = list(stream), list(stream)
    assert first[0]["image"].shape == (8, 3, 16, 16)
    for a, b in zip(first, again):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    stream.set_epoch(1)
    other = {k: img for batch in stream for k, img in zip(batch["key"], batch["image"])}
    assert not torch.equal(other[first[0]["key"][0]], first[0]["image"][0])


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_split_the_epoch(tmp_path, workers):
    for shards in (4, 1):  # at least as many shards as readers (shard split), fewer (sample split)
        root = tmp_path / f"n{shards}"
        write_dataset(root, shards, 40 // shards)
        seen, lengths = [], []
        for rank in (0, 1):
            c = cfg(root, batch_size=4, num_workers=workers)
            stream = train_loader(c, PREPROCESS, tokenize, rank=rank, world_size=2)
            keys = keys_of(stream)
            lengths.append((len(stream), len(keys) // 4))
            seen += keys
        assert lengths[0] == lengths[1] and lengths[0][0] == lengths[0][1]
        assert len(seen) == len(set(seen)) == 40


def test_resampled_mixture_follows_weights(tmp_path):
    a = write_dataset(tmp_path / "a", 2, 20, prefix="a")
    b = write_dataset(tmp_path / "b", 2, 20, prefix="b")
    c = cfg([str(tmp_path / "a" / "a-{00000..00001}.tar"), str(tmp_path / "b" / "b-{00000..00001}.tar")],
            resampled=True, train_weights=[0.8, 0.2], epoch_samples=2000, batch_size=50, shuffle_buffer=100)
    stream = train_loader(c, PREPROCESS, tokenize)
    keys = keys_of(stream)
    assert len(stream) == 40 and len(keys) == 2000 and a and b
    frac = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(frac - 0.8) < 0.04
    with pytest.raises(DataError, match="resampled"):
        train_loader(cfg(c.train, train_weights=[0.8, 0.2]), PREPROCESS, tokenize)


def test_bad_samples_and_shards_are_skipped_and_counted(tmp_path):
    write_dataset(tmp_path, 2, 12)  # 24 good samples
    bad = (sample("bad_img") + sample("empty_cap", captions=("",)) + sample("no_txt")[:1]
           + sample("ok1", seed=5)
           + [("no_img.txt", b"caption only"), ("latin1.png", image_bytes(1)),
              ("latin1.txt", b"caf\xe9 \xff")])
    bad[0] = ("bad_img.png", b"\x89PNG not really an image")
    write_tar(tmp_path / "s-00002.tar", bad)
    truncated = write_tar(tmp_path / "s-00003.tar",
                          sample("t1", seed=7) + sample("t2", seed=8) + sample("t3", seed=9))
    with tarfile.open(truncated) as tar:
        cut = tar.getmember("t2.png").offset_data + 100
    (tmp_path / "s-00003.tar").write_bytes((tmp_path / "s-00003.tar").read_bytes()[:cut])  # inside t2's image
    (tmp_path / "s-00004.tar").write_bytes(b"garbage" * 300)
    spec = str(tmp_path / "s-{00000..00005}.tar")  # s-00005.tar does not exist
    assert count_samples(expand_specs(spec)) == 24 + 6 + 1
    # a buffer larger than each worker's share makes every worker read all its shards
    stream = train_loader(cfg([spec], num_workers=2, batch_size=4, shuffle_buffer=100), PREPROCESS, tokenize)
    keys = keys_of(stream)
    assert len(keys) == 4 * len(stream) == 28  # 31 counted, the last incomplete batch dropped
    assert not set(keys) & {"bad_img", "empty_cap", "no_txt", "no_img", "latin1", "t2"}
    expected = {"bad_image": 1, "empty_caption": 1, "missing_caption": 1, "missing_image": 1, "bad_text": 1,
                "truncated_shard": 1, "unreadable_shard": 2}
    assert {r: n for r, n in stream.stats.counts.items() if r != "topped_up"} == expected
    evals = eval_loader([spec], cfg([spec]), PREPROCESS, num_workers=1)
    assert len(keys_of(evals)) == 26 and evals.stats.as_dict() == expected


def test_eval_loader_keeps_all_captions_in_order(tmp_path):
    paths = write_dataset(tmp_path, 3, 5, group_every=5)
    c = cfg(tmp_path, caption_key="json", group_field="group")
    batches = list(eval_loader(paths, c, PREPROCESS, batch_size=4, num_workers=1))
    keys = [k for b in batches for k in b["key"]]
    assert keys == [f"s{s:02d}_{i:03d}" for s in range(3) for i in range(5)]  # shard order, in-shard order
    assert [len(b["key"]) for b in batches] == [4, 4, 4, 3]
    assert batches[0]["captions"][0] == ["first s00_000", "second s00_000"]
    assert batches[-1]["group"] == ["g2"] * 3 and batches[0]["image"].shape == (4, 3, 16, 16)
    two = [k for b in eval_loader(paths, c, PREPROCESS, batch_size=4, num_workers=2) for k in b["key"]]
    assert sorted(two) == sorted(keys)


# ---------------------------------------------------------------- augmentation


def test_train_transform_fast_path_matches_reference():
    c = DataConfig(augment_scale=[0.5, 1.0], augment_hflip=True, augment_color_jitter=0.2)
    tf = train_transform(24, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), c)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (37, 29, 3), dtype=np.uint8))
              for i in range(5)]
    torch.manual_seed(0)
    ref = torch.stack([tf(im) for im in images])  # (5, 3, 24, 24)
    torch.manual_seed(0)
    fast = tf.collate([tf.pixels(im) for im in images])
    assert fast.shape == ref.shape == (5, 3, 24, 24)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    plain = (torch.from_numpy(np.array(images[0].resize((24, 24)))).permute(2, 0, 1).float() / 255)
    assert not torch.allclose(ref[0], (plain - torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1)) / 0.2)


def test_make_train_transform_reads_the_model_preprocess():
    pre = T.Compose([T.Resize(32), T.CenterCrop(28), T.ToTensor(),
                     T.Normalize((0.1, 0.2, 0.3), (0.5, 0.5, 0.5))])
    tf = make_train_transform(pre, DataConfig(augment_scale=[0.9, 1.0]))
    assert tf.image_size == 28 and tf.scale == (0.9, 1.0)
    out = tf(Image.new("RGB", (40, 30), (255, 0, 0)))
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([(1 - 0.1) / 0.5, -0.2 / 0.5, -0.3 / 0.5]))


def test_count_agrees_with_reader_wherever_a_shard_is_cut(tmp_path):
    path = write_tar(tmp_path / "full.tar",
                     sample("k1", seed=1) + sample("k2", seed=2) + sample("k3", seed=3))
    raw = (tmp_path / "full.tar").read_bytes()
    for cut in range(0, len(raw) + 1, 97):
        (tmp_path / "cut.tar").write_bytes(raw[:cut])
        read = list(st.read_shard(str(tmp_path / "cut.tar"), SkipStats()))
        assert count_samples([str(tmp_path / "cut.tar")]) == len(read), cut
        # a cut inside a header reads as a clean end (tarfile), so the last sample may lack members:
        # the decode stage then skips it as missing_caption / missing_image
    assert count_samples([path]) == 3


def test_crop_box_stays_inside_and_covers_the_scale_range():
    from mmft.data.augment import _crop_box

    rng = random.Random(0)
    areas = []
    for _ in range(500):
        width, height = rng.randint(5, 60), rng.randint(5, 60)
        draws = [[rng.random() for _ in range(4)] for _ in range(11)]
        top, left, h, w = _crop_box(width, height, (0.3, 1.0), draws)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        areas.append(w * h / (width * height))
    assert min(areas) < 0.4 and max(areas) > 0.95


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_are_pinned_including_merged_tails(tmp_path):
    write_dataset(tmp_path, 2, 10)  # 2 workers x 10 samples, batch 6: 1 full each + one batch of merged tails
    stream = train_loader(cfg(tmp_path, num_workers=2, batch_size=6), PREPROCESS, tokenize,
                          device_type="cuda")
    batches = list(stream)
    assert len(batches) == 3 and all(b["image"].is_pinned() and b["text"].is_pinned() for b in batches)


def test_make_train_transform_from_an_open_clip_model():
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}
    model = open_clip.CLIP(**cfg)
    model.visual.preprocess_cfg = {"size": 32, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    tf = make_train_transform(model, DataConfig())
    assert tf.image_size == 32 and tf(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
