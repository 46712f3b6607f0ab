"""Embedding: unit vectors, caption->image mapping, streaming to disk == in memory, fp16, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_VIT

from mmft.config import LoraConfig, ModelConfig
from mmft.embeddings import Embeddings, EmbeddingsError, embed, encode_images, encode_texts, model_fingerprint
from mmft.model.factory import create_model
from mmft.model.lora import apply_lora, set_lora_scale

TINY = TINY_VIT  # the shared tiny open_clip config (conftest.py)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, preprocess, tok = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY))
    return model, preprocess, tok


def _batches(n=19, batch=6, seed=0, groups=True):
    """In-memory eval batches; image i has (i % 3) + 1 captions, image 4 has none."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, batch):
        idx = range(s, min(n, s + batch))
        out.append({"image": torch.randn(len(idx), 3, 32, 32, generator=g), "key": [f"k{i}" for i in idx],
                    "captions": [[] if i == 4 else [f"caption {j} of image {i}" for j in range((i % 3) + 1)]
                                 for i in idx],
                    "group": [f"g{i % 2}" for i in idx] if groups else None})
    return out


def test_embed_shapes_norms_mapping_and_reference(tiny):
    model, _, tok = tiny
    batches = _batches()
    emb = embed(model, batches, tokenizer=tok, progress=False)
    caps = [c for b in batches for cs in b["captions"] for c in cs]
    assert emb.image.shape == (19, 32) and emb.text.shape == (len(caps), 32) and emb.dim == 32
    assert emb.keys == [f"k{i}" for i in range(19)] and emb.captions == caps
    assert emb.groups == [f"g{i % 2}" for i in range(19)]
    expect = [i for i in range(19) for _ in ([] if i == 4 else range((i % 3) + 1))]
    np.testing.assert_array_equal(emb.caption_image, expect)
    np.testing.assert_allclose(np.linalg.norm(emb.image, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb.text, axis=1), 1, atol=1e-5)
    with torch.no_grad():  # reference: plain encode calls, whole set at once
        ref_img = model.encode_image(torch.cat([b["image"] for b in batches]), normalize=True).numpy()
        ref_txt = model.encode_text(tok(caps), normalize=True).numpy()
    np.testing.assert_allclose(emb.image, ref_img, atol=1e-5)
    np.testing.assert_allclose(emb.text, ref_txt, atol=1e-5)
    np.testing.assert_allclose(encode_texts(model, tok, caps[:3], batch_size=2), ref_txt[:3], atol=1e-5)
    np.testing.assert_allclose(encode_images(model, batches[0]["image"][:2]), ref_img[:2], atol=1e-5)
    assert emb.meta["model"]["name"] == "tiny-vit" and emb.meta["adapter_sha256"] is None


def test_streaming_to_disk_equals_in_memory(tiny, tmp_path):
    model, _, tok = tiny
    mem = embed(model, _batches(), tokenizer=tok, progress=False)
    disk = embed(model, _batches(), tokenizer=tok, out_dir=tmp_path / "emb", part_size=7, progress=False)
    assert isinstance(disk.image, np.memmap)  # memory-mapped, not held in RAM
    assert not (tmp_path / "emb" / "parts").exists()  # parts were joined and removed
    loaded = Embeddings.load(tmp_path / "emb")
    for e in (disk, loaded):
        np.testing.assert_array_equal(e.image, mem.image)
        np.testing.assert_array_equal(e.text, mem.text)
        np.testing.assert_array_equal(e.caption_image, mem.caption_image)
        assert e.keys == mem.keys and e.captions == mem.captions and e.groups == mem.groups
    assert loaded.meta["model"] == mem.meta["model"]


def test_save_load_roundtrip_and_missing_manifest(tiny, tmp_path):
    model, _, tok = tiny
    emb = embed(model, _batches(n=5, groups=False), tokenizer=tok, progress=False)
    assert emb.groups is None
    emb.save(tmp_path / "e")
    back = Embeddings.load(tmp_path / "e", mmap=False)
    np.testing.assert_array_equal(back.text, emb.text)
    assert back.groups is None and back.keys == emb.keys
    (tmp_path / "e" / "manifest.json").unlink()
    with pytest.raises(EmbeddingsError, match="manifest.json is missing"):
        Embeddings.load(tmp_path / "e")


def test_fp16_and_image_only(tiny):
    model, _, tok = tiny
    full = embed(model, _batches(), tokenizer=tok, progress=False)
    half = embed(model, _batches(), tokenizer=tok, fp16=True, progress=False)
    assert half.image.dtype == np.float16 and half.meta["dtype"] == "float16"
    np.testing.assert_allclose(half.image.astype(np.float32), full.image, atol=2e-3)
    img = embed(model, _batches(), modality="image", progress=False)  # no tokenizer needed
    np.testing.assert_allclose(img.image, full.image, atol=1e-6)
    assert img.text.shape[0] == 0 and len(img.caption_image) == len(full.caption_image)
    with pytest.raises(EmbeddingsError, match="tokenizer"):
        embed(model, _batches(), progress=False)


