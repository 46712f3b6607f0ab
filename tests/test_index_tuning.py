"""Tuned indexes, held-out recall, versions and appends (mmft.index.tuning / heldout / versions / append)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmft.config import IndexConfig
from mmft.index import StaleIndexError, build_index, load_index
from mmft.index.append import append_vectors
from mmft.index.heldout import (
    HeldOut,
    exact_topk,
    exact_topk_reference,
    held_out_sample,
    recall_at_k,
)
from mmft.index.tuning import (
    candidate_factories,
    choose,
    estimate_memory,
    parse_memory,
    tune_index,
)
from mmft.index.versions import CURRENT_FILE, index_info


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n, dim=24, centres=40, noise=1.0, seed=0):
    """Unit vectors around `centres` fixed centres (the same centres for every seed)."""
    cen = _unit(np.random.default_rng(1234).standard_normal((centres, dim)))
    rng = np.random.default_rng(seed)
    return _unit(cen[rng.integers(0, centres, n)] + rng.standard_normal((n, dim)) * noise / math.sqrt(dim))


# ---------------------------------------------------------------- exact neighbours and recall


@pytest.mark.parametrize("self_excluded", [False, True])
def test_faiss_exact_topk_matches_the_numpy_reference(self_excluded, monkeypatch):
    import mmft.index.heldout as H

    monkeypatch.setattr(H, "_BLOCK", 257)  # ragged blocks: the running merge is exercised
    rng = np.random.default_rng(0)
    g, q = rng.standard_normal((1003, 29)), rng.standard_normal((37, 29))
    exclude = rng.choice(1003, 37, replace=False) if self_excluded else None
    if self_excluded:
        q = g[exclude] + 0.01 * rng.standard_normal((37, 29))  # each query's own row would rank first
    s_fast, r_fast = exact_topk(q, g, 20, exclude=exclude)
    s_ref, r_ref = exact_topk_reference(q, g, 20, exclude=exclude)
    np.testing.assert_allclose(s_fast, s_ref, atol=1e-5)
    assert (r_fast == r_ref).mean() > 0.99  # the same rows unless two scores tie
    brute = _unit(q) @ _unit(g).T  # (Q, N)
    if self_excluded:
        brute[np.arange(37), exclude] = -np.inf
        assert not (r_fast == exclude[:, None]).any()
    np.testing.assert_allclose(s_ref, -np.sort(-brute, axis=1)[:, :20], atol=1e-5)


def test_exact_topk_of_a_gallery_smaller_than_k_pads():
    s, r = exact_topk(np.ones((2, 4)), np.eye(4)[:3], 5)
    assert (r[:, 3:] == -1).all() and np.isinf(s[:, 3:]).all()
    assert recall_at_k(r, r, s, k=5).tolist() == [1.0, 1.0]  # three of three found


def test_recall_accepts_either_of_two_tied_neighbours():
    rows = np.array([[5, 7, 9, 11]])
    scores = np.array([[0.9, 0.8, 0.8, 0.1]], np.float32)  # rows 7 and 9 tie at the 2nd place
    assert recall_at_k(np.array([[5, 9]]), rows, scores, k=2)[0] == 1.0
    assert recall_at_k(np.array([[5, 11]]), rows, scores, k=2)[0] == 0.5


def test_held_out_sample_extends_like_a_fresh_one():
    g = _clustered(900, seed=1)
    full = held_out_sample(g, None, size=50, seed=3)  # gallery rows, each excluded from its answers
    s, r = exact_topk(full.queries, g[:600], exclude=full.self_rows)  # the same queries, 600 rows
    grown = HeldOut(full.queries, s, r, full.self_rows, "gallery rows").extend(g[600:], 600)
    np.testing.assert_allclose(grown.scores, full.scores, atol=1e-6)
    assert (grown.rows == full.rows).mean() > 0.99


# ---------------------------------------------------------------- memory, candidates, budgets


@pytest.mark.parametrize("factory", ["Flat", "SQfp16", "SQ8", "PQ6x4", "IVF16,Flat", "IVF16,SQ8",
                                     "IVF16,PQ6x4", "HNSW16", "HNSW16,SQ8"])
def test_memory_estimate_matches_the_serialised_index(factory):
    import faiss

    g = _clustered(1500, dim=24)
    index = faiss.index_factory(24, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(g)
    index.add(g)
    actual = len(faiss.serialize_index(index))
    assert abs(estimate_memory(factory, 1500, 24) - actual) < 0.12 * actual + 2048, factory


def test_parse_memory_and_its_error():
    assert parse_memory("2GB") == 2 << 30 and parse_memory("512 MiB") == 512 << 20
    assert parse_memory("1.5k") == 1536 and parse_memory("") is None and parse_memory(4096) == 4096
    with pytest.raises(ValueError, match="'two gigs' is not a size"):
        parse_memory("two gigs")


def test_candidates_take_smaller_codes_under_a_memory_budget():
    n, dim = 200_000, 256
    plain = candidate_factories(n, dim)
    assert plain[0] == "Flat" and "HNSW32" in plain and all(f.endswith(",Flat") for f in plain[1:-1])
    tight = candidate_factories(n, dim, max_memory=estimate_memory("IVF512,SQ8", n, dim) + 1)
    assert "SQfp16" not in tight[0] and any(f.endswith(",SQ8") for f in tight)
    assert all(f == tight[0] or estimate_memory(f, n, dim) <= estimate_memory("IVF512,SQ8", n, dim) + 1
               or f.endswith(("PQ32", "SQ8")) for f in tight)
    assert candidate_factories(n, dim, factory="IVF64,Flat", fp16=True) == ["IVF64,SQfp16"]


def test_choose_takes_the_fastest_point_within_budgets():
    pts = [{"factory": "Flat", "recall_low": 1.0, "ms": 3.0, "memory": 100},
           {"factory": "A", "recall_low": 0.96, "ms": 1.0, "memory": 90},
           {"factory": "B", "recall_low": 0.97, "ms": 0.5, "memory": 200},
           {"factory": "C", "recall_low": 0.90, "ms": 0.1, "memory": 10}]
    assert choose(pts, 0.95)["factory"] == "B"
    assert choose(pts, 0.95, max_memory=150)["factory"] == "A"
    assert choose(pts, 0.95, max_memory=150, max_latency_ms=0.8) is None
    assert choose(pts, 0.99)["factory"] == "Flat"


# ---------------------------------------------------------------- the tuner


def test_chosen_points_meet_the_target_on_queries_they_were_not_tuned_on():
    g = _clustered(6000, noise=1.2, seed=0)
    held = held_out_sample(g, _clustered(3000, noise=1.2, seed=1), size=600, seed=0)
    fresh = held_out_sample(g, _clustered(3000, noise=1.2, seed=2), size=600, seed=0)
    tuned = tune_index(g, held, 0.9, factories=["Flat", "IVF64,Flat", "HNSW16"])
    meeting = [p for p in tuned.record["curve"] if p["recall_low"] >= 0.9]
    assert tuned.record["chosen"] in meeting and not tuned.record["fallback"]
    import faiss

    for p in meeting:  # every point the tuner could have chosen holds on unseen queries
        index = faiss.index_factory(24, p["factory"], faiss.METRIC_INNER_PRODUCT)
        index.train(g)
        index.add(g)
        from mmft.index.tuning import measure_point

        again = measure_point(index, fresh, nprobe=p["nprobe"], ef_search=p["ef_search"])
        assert again["recall"] >= 0.9 - 0.01, p
    from mmft.index.tuning import measure_point

    on_fresh = measure_point(tuned.index, fresh, nprobe=tuned.nprobe, ef_search=tuned.ef_search)
    assert on_fresh["recall"] >= 0.89


def test_nothing_approximate_meets_the_target_so_exact_flat_is_kept_and_said():
    g = _unit(np.random.default_rng(0).standard_normal((3000, 24)))  # no structure: PQ2x4 cannot reach 0.99
    held = held_out_sample(g, None, size=300)
    budget = estimate_memory("IVF16,PQ2x4", 3000, 24) * 2  # exact Flat does not fit either
    tuned = tune_index(g, held, 0.99, factories=["Flat", "IVF16,PQ2x4"], max_memory=budget)
    assert tuned.record["fallback"] and tuned.factory == "Flat" and tuned.nprobe is None
    assert tuned.index.ntotal == 3000 and type(tuned.index).__name__ == "IndexFlat"
    note = tuned.record["note"]
    assert note.startswith("no approximate index meets recall@10 0.99")
    assert "exceeds the memory budget" in note
    assert "IVF16,PQ2x4" in note and {p["factory"] for p in tuned.record["curve"]} == {"Flat", "IVF16,PQ2x4"}


def test_manifest_records_the_curve_and_search_uses_the_chosen_point(tmp_path):
    g, q = _clustered(4000, seed=0), _clustered(2000, seed=5)
    cfg = IndexConfig(factory="IVF32,Flat", target_recall=0.9, heldout=400, use_gpu="never")
    built = build_index(g, tmp_path / "ix", index_cfg=cfg, queries=q)
    man = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    tuning = man["tuning"]
    assert tuning["heldout"] == {"count": 400, "source": "queries"} and tuning["target_recall"] == 0.9
    ivf = [p for p in tuning["curve"] if p["factory"] == "IVF32,Flat"]
    assert [p["nprobe"] for p in ivf] == sorted(p["nprobe"] for p in ivf) and ivf[0]["nprobe"] == 1
    assert tuning["curve"][0]["factory"] == "Flat" and tuning["curve"][0]["recall"] == 1.0
    chosen = tuning["chosen"]
    assert man["factory"] == chosen["factory"] and man["nprobe"] == chosen["nprobe"]
    assert set(man["files"]) == {"index.faiss", "ids.json", "heldout.npz"}
    loaded = load_index(tmp_path / "ix", use_gpu="never")
    if chosen["nprobe"]:
        import faiss

        assert faiss.extract_index_ivf(loaded.index).nprobe == chosen["nprobe"]
    np.testing.assert_array_equal(loaded.search(q[:20], 10)[1], built.search(q[:20], 10)[1])
    text = index_info(tmp_path / "ix")
    assert "recall@10 0.9 on 400 held-out queries" in text and "<- chosen" in text
    assert sum(line.strip().startswith("IVF32,Flat nprobe") for line in text.splitlines()) == len(ivf)


def test_embeddings_gallery_holds_out_its_own_captions(tmp_path):
    from mmft.embeddings import Embeddings

    img, txt = _clustered(500, seed=0), _clustered(900, seed=1)
    emb = Embeddings(image=img, text=txt, keys=[f"k{i}" for i in range(500)], captions=["c"] * 900,
                     caption_image=np.arange(900) % 500)
    index = build_index(emb, index_cfg=IndexConfig(target_recall=0.9, heldout=100, use_gpu="never"))
    assert index.manifest["tuning"]["heldout"] == {"count": 100, "source": "captions"}
    assert index.heldout.exclude is None and len(index.heldout) == 100


def test_an_exact_factory_is_not_tuned():
    index = build_index(_clustered(300), index_cfg=IndexConfig(factory="Flat", target_recall=0.95))
    assert "tuning" not in index.manifest and index.heldout is None


# ---------------------------------------------------------------- appends and versions


def _tuned_ivf(tmp_path, n=4000, target=0.9):
    cfg = IndexConfig(factory="IVF32,Flat", target_recall=target, heldout=300, use_gpu="never")
    return build_index(_clustered(n, seed=0), tmp_path / "ix", index_cfg=cfg, ids=[f"a{i}" for i in range(n)],
                       queries=_clustered(1000, seed=9))


def test_append_writes_a_new_version_and_remeasures_recall(tmp_path):
    first = _tuned_ivf(tmp_path)
    new = _clustered(1500, seed=4)
    result = append_vectors(tmp_path / "ix", new, [f"b{i}" for i in range(1500)])
    assert result.version == 2 and result.added == 1500
    assert (tmp_path / "ix" / CURRENT_FILE).read_text().strip() == "versions/v0002"
    now = load_index(tmp_path / "ix", use_gpu="never")
    assert now.ntotal == 5500 and now.ids[-1] == "b1499" and now.path.name == "v0002"
    assert now.manifest["nprobe"] == first.manifest["nprobe"]  # the trained quantiser and its parameters
    # the re-measured recall is that of the appended index against exact search over all 5,500 rows
    held = HeldOut.load(now.path / "heldout.npz")
    gallery = np.vstack([_clustered(4000, seed=0), new])
    s_ref, r_ref = exact_topk_reference(held.queries, gallery)
    np.testing.assert_allclose(held.scores, s_ref, atol=1e-5)
    found = now.search_rows(held.queries, 10)[1]
    assert result.recall == pytest.approx(recall_at_k(found, r_ref, s_ref).mean(), abs=1e-4)
    assert not result.rebuild_due and "below the target" not in result.note
    assert now.manifest["appends"][0]["added"] == 1500 and now.manifest["tuning"]["now"]["count"] == 5500
    assert json.loads((tmp_path / "ix" / "manifest.json").read_text())["count"] == 4000  # version 1 kept
    again = append_vectors(tmp_path / "ix", _clustered(10, seed=7), [f"c{i}" for i in range(10)])
    assert again.version == 3 and load_index(tmp_path / "ix").ntotal == 5510
    assert "append -> version 3: +10 vectors" in index_info(tmp_path / "ix")


def test_append_says_a_rebuild_is_due_when_recall_falls_below_the_target(tmp_path):
    rng = np.random.default_rng(0)
    old = rng.standard_normal((3000, 16)).astype(np.float32)
    old[:, 8:] *= 0.01  # the product quantiser learns codes for half of the space only
    cfg = IndexConfig(factory="IVF8,PQ8x4", target_recall=0.3, max_memory="100KB", heldout=300,
                      use_gpu="never")
    build_index(old, tmp_path / "ix", index_cfg=cfg, queries=rng.standard_normal((600, 16)))
    new = rng.standard_normal((3000, 16)).astype(np.float32)  # uses the other half: coded badly
    result = append_vectors(tmp_path / "ix", new, [f"n{i}" for i in range(3000)])
    assert result.rebuild_due and result.recall < 0.3
    assert "below the target: rebuild the index with `mmft index build`" in result.note
    assert "rebuild due" in index_info(tmp_path / "ix")


def test_append_refuses_vectors_of_another_model_and_duplicate_ids(tmp_path):
    from conftest import TINY_VIT

    from mmft.config import ModelConfig
    from mmft.embeddings import embed, model_fingerprint
    from mmft.model.factory import create_model

    torch.manual_seed(0)
    model, _, _, tok = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))
    other, _, _, _ = create_model(ModelConfig(name="tiny-vit-other", model_cfg=TINY_VIT))
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(8, 3, 32, 32, generator=g), "key": [f"img{i}" for i in range(8)],
                "captions": [[f"thing {i}"] for i in range(8)], "group": None}]
    emb = embed(model, batches, tokenizer=tok, progress=False)
    build_index(emb, tmp_path / "ix", index_cfg=IndexConfig(target_recall=0.9, use_gpu="never"))
    new = np.ones((2, emb.dim), np.float32)
    with pytest.raises(StaleIndexError, match="the base model differs"):
        append_vectors(tmp_path / "ix", new, ["x1", "x2"], fingerprint=model_fingerprint(other))
    with pytest.raises(ValueError, match="'img3' is already in the index"):
        append_vectors(tmp_path / "ix", new, ["img3", "x2"], fingerprint=model_fingerprint(model))
    assert not (tmp_path / "ix" / CURRENT_FILE).exists()  # nothing switched
    assert not list((tmp_path / "ix" / "versions").glob("v*"))
    ok = append_vectors(tmp_path / "ix", new, ["x1", "x2"], fingerprint=model_fingerprint(model))
    assert ok.index.ntotal == 10


def test_rebuild_into_the_folder_replaces_appended_versions(tmp_path):
    _tuned_ivf(tmp_path, n=1000)
    append_vectors(tmp_path / "ix", _clustered(50, seed=3), [f"b{i}" for i in range(50)])
    build_index(_clustered(700, seed=1), tmp_path / "ix", index_cfg=IndexConfig(use_gpu="never"))
    assert not (tmp_path / "ix" / CURRENT_FILE).exists() and not (tmp_path / "ix" / "versions").exists()
    loaded = load_index(tmp_path / "ix")
    assert loaded.ntotal == 700 and not (tmp_path / "ix" / "heldout.npz").exists()


def test_a_broken_version_pointer_is_one_sentence(tmp_path):
    from mmft.index import IndexLoadError

    build_index(_clustered(100), tmp_path / "ix")
    (tmp_path / "ix" / CURRENT_FILE).write_text("versions/v0009\n")
    with pytest.raises(IndexLoadError, match="names version 'versions/v0009', which is not a folder"):
        load_index(tmp_path / "ix")


# ---------------------------------------------------------------- end to end: shards, CLI, merged indexes


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A tiny trained run and 24 captioned images in three shards (10, 10, 4)."""
    from conftest import adapted_run_dir
    from serve_setup import write_shards

    root = tmp_path_factory.mktemp("tuned-gallery")
    run, _, _, _ = adapted_run_dir(root, seed=5)
    return run, write_shards(root)


