"""Thumbnail store beside an index: written at build or added later, memory-mapped, refused if damaged."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from serve_setup import write_shards

from mmft.config import DataConfig, IndexConfig
from mmft.index.thumbnails import (
    THUMBS_BIN,
    ThumbnailError,
    add_thumbnails,
    open_thumbnails,
    write_thumbnails,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("thumb-shards"), n=13)


def test_store_holds_every_image_small_with_its_captions(shards, tmp_path):
    summary = write_thumbnails(shards, tmp_path, size=20)
    store = open_thumbnails(tmp_path)
    assert summary["count"] == len(store) == 13 and summary["missing"] == 0
    for key in store.items:
        im = Image.open(io.BytesIO(store.jpeg(key)))
        assert im.format == "JPEG" and max(im.size) <= 20
        first, second = store.captions(key)  # the shard's two caption lines, in order
        assert second.startswith(first + " number ")
    assert store.jpeg("no-such-key") is None and store.captions("no-such-key") == []


def test_keys_filter_and_missing_store(shards, tmp_path):
    assert open_thumbnails(tmp_path) is None
    write_thumbnails(shards, tmp_path, keys=["00000001", "00000004"])
    assert sorted(open_thumbnails(tmp_path).items) == ["00000001", "00000004"]
    with pytest.raises(ThumbnailError, match="size 0 must be a positive"):
        write_thumbnails(shards, tmp_path, size=0)


def test_damaged_store_is_refused_in_a_sentence(shards, tmp_path):
    write_thumbnails(shards, tmp_path)
    with open(tmp_path / THUMBS_BIN, "ab") as f:
        f.write(b"x")
    with pytest.raises(ThumbnailError, match="damaged or half-replaced; rewrite it with `mmft index thumb"):
        open_thumbnails(tmp_path)


def test_index_build_writes_thumbnails_and_add_thumbnails_rewrites_them(shards, tmp_path, tiny_vit_cfg):
    from mmft.index.core import build_index_from_model, load_index
    from mmft.model.factory import create_model

    model, _, preprocess, tok = create_model(tiny_vit_cfg)
    out = tmp_path / "index"
    index = build_index_from_model(model, shards, out, tokenizer=tok, preprocess=preprocess, progress=False,
                                   index_cfg=IndexConfig(factory="Flat", use_gpu="never", thumbnails=24),
                                   data_cfg=DataConfig(num_workers=0))
    store = open_thumbnails(out)
    assert set(store.items) == {str(i) for i in index.ids} and store.size == 24
    assert json.loads((out / "manifest.json").read_text())["files"].keys() == {"index.faiss", "ids.json"}
    summary = add_thumbnails(out, size=16)  # shards from the manifest
    assert summary["count"] == index.ntotal and open_thumbnails(out).size == 16
    with pytest.raises(ThumbnailError, match="no complete index"):
        add_thumbnails(tmp_path / "nowhere")
    # memory-mapped loading answers exactly like the ordinary one
    q = np.random.default_rng(0).standard_normal((3, index.dim)).astype(np.float32)
    plain, mapped = load_index(out, use_gpu="never"), load_index(out, mmap=True)
    for a, b in zip(plain.search(q, 5), mapped.search(q, 5)):
        np.testing.assert_array_equal(a, b)


def test_extend_keeps_the_old_jpegs_and_adds_the_new_images(shards, tmp_path):
    from mmft.index.thumbnails import extend_thumbnails

    old, new = tmp_path / "v1", tmp_path / "v2"
    assert extend_thumbnails(old, shards, new) is None and not new.exists()  # no store: nothing written
    write_thumbnails(shards[:1], old, size=20, quality=60)
    before = open_thumbnails(old)
    summary = extend_thumbnails(old, shards, new, keys=None)
    after = open_thumbnails(new)
    assert len(before) == 10 and summary["count"] == len(after) == 13 and summary["missing"] == 0
    assert after.size == 20 and after.quality == 60  # the old store's settings
    for key in before.items:
        assert after.jpeg(key) == before.jpeg(key) and after.captions(key) == before.captions(key)
    write_thumbnails(shards, tmp_path / "all", size=20, quality=60)
    fresh = open_thumbnails(tmp_path / "all")
    for key in set(after.items) - set(before.items):
        assert after.jpeg(key) == fresh.jpeg(key)  # new images are thumbnailed as a full rewrite would


def _names_used(path):
    """String constants and identifiers (names, attributes, imported names) in a Python file."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.add(node.value)
        elif isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.alias):
            out.add(node.name)
    return out


def test_only_the_thumbnails_module_spells_or_writes_the_store_files():
    """The store's file names are spelt in one module, and only it touches thumbs.bin (the JPEG bytes)."""
    from pathlib import Path

    from mmft.index import thumbnails

    package = Path(thumbnails.__file__).resolve().parents[1]
    own = Path(thumbnails.__file__).resolve()
    assert {"thumbs.bin", "THUMBS_BIN"} <= _names_used(own)
    banned = {"thumbs.bin", "thumbs.json", "THUMBS_BIN"}  # THUMBS_JSON may be asked "is there a store?"
    offenders = {str(p.relative_to(package)): sorted(banned & _names_used(p))
                 for p in package.rglob("*.py") if p.resolve() != own}
    assert {p: n for p, n in offenders.items() if n} == {}