def test_fingerprint_follows_adapter_and_scale(tiny):
    import copy

    model = tiny[0]
    m = copy.deepcopy(model)
    apply_lora(m, LoraConfig())
    fresh = model_fingerprint(m)
    assert fresh["adapter_sha256"] is not None and fresh["lora_scale"] == 1.0
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.data.fill_(0.01)
    assert model_fingerprint(m)["adapter_sha256"] != fresh["adapter_sha256"]
    set_lora_scale(m, 0.5)
    assert model_fingerprint(m)["lora_scale"] == 0.5
    set_lora_scale(m, 0.0)  # the frozen base: same fingerprint as the model without an adapter
    assert model_fingerprint(m) == model_fingerprint(model)
    # the adapter digest ignores the current scale of the fully trained parameters
    set_lora_scale(m, 0.3)
    d03 = model_fingerprint(m)["adapter_sha256"]
    set_lora_scale(m, 1.0)
    assert model_fingerprint(m)["adapter_sha256"] == d03


def test_one_pass_iterators_and_callables(tiny):
    model, _, tok = tiny
    a = embed(model, iter(_batches()), tokenizer=tok, progress=False)
    b = embed(model, lambda: _batches(), tokenizer=tok, progress=True)
    np.testing.assert_array_equal(a.image, b.image)


def test_embed_real_shards_if_the_data_module_exists(tiny, tmp_path):
    data = pytest.importorskip("mmft.data.stream")
    if not hasattr(data, "eval_loader"):
        pytest.skip("mmft.data.stream.eval_loader is not available")
    from PIL import Image

    from mmft.data.shard_writer import make_shards

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 40), (40 * i, 10, 200 - 30 * i)).save(src / f"im{i}.png")
        (src / f"im{i}.txt").write_text(f"colour {i}\nshade number {i}\n")
    make_shards(src, tmp_path / "shards", progress=False)
    model, preprocess, tok = tiny
    specs = [str(p) for p in sorted((tmp_path / "shards").glob("*.tar"))]
    emb = embed(model, specs, tokenizer=tok, preprocess=preprocess, batch_size=2, num_workers=0,
                progress=False)
    assert emb.image.shape == (5, 32) and emb.text.shape == (10, 32)
    assert np.bincount(emb.caption_image).tolist() == [2] * 5


def test_package_level_embed_works_after_the_submodule_is_imported(tiny):
    import mmft
    import mmft.embeddings  # the module has its own name, so `mmft.embed` stays the function

    model, _, tok = tiny
    emb = mmft.embed(model, _batches(n=3), tokenizer=tok, progress=False)
    assert emb.image.shape == (3, 32)


def _damage_embeddings(folder, kind: str) -> None:
    import json

    if kind == "no manifest (interrupted)":
        (folder / "manifest.json").unlink()
    elif kind == "missing array":
        (folder / "text.npy").unlink()
    elif kind == "truncated array":
        raw = (folder / "image.npy").read_bytes()
        (folder / "image.npy").write_bytes(raw[: len(raw) // 2])
    elif kind == "pickled array":
        np.save(folder / "caption_image.npy", np.array([{"not": "numbers"}], dtype=object), allow_pickle=True)
    elif kind == "missing items":
        (folder / "items.json").unlink()
    elif kind == "items too short":
        items = json.loads((folder / "items.json").read_text())
        (folder / "items.json").write_text(json.dumps({**items, "keys": items["keys"][:-1]}))
    elif kind == "manifest field of wrong type":
        man = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**man, "images": "19"}))
    elif kind == "manifest count edited":
        man = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**man, "dim": man["dim"] + 1}))


@pytest.mark.parametrize("kind", ["no manifest (interrupted)", "missing array", "truncated array",
                                  "pickled array", "missing items", "items too short",
                                  "manifest field of wrong type", "manifest count edited"])
def test_partial_or_damaged_embeddings_are_refused_in_one_sentence(tiny, tmp_path, kind):
    model, _, tok = tiny
    embed(model, _batches(), tokenizer=tok, out_dir=tmp_path / "emb", progress=False)
    assert len(Embeddings.load(tmp_path / "emb").keys) == 19
    _damage_embeddings(tmp_path / "emb", kind)
    with pytest.raises(EmbeddingsError) as exn:
        Embeddings.load(tmp_path / "emb")
    assert str(tmp_path / "emb") in str(exn.value) and "\n" not in str(exn.value)
