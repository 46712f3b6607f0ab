"""The hard-negatives data stage (mmft.data.negatives) on tiny shards: offsets against tarfile, the
per-epoch draw, the attached tensors against decoding the negatives directly, the training stream with
data.hard_negatives (tails merged across workers keep each sample's negatives), and its errors."""
from __future__ import annotations

import tarfile

import pytest
import torch
from test_data import PREPROCESS, cfg, tokenize, write_dataset

from mmft.data import negatives as neg
from mmft.data import stages as st
from mmft.data.stream import train_loader
from mmft.mining.format import read_mined, write_mined

K_MINED = 4


def mined_file(path, keys, groups=None, k=K_MINED, group_field=""):
    """A mined.jsonl where pair i's negatives are the next k keys (and their first captions)."""
    n = len(keys)
    records = []
    for i, key in enumerate(keys):
        others = [keys[(i + j) % n] for j in range(1, k + 1)]
        records.append({"key": key, "group": None if groups is None else groups[i], "images": others,
                        "image_scores": [0.5] * k, "texts": [f"first {o}" for o in others],
                        "text_keys": others, "text_scores": [0.5] * k})
    return write_mined(path, {"k": k, "group_field": group_field, "model": None}, records)


@pytest.fixture
def dataset(tmp_path):
    paths = write_dataset(tmp_path / "shards", shards=3, per_shard=7)
    keys = [f"s{s:02d}_{i:03d}" for s in range(3) for i in range(7)]
    return paths, keys, mined_file(tmp_path / "mined.jsonl", keys)


def test_offsets_point_at_the_image_bytes(dataset):
    paths, keys, _ = dataset
    offsets = neg.shard_offsets(paths)
    assert set(offsets) == set(keys)
    for url in paths:
        with tarfile.open(url) as tar:
            for info in tar:
                key, ext = st.sample_key(info.name)
                if ext == "png":
                    path, offset, size, ext2 = offsets[key]
                    with open(path, "rb") as f:
                        f.seek(offset)
                        assert f.read(size) == tar.extractfile(info).read() and ext2 == "png"
    assert set(neg.shard_offsets(paths, keys={keys[0], "nope"})) == {keys[0]}


def test_draw_is_per_epoch_deterministic_and_fills_short_lists(dataset, tmp_path):
    _paths, keys, path = dataset
    src = neg.NegativeSource(read_mined(path), neg.shard_offsets(dataset[0]), k=3, seed=7)
    images, texts, text_keys = src.choose(keys[0], epoch=0)
    assert len(set(images)) == 3 and set(images) <= set(keys[1:5])
    assert texts == [f"first {k}" for k in text_keys]
    assert src.choose(keys[0], 0) == (images, texts, text_keys)
    assert any(src.choose(keys[0], e)[0] != images for e in range(1, 6))  # epochs draw other subsets
    other = neg.NegativeSource(read_mined(path), src.offsets, k=3, seed=8)
    assert any(other.choose(k, 0) != src.choose(k, 0) for k in keys)  # and so do seeds
    six = neg.NegativeSource(read_mined(path), src.offsets, k=6)  # more than mined: all four, then repeats
    images = six.choose(keys[0], 0)[0]
    assert len(images) == 6 and set(images) == set(keys[1:5])
    # a negative whose image is not in the shards is left out; a pair with none borrows one
    src.offsets = {k: v for k, v in src.offsets.items() if k not in keys[1:5]}
    assert all(i not in keys[1:5] for i in src.choose(keys[0], 0)[0])


def test_attach_matches_decoding_the_negatives_directly(dataset):
    paths, keys, path = dataset
    src = neg.NegativeSource(read_mined(path), neg.shard_offsets(paths), k=2)
    batch = {"key": keys[:5], "image": torch.zeros(5, 3, 16, 16)}
    out = neg.attach(dict(batch), src, PREPROCESS, torch.stack, tokenize, epoch=3)
    assert out["extra_image"].shape == (5, 2, 3, 16, 16) and out["extra_text"].shape == (5, 2, 6)
    offsets = neg.shard_offsets(paths)
    for b, key in enumerate(keys[:5]):
        images, texts, text_keys = src.choose(key, 3)
        for j, img_key in enumerate(images):
            url, offset, size, ext = offsets[img_key]
            with open(url, "rb") as f:
                f.seek(offset)
                want = PREPROCESS(st.decode_image({ext: f.read(size)}))
            torch.testing.assert_close(out["extra_image"][b, j], want)
        assert torch.equal(out["extra_text"][b], tokenize(texts))
        assert out["extra_image_group"][b].tolist() == [st.group_id(i) for i in images]
        assert out["extra_text_group"][b].tolist() == [st.group_id(i) for i in text_keys]
    assert out["group"].tolist() == [st.group_id(k) for k in keys[:5]]  # no group field: the key
    stream = [dict(batch), {"kind": "stats"}]
    gen = list(neg.attach_negatives(stream, src, PREPROCESS, torch.stack, tokenize, 3))
    assert torch.equal(gen[0]["extra_text"], out["extra_text"]) and gen[1] == {"kind": "stats"}


