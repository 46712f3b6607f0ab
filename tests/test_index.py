"""FAISS indexes: search vs brute force, save/load round trip, manifest checks, errors, factories."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, adapted_run_dir

from mmft.config import IndexConfig, LoraConfig, ModelConfig
from mmft.embeddings import embed
from mmft.index.core import (
    IndexLoadError,
    StaleIndexError,
    apply_fp16,
    build_index,
    build_index_from_model,
    caption_ids,
    default_factory,
    load_index,
    query_index,
)
from mmft.model.factory import create_model
from mmft.model.lora import apply_lora, get_lora_scale, set_lora_scale

TINY = TINY_VIT  # the shared tiny open_clip config (conftest.py)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _tiny(name="tiny-vit", seed=0, lora=True):
    torch.manual_seed(seed)
    model, _, preprocess, tok = create_model(ModelConfig(name=name, model_cfg=TINY))
    if lora:
        apply_lora(model, LoraConfig())
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # stand-in for training: a non-zero delta
                p.data.normal_(0, 0.3, generator=g)
    return model, preprocess, tok


def _batches(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, 8):
        b = min(8, n - s)
        out.append({"image": torch.randn(b, 3, 32, 32, generator=g),
                    "key": [f"img{i:03d}" for i in range(s, s + b)],
                    "captions": [[f"a photo of thing {i}", f"thing number {i}"] for i in range(s, s + b)],
                    "group": None})
    return out


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _brute_topk(q, g, k):
    s = q @ g.T  # (Q, N)
    order = np.argsort(-s, axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF8,Flat"])
def test_search_matches_brute_force_topk(factory):
    rng = np.random.default_rng(0)
    g, q = _unit(rng.standard_normal((503, 37))), _unit(rng.standard_normal((29, 37)))
    index = build_index(g, index_cfg=IndexConfig(factory=factory, nprobe=8, use_gpu="never"))
    scores, ids = index.search(q, k=10)
    ref_s, ref_i = _brute_topk(q, g, 10)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)  # same scores position by position
    rows = ids.astype(np.int64)
    np.testing.assert_allclose(np.take_along_axis(q @ g.T, rows, 1), scores, atol=1e-5)  # ties tolerated
    if factory != "HNSW32":  # exhaustive (nprobe = nlist): the same rows unless two scores tie
        assert (rows == ref_i).mean() > 0.99


def test_k_larger_than_gallery_pads_with_empty_ids():
    index = build_index(_unit(np.random.default_rng(1).standard_normal((3, 8))))
    scores, ids = index.search(np.ones((1, 8), np.float32), k=5)
    assert ids[0, 3:].tolist() == ["", ""] and np.isinf(scores[0, 3:]).all()


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW32", "IVF4,PQ4x4"])
def test_saved_index_returns_the_same_neighbours(tmp_path, factory):
    rng = np.random.default_rng(2)
    g, q = _unit(rng.standard_normal((300, 16))), _unit(rng.standard_normal((11, 16)))
    ids = [f"item-{i}" for i in range(300)]
    cfg = IndexConfig(factory=factory, nprobe=2, use_gpu="never")
    built = build_index(g, tmp_path / "ix", ids=ids, index_cfg=cfg)
    before = built.search(q, k=7)
    loaded = load_index(tmp_path / "ix", use_gpu="never")
    after = loaded.search(q, k=7)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0])
    assert loaded.manifest["nprobe"] == (2 if "IVF" in factory else None)
    by_vector = query_index(tmp_path / "ix", vector=q[:1], k=7)[0]
    assert [h["id"] for h in by_vector] == before[1][0].tolist()
    assert {p.name for p in (tmp_path / "ix").iterdir()} == {"index.faiss", "ids.json", "manifest.json"}


def test_manifest_records_the_model_and_refuses_a_different_one(tmp_path, tiny):
    model, _, tok = tiny
    emb = embed(model, _batches(), tokenizer=tok, progress=False)
    index = build_index(emb, tmp_path / "ix")
    man = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert man["model"]["name"] == "tiny-vit" and len(man["adapter_sha256"]) == 64
    assert man["lora_scale"] == 1.0
    assert man["count"] == 23 and man["dim"] == 32 and man["modality"] == "image" and man["factory"] == "Flat"
    load_index(tmp_path / "ix", model=model)  # the same model: accepted

    other_base, _, _ = _tiny(name="tiny-vit-other", seed=0)
    with pytest.raises(StaleIndexError, match="the base model differs"):
        load_index(tmp_path / "ix", model=other_base)
    other_adapter = copy.deepcopy(model)
    next(p for n, p in other_adapter.named_parameters() if "lora_B" in n).data.add_(0.01)
    with pytest.raises(StaleIndexError, match=r"the adapter differs"):
        load_index(tmp_path / "ix", model=other_adapter)
    set_lora_scale(model, 0.5)
    try:
        with pytest.raises(StaleIndexError, match=r"at LoRA scale 1\b.*at LoRA scale 0.5.*rebuild the index"):
            load_index(tmp_path / "ix", model=model)
        with pytest.raises(StaleIndexError):
            index.search_text(["a photo"], model, tok)
    finally:
        set_lora_scale(model, 1.0)
    # the frozen base (scale 0) is the model without any adapter
    base_index = build_index(embed(_tiny(lora=False)[0], _batches(), tokenizer=tok, progress=False))
    set_lora_scale(model, 0.0)
    try:
        base_index.check_model(model)
    finally:
        set_lora_scale(model, 1.0)


def test_search_text_and_image_agree_with_manual_embedding(tmp_path, tiny):
    model, preprocess, tok = tiny
    batches = _batches()
    emb = embed(model, batches, tokenizer=tok, progress=False)
    index = build_index(emb, tmp_path / "ix")
    _, ids = index.search_text(["a photo of thing 4", "thing number 7"], model, tok, k=3)
    ref = index.search(_encode(model, tok, ["a photo of thing 4", "thing number 7"]), 3)
    np.testing.assert_array_equal(ids, ref[1])
    s_img, ids_img = index.search_image(batches[0]["image"][:2], model, k=1)
    assert ids_img[:, 0].tolist() == ["img000", "img001"]  # an image finds itself
    np.testing.assert_allclose(s_img[:, 0], 1.0, atol=1e-5)
    hits = query_index(tmp_path / "ix", (model, preprocess, tok), text="a photo of thing 4", k=3)
    assert [h["id"] for h in hits[0]] == ids[0].tolist() and hits[0][0]["rank"] == 1


def _encode(model, tok, texts):
    with torch.no_grad():
        return model.encode_text(tok(texts), normalize=True).numpy()


def test_text_gallery_ids_and_dim_mismatch(tiny):
    model, _, tok = tiny
    emb = embed(model, _batches(n=5), tokenizer=tok, progress=False)
    index = build_index(emb, modality="text")
    assert index.ids[:3].tolist() == ["img000/0", "img000/1", "img001/0"]
    with pytest.raises(ValueError, match="dimension 31 but .* 32-d"):
        index.search(np.ones((1, 31), np.float32))


def test_build_from_model_restores_scale_and_records_source(tmp_path, tiny):
    model, preprocess, tok = tiny
    index = build_index_from_model(model, _batches(), tmp_path / "ix", tokenizer=tok, preprocess=preprocess,
                                   index_cfg=IndexConfig(lora_scale=0.5), progress=False)
    assert index.manifest["lora_scale"] == 0.5 and "source" in index.manifest
    assert get_lora_scale(model) == 1.0
    assert not (tmp_path / "ix" / "embeddings").exists()
    with pytest.raises(StaleIndexError, match="LoRA scale"):
        load_index(tmp_path / "ix", model=model)


def test_broken_index_directories_give_clear_errors(tmp_path):
    with pytest.raises(IndexLoadError, match="does not exist"):
        load_index(tmp_path / "nope")
    build_index(_unit(np.random.default_rng(0).standard_normal((20, 8))), tmp_path / "ix")
    f = tmp_path / "ix" / "index.faiss"
    size = f.stat().st_size
    f.write_bytes(b"\0" * size)  # same size, garbage
    with pytest.raises(IndexLoadError, match="not a readable FAISS index"):
        load_index(tmp_path / "ix")
    f.write_bytes(b"\0" * 10)
    with pytest.raises(IndexLoadError, match="damaged or half-replaced"):
        load_index(tmp_path / "ix")
    (tmp_path / "ix" / "manifest.json").unlink()
    with pytest.raises(IndexLoadError, match="manifest.json is missing"):
        load_index(tmp_path / "ix")


def test_query_probes_as_many_lists_as_the_index_settings_say(tmp_path):
    rng = np.random.default_rng(5)
    g = _unit(rng.standard_normal((400, 16)))
    ids = [f"g{i}" for i in range(400)]
    cfg = IndexConfig(factory="IVF16,Flat", nprobe=1, use_gpu="never")
    build_index(g, tmp_path / "ix", ids=ids, index_cfg=cfg)
    q = _unit(g[:20] + 0.5 * rng.standard_normal((20, 16)))
    exact = [[ids[j] for j in row] for row in np.argsort(-(q @ g.T), axis=1)[:, :5]]  # (20, 5)

    def hits(cfg):
        return [[h["id"] for h in row] for row in query_index(tmp_path / "ix", vector=q, k=5, index_cfg=cfg)]

    assert hits(IndexConfig(nprobe=16, use_gpu="never")) == exact  # every list probed: exact
    assert hits(IndexConfig(use_gpu="never")) != exact  # the manifest's nprobe 1 misses some


def test_caption_ids_count_each_images_captions_in_row_order():
    assert caption_ids(["a", "b"], np.array([1, 0, 1, 1, 0])) == ["b/0", "a/0", "b/1", "b/2", "a/1"]


def test_training_sample_is_seeded_and_has_rows_for_every_ivf_list():
    from mmft.index.faiss_backend import empty_faiss_index, training_rows

    ivf = empty_faiss_index(4, "IVF8,Flat")
    rows = training_rows(1000, ivf, 100, seed=3)
    assert len(rows) == 320 and len(np.unique(rows)) == 320 and (np.diff(rows) > 0).all()  # 40 per list
    assert np.array_equal(rows, training_rows(1000, ivf, 100, seed=3))
    assert not np.array_equal(rows, training_rows(1000, ivf, 100, seed=4))
    assert len(training_rows(50, empty_faiss_index(4, "PQ2x4"), 100)) == 50  # never more than the gallery


def test_importing_the_index_package_loads_neither_torch_nor_faiss():
    import subprocess
    import sys

    code = ("import sys, mmft.index as ix; ix.Index, ix.build_index_from_run, ix.StaleIndexError; "
            "print(sorted(m for m in ('torch', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_factory_choice_and_bad_factory():
    assert default_factory(10_000) == "Flat" and default_factory(200_000) == "Flat"
    assert default_factory(1_000_000).startswith("IVF") and default_factory(1_000_000).endswith(",Flat")
    assert default_factory(1_000_000, fp16=True).endswith(",SQfp16")
    assert apply_fp16("Flat") == "SQfp16" and apply_fp16("IVF64,Flat") == "IVF64,SQfp16"
    with pytest.raises(ValueError, match="FAISS cannot build factory 'Bogus12'"):
        build_index(np.ones((4, 8), np.float32), index_cfg=IndexConfig(factory="Bogus12"))


def test_fp16_index_stays_close_to_exact():
    rng = np.random.default_rng(4)
    g, q = _unit(rng.standard_normal((200, 24))), _unit(rng.standard_normal((9, 24)))
    index = build_index(g, index_cfg=IndexConfig(fp16=True))
    assert index.manifest["factory"] == "SQfp16" and index.manifest["dtype"] == "float16"
    np.testing.assert_allclose(index.search(q, 5)[0], _brute_topk(q, g, 5)[0], atol=2e-3)


def test_use_gpu_always_without_gpu_says_what_to_install():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is visible")
    with pytest.raises(RuntimeError, match="faiss-gpu-cu12"):
        build_index(np.ones((4, 8), np.float32), index_cfg=IndexConfig(use_gpu="always"))


@pytest.mark.gpu
def test_gpu_index_matches_cpu(tmp_path):
    import faiss

    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        pytest.skip("FAISS sees no GPU")
    rng = np.random.default_rng(5)
    g, q = _unit(rng.standard_normal((5000, 64))), _unit(rng.standard_normal((50, 64)))
    gpu = build_index(g, tmp_path / "ix", index_cfg=IndexConfig(factory="Flat", use_gpu="always"))
    cpu = load_index(tmp_path / "ix", use_gpu="never")
    np.testing.assert_allclose(gpu.search(q, 10)[0], cpu.search(q, 10)[0], atol=1e-4)


def test_cli_path_build_from_run_then_query_by_text_and_image(tmp_path):
    """`mmft index build` / `mmft index query`: a run directory in; queries load the recorded run at the
    index's LoRA scale."""
    from PIL import Image

    from mmft.index.core import build_index_from_run

    run, model, preprocess, tok = adapted_run_dir(tmp_path, seed=3)
    pics = [Image.new("RGB", (40, 40), (30 * i, 200 - 30 * i, 90)) for i in range(6)]
    batches = [{"image": torch.stack([preprocess(p) for p in pics]), "key": [f"pic{i}" for i in range(6)],
                "captions": [[f"colour swatch {i}"] for i in range(6)], "group": None}]
    index = build_index_from_run(run, batches, tmp_path / "ix", IndexConfig(lora_scale=0.5), progress=False)
    assert index.manifest["source"]["run_dir"] == str(run.resolve()) and index.manifest["lora_scale"] == 0.5
    hits = query_index(tmp_path / "ix", text="colour swatch 3", k=2)  # model from the manifest's run_dir
    set_lora_scale(model, 0.5)
    expect = index.search_text(["colour swatch 3"], model, tok, k=2)
    assert [h["id"] for h in hits[0]] == expect[1][0].tolist()
    np.testing.assert_allclose([h["score"] for h in hits[0]], expect[0][0], atol=1e-5)
    pics[2].save(tmp_path / "q.png")
    hits = query_index(tmp_path / "ix", run, image=str(tmp_path / "q.png"), k=1)
    assert hits[0][0]["id"] == "pic2" and hits[0][0]["score"] == pytest.approx(1.0, abs=1e-4)