def test_cli_build_tuned_then_add_shards_and_info(gallery, tmp_path, capsys):
    from mmft.cli import main
    from mmft.index.thumbnails import open_thumbnails

    run, shards = gallery
    ix = tmp_path / "ix"
    assert main(["index", "build", "--run", str(run), "--shards", *shards[:2], "--out", str(ix),
                 "--target-recall", "0.9", "--max-latency-ms", "50", "index.use_gpu=never",
                 "index.thumbnails=24", "data.num_workers=0"]) == 0
    built = json.loads((ix / "manifest.json").read_text())
    assert built["tuning"]["heldout"]["source"] == "captions" and built["tuning"]["max_latency_ms"] == 50
    assert built["tuning"]["note"] in capsys.readouterr().out
    assert main(["index", "add", "--index", str(ix), "--shards", shards[2], "data.num_workers=0"]) == 0
    out = capsys.readouterr().out
    assert "added 4 vectors" in out and "as version 2" in out and "recall@10 on" in out
    now = load_index(ix)
    old_ids = json.loads((ix / "ids.json").read_text())  # version 1 stays as it was
    assert now.ntotal == 24 and now.ids[:20].tolist() == old_ids and len(set(now.ids)) == 24
    thumbs = open_thumbnails(now.path)
    assert len(thumbs) == 24 and thumbs.jpeg(now.ids[-1]).startswith(b"\xff\xd8")
    assert thumbs.jpeg(old_ids[0]) == open_thumbnails(ix).jpeg(old_ids[0])
    assert main(["index", "info", str(ix)]) == 0
    info = capsys.readouterr().out
    assert "version 2" in info and "<- chosen" in info and "append -> version 2: +4 vectors" in info