def test_decoded_negatives_are_cached_within_a_byte_budget(dataset, monkeypatch):
    paths, keys, path = dataset
    src = neg.NegativeSource(read_mined(path), neg.shard_offsets(paths), k=2)
    first = src.image(keys[0])
    assert src.image(keys[0]) is first  # a hit returns the cached image
    monkeypatch.setattr(neg, "CACHE_BYTES", 3 * first.width * first.height * 3)
    for key in keys[1:6]:
        src.image(key)
    assert list(src._cache) == keys[3:6] and src._cached_bytes <= neg.CACHE_BYTES
    state = src.__getstate__()
    assert not state["_cache"] and not state["_files"]  # workers start empty


@pytest.mark.parametrize("group_field", ["", "group"])
def test_train_stream_carries_each_samples_negatives(tmp_path, group_field):
    paths = write_dataset(tmp_path / "shards", shards=3, per_shard=7, group_every=3 if group_field else 0)
    keys = [f"s{s:02d}_{i:03d}" for s in range(3) for i in range(7)]
    groups = [f"g{i // 3}" for i in range(21)] if group_field else None
    path = mined_file(tmp_path / "mined.jsonl", keys, groups, group_field=group_field)
    c = cfg(paths, num_workers=2, batch_size=4, hard_negatives=str(path), negatives_per_sample=3,
            group_field=group_field)
    stream = train_loader(c, PREPROCESS, tokenize, seed=5)
    stream.set_epoch(1)
    src = stream._set.negatives
    seen = 0
    for batch in stream:  # tails of two workers are merged: every sample must keep its own negatives
        assert batch["extra_image"].shape == (4, 3, 3, 16, 16)
        for b, key in enumerate(batch["key"]):
            images, texts, _text_keys = src.choose(key, 1)
            assert torch.equal(batch["extra_text"][b], tokenize(texts))
            assert batch["extra_image_group"][b].tolist() == [src.group_id(i) for i in images]
            assert batch["group"][b].item() == src.group_id(key)
            seen += 1
    assert seen == 20  # 21 samples, batches of 4


def test_configuration_errors_name_the_fix(dataset, tmp_path):
    paths, _keys, path = dataset
    with pytest.raises(st.DataError, match="between 1 and the k=4"):
        train_loader(cfg(paths, hard_negatives=str(path), negatives_per_sample=5), PREPROCESS, tokenize)
    with pytest.raises(st.DataError, match="group_field='' but training uses 'group'"):
        train_loader(cfg(paths, hard_negatives=str(path), group_field="group"), PREPROCESS, tokenize)
    with pytest.raises(st.DataError, match="local shard files"):
        neg.shard_offsets(["pipe:cat " + paths[0]])
    with pytest.raises(ValueError, match="does not exist"):
        train_loader(cfg(paths, hard_negatives=str(tmp_path / "none.jsonl")), PREPROCESS, tokenize)
    alien = mined_file(tmp_path / "alien.jsonl", [f"x{i}" for i in range(6)])
    with pytest.raises(st.DataError, match="none of the negatives"):
        train_loader(cfg(paths, hard_negatives=str(alien)), PREPROCESS, tokenize)


def test_a_file_without_image_negatives_draws_random_training_images(dataset, tmp_path, caplog):
    """Every image neighbour above the near-duplicate threshold (look-alike data, or a re-mine late in
    training): the mined captions still serve, random training images stand in, and the run goes on."""
    paths, keys, _ = dataset
    records = [{"key": k, "group": None, "images": [], "image_scores": [], "texts": [f"first {o}"],
                "text_keys": [o], "text_scores": [0.9]} for k, o in zip(keys, keys[1:] + keys[:1])]
    path = write_mined(tmp_path / "texts-only.jsonl", {"k": 2, "group_field": "", "model": None}, records)
    with caplog.at_level("WARNING", logger="mmft.data.negatives"):
        stream = train_loader(cfg(paths, batch_size=7, hard_negatives=str(path), negatives_per_sample=2),
                              PREPROCESS, tokenize)
    assert "holds no image negatives" in caplog.text
    src = stream._set.negatives
    assert set(src.offsets) == set(keys)  # every training image may stand in
    batches = list(stream)
    assert sum(len(b["key"]) for b in batches) == len(keys)
    for b in batches:
        assert b["extra_image"].shape[:2] == (7, 2)
        for key, tokens in zip(b["key"], b["extra_text"]):
            images, texts, _ = src.choose(key, 0)
            assert set(images) <= set(keys) and torch.equal(tokens, tokenize(texts))


def test_reloaded_negatives_take_effect_next_epoch(dataset, tmp_path):
    """Re-mining during training: the stream reads the new file and the next epoch's batches use it."""
    paths, keys, path = dataset
    stream = train_loader(cfg(paths, num_workers=1, batch_size=7, hard_negatives=str(path),
                              negatives_per_sample=2), PREPROCESS, tokenize)
    old = {k: t.tolist() for b in stream for k, t in zip(b["key"], b["extra_text"])}
    remined = mined_file(tmp_path / "remined.jsonl", keys[::-1])  # other neighbours for every pair
    stream.reload_negatives(remined)
    stream.set_epoch(0)
    src = stream._set.negatives
    for batch in stream:
        for key, tokens in zip(batch["key"], batch["extra_text"]):
            assert torch.equal(tokens, tokenize(src.choose(key, 0)[1]))
            assert tokens.tolist() != old[key]  # the previous 4 keys now, the next 4 before
    assert stream._set.cfg.hard_negatives == str(remined)