def _damage_index(folder, kind: str) -> None:
    index, ids, man = folder / "index.faiss", folder / "ids.json", folder / "manifest.json"
    meta = json.loads(man.read_text())
    if kind == "truncated index.faiss":
        index.write_bytes(index.read_bytes()[:500])
    elif kind == "truncated, sizes edited to match":  # only FAISS itself can tell
        index.write_bytes(index.read_bytes()[:500])
        meta["files"]["index.faiss"] = 500
    elif kind == "missing ids.json":
        ids.unlink()
    elif kind == "ids.json not a list":
        ids.write_text('{"0": "a"}')
        meta["files"]["ids.json"] = ids.stat().st_size
    elif kind == "manifest count edited":
        meta["count"] -= 1
    elif kind == "manifest field of wrong type":
        meta["nprobe"] = "all"
    elif kind == "manifest files edited":
        meta["files"] = ["index.faiss"]
    elif kind == "manifest not an object":
        meta = [meta]
    man.write_text(json.dumps(meta))


@pytest.mark.parametrize("kind", ["truncated index.faiss", "truncated, sizes edited to match",
                                  "missing ids.json", "ids.json not a list", "manifest count edited",
                                  "manifest field of wrong type", "manifest files edited",
                                  "manifest not an object"])
def test_damaged_index_folder_is_refused_in_one_sentence_naming_it(tmp_path, kind):
    vectors = _unit(np.random.default_rng(0).standard_normal((300, 16)))
    build_index(vectors, tmp_path / "ix", index_cfg=IndexConfig(factory="IVF4,Flat"))
    assert load_index(tmp_path / "ix").ntotal == 300
    _damage_index(tmp_path / "ix", kind)
    with pytest.raises(IndexLoadError) as exn:
        load_index(tmp_path / "ix")
    assert str(tmp_path / "ix") in str(exn.value) and "\n" not in str(exn.value)