def test_cli_add_refuses_another_model_with_the_stale_index_sentence(gallery, tmp_path, capsys):
    from conftest import adapted_run_dir

    from mmft.cli import main
    from mmft.index.core import build_index_from_run

    run, shards = gallery
    build_index_from_run(run, shards[:1], tmp_path / "ix", IndexConfig(target_recall=0.9, use_gpu="never",
                                                                       thumbnails=0), progress=False)
    (tmp_path / "other").mkdir()
    other, _, _, _ = adapted_run_dir(tmp_path / "other", seed=6)  # another base and adapter
    argv = ["index", "add", "--index", str(tmp_path / "ix"), "--shards", shards[2], "--run", str(other)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "was built with" in err and "the adapter differ" in err and "rebuild the index" in err
    assert load_index(tmp_path / "ix").ntotal == 10 and not (tmp_path / "ix" / CURRENT_FILE).exists()


@pytest.mark.parametrize("ondisk", [False, True])
def test_merged_parts_are_tuned_on_their_captions_and_take_appends(gallery, tmp_path, ondisk):
    """The torchrun path (embed parts, merge): held-out captions as a single process, also on disk."""
    from mmft.config import DataConfig
    from mmft.index.append import add_to_index
    from mmft.index.core import build_index_from_run
    from mmft.index.distributed import embed_run, merge_index_parts

    run, shards = gallery
    data = DataConfig(num_workers=0)
    embed_run(run, shards[:2], tmp_path / "parts", data_cfg=data)
    cfg = IndexConfig(factory="IVF4,Flat", train_sample=20, target_recall=0.9, heldout=30, use_gpu="never",
                      thumbnails=0)
    merged = merge_index_parts(tmp_path / "parts", tmp_path / "ix", cfg, ondisk=ondisk, budget=1 << 10)
    single = build_index_from_run(run, shards[:2], tmp_path / "single", cfg, data_cfg=data, progress=False)
    tuning = merged.manifest["tuning"]
    assert tuning["heldout"] == single.manifest["tuning"]["heldout"] == {"count": 30, "source": "captions"}
    np.testing.assert_allclose(HeldOut.load(tmp_path / "ix" / "heldout.npz").queries,
                               single.heldout.queries, atol=1e-6)  # the same held-out captions
    assert ("ondisk" in merged.manifest) == ondisk and merged.manifest["nprobe"] == tuning["chosen"]["nprobe"]
    result = add_to_index(tmp_path / "ix", [shards[2]], data_cfg=data, progress=False)
    now = load_index(tmp_path / "ix")
    assert now.ntotal == 24 and result.version == 2 and result.recall is not None
    if ondisk:
        assert (now.path / "index.ivfdata").is_file() and (tmp_path / "ix" / "index.ivfdata").is_file()
    q = _unit(np.random.default_rng(0).standard_normal((5, now.dim)))
    from mmft.index.faiss_backend import set_search_params

    set_search_params(now.index, nprobe=4)  # all lists (if IVF): the appended index is exact here
    found = now.search(q, 24)[1]
    assert sorted(found[0].tolist()) == sorted(now.ids.tolist())  # every old and new row is searchable


def test_evaluation_searches_the_tuned_index_beside_exact_search():
    from mmft.evaluation.core import direction_results

    g, q = _clustered(3000, noise=1.5, seed=0), _clustered(200, noise=1.5, seed=1)
    nearest = np.argmax(q @ g.T, axis=1)  # each query's one relevant item: its exact nearest row
    cfg = IndexConfig(factory="IVF16,Flat", target_recall=0.9, heldout=200, use_gpu="never")
    res = direction_results(q, g, nearest, np.arange(3000), [1, 10], cfg)
    assert res["factory"] in ("Flat", "IVF16,Flat") and res["exact_hits"][1].all()  # exact R@1 is 100%
    assert res["hits"][10].mean() >= 0.8  # the tuned index keeps most of it (target 0.9 on gallery rows)