def test_mmft_mini_index_moves_between_environments_and_old_indexes_load_where_made(tmp_path, monkeypatch):
    from conftest import move_packaged_text_tower

    from mmft.index.manifest import check_fingerprint, fingerprint_diffs
    from mmft.model.factory import base_identity, mini_model_config

    def fp(ident):
        return {"model": ident, "adapter_sha256": "ab" * 32, "lora_scale": 1.0}

    here = base_identity(ModelConfig(), mini_model_config())
    old = {**{k: v for k, v in here.items() if k != "arch_legacy"}, "arch": here["arch_legacy"]}
    move_packaged_text_tower(tmp_path, monkeypatch)
    there = base_identity(ModelConfig(), mini_model_config())
    check_fingerprint(fp(here), fp(there), "new-index")  # built here, queried elsewhere
    check_fingerprint(fp(old), fp(here), "old-index")  # built here before the digest was portable
    check_fingerprint(fp(here), fp(old), "new-index")  # ... and queried with an old adapter's identity
    assert fingerprint_diffs(fp(old), fp(there)) == ["the base model"]  # the old digest names the old path
    with pytest.raises(StaleIndexError, match="the base model differs"):
        check_fingerprint(fp(old), fp(there), "old-index")
    bigger = base_identity(ModelConfig(image_size=192), mini_model_config(image_size=192))
    for ident in (bigger, {**bigger, "arch": bigger["arch_legacy"]}):
        with pytest.raises(StaleIndexError, match="the base model differs"):
            check_fingerprint(fp(ident), fp(there), "other-index")
