"""Hard-negative mining (mmft.mining): the FAISS-searched miner against a brute-force ranking with the
same filters, the filters themselves, mined.jsonl checks, and `mmft mine` on tiny shards with a tiny
random model (from a run directory and from the base)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from mmft.embeddings import Embeddings
from mmft.mining.core import mine, mine_embeddings
from mmft.mining.format import MinedError, read_mined, write_mined


def synthetic(n=60, d=16, seed=0, captions_per=1):
    """Embeddings of n pairs in clusters (look-alikes exist), groups of ~3, duplicate caption strings,
    and one exact near-duplicate image (row 1 = row 0)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d))
    img = centres[np.arange(n) % 6] + 0.5 * rng.normal(size=(n, d))
    img[1] = img[0] + 1e-4 * rng.normal(size=d)
    owner = np.repeat(np.arange(n), captions_per)
    txt = img[owner] + 0.7 * rng.normal(size=(len(owner), d))
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
    captions = [f"caption {i % 25}" if c == 0 else f"Caption  {i}" for i, c in
                zip(owner, np.tile(np.arange(captions_per), n))]  # i and i+25 share a string
    return Embeddings(image=unit(img), text=unit(txt), keys=[f"k{i:03d}" for i in range(n)],
                      captions=captions, caption_image=owner,
                      groups=[f"g{i // 3}" if i % 5 else None for i in range(n)])


def brute_force(emb, k, threshold, by):
    """Per pair: all other images / captions sorted by exact similarity, filtered one by one."""
    img, txt, owner = emb.image.astype(np.float64), emb.text.astype(np.float64), emb.caption_image
    n = len(emb.keys)
    group = [g if g is not None else key for key, g in zip(emb.keys, emb.groups)]
    cap_mean = np.zeros_like(img)
    np.add.at(cap_mean, owner, txt)
    cap_mean /= np.linalg.norm(cap_mean, axis=1, keepdims=True)
    norm = lambda c: " ".join(c.lower().split())
    out = []
    for i in range(n):
        qi, qt = (img[i], cap_mean[i]) if by == "same" else (cap_mean[i], img[i])
        own = {norm(emb.captions[c]) for c in np.flatnonzero(owner == i)}
        images = [j for j in np.argsort(-(img @ qi), kind="stable") if j != i and group[j] != group[i]
                  and img[i] @ img[j] <= threshold][:k]
        texts, seen = [], set()
        for c in np.argsort(-(txt @ qt), kind="stable"):
            j, s = owner[c], norm(emb.captions[c])
            if j == i or group[j] == group[i] or s in own or s in seen or cap_mean[i] @ txt[c] > threshold:
                continue
            seen.add(s)
            texts.append(c)
            if len(texts) == k:
                break
        out.append(([emb.keys[j] for j in images], [emb.captions[c] for c in texts],
                    [emb.keys[owner[c]] for c in texts]))
    return out


@pytest.mark.parametrize("by", ["same", "cross"])
@pytest.mark.parametrize("captions_per", [1, 2])
def test_mined_negatives_match_brute_force(by, captions_per):
    emb = synthetic(captions_per=captions_per)
    got = mine_embeddings(emb, k=5, threshold=0.9, by=by)
    want = brute_force(emb, 5, 0.9, by)
    assert [r["key"] for r in got] == emb.keys
    for rec, (images, texts, text_keys) in zip(got, want):
        # float32 search vs float64 ranking may swap exact near-ties; compare as sets of the first k
        assert set(rec["images"]) == set(images), rec["key"]
        assert sorted(zip(rec["texts"], rec["text_keys"])) == sorted(zip(texts, text_keys)), rec["key"]
        assert rec["image_scores"] == sorted(rec["image_scores"], reverse=True)


def test_filters_leave_out_self_group_duplicates():
    emb = synthetic()
    recs = {r["key"]: r for r in mine_embeddings(emb, k=8, threshold=0.9)}
    group = {k: (g or k) for k, g in zip(emb.keys, emb.groups)}
    for key, rec in recs.items():
        assert key not in rec["images"] and key not in rec["text_keys"]
        assert all(group[j] != group[key] for j in rec["images"] + rec["text_keys"])
        assert len({" ".join(t.lower().split()) for t in rec["texts"]}) == len(rec["texts"])
    assert "k001" not in recs["k000"]["images"]  # the near-duplicate image (cosine ~1)
    assert all("caption 0" != t for t in recs["k025"]["texts"])  # k000's caption string is k025's own


def test_short_candidate_lists_search_again():
    """A pair whose 40 nearest images are all in its group still gets k negatives (second round)."""
    rng = np.random.default_rng(1)
    d, n = 8, 120
    img = rng.normal(size=(n, d))
    img[:60] = img[0] + 0.05 * rng.normal(size=(60, d))  # 60 look-alikes of pair 0, all in its group
    img = (img / np.linalg.norm(img, axis=1, keepdims=True)).astype(np.float32)
    emb = Embeddings(image=img, text=img.copy(), keys=[str(i) for i in range(n)],
                     captions=[f"c{i}" for i in range(n)], caption_image=np.arange(n),
                     groups=["a" if i < 60 else None for i in range(n)])
    rec = mine_embeddings(emb, k=3, threshold=1.0)[0]
    assert len(rec["images"]) == 3 and all(int(j) >= 60 for j in rec["images"])
    assert len(rec["texts"]) == 3


def test_too_few_candidates_gives_fewer_and_bad_arguments_are_named():
    emb = synthetic(n=6)
    recs = mine_embeddings(emb, k=8, threshold=1.0)
    assert all(len(r["images"]) <= 5 for r in recs)
    with pytest.raises(ValueError, match="by='nearest'"):
        mine_embeddings(emb, by="nearest")
    with pytest.raises(ValueError, match="threshold=1.5"):
        mine_embeddings(emb, threshold=1.5)
    with pytest.raises(ValueError, match="k=0"):
        mine_embeddings(emb, k=0)


# --- mined.jsonl ------------------------------------------------------------------------------------

def test_mined_file_round_trip_and_errors(tmp_path):
    recs = mine_embeddings(synthetic(n=12), k=2)
    path = write_mined(tmp_path / "m.jsonl", {"k": 2, "model": {"x": 1}}, recs)
    got = read_mined(path)
    assert got.k == 2 and got.header["model"] == {"x": 1} and list(got.records) == [r["key"] for r in recs]
    assert got.group("k001") == "g0" and got.group("k000") == "k000"  # no group: its own key
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temporary file left behind
    lines = path.read_text().splitlines()
    no_images = json.dumps({"key": "a", "texts": [], "text_keys": []})
    cases = {"does not exist": None, "not a mined": '{"format": "other"}\n',
             "version 9": '{"format": "mmft-mined", "version": 9}\n',
             "line 3 is not JSON": "\n".join(lines[:2] + ["{oops"]) + "\n",
             r"line 2: field\(s\) \['images'\]": "\n".join([lines[0], no_images]) + "\n"}
    for message, text in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.unlink(missing_ok=True)
        if text is not None:
            bad.write_text(text)
        with pytest.raises(MinedError, match=message):
            read_mined(bad)


# --- end to end on tiny shards ------------------------------------------------------------------------

def write_pairs(path, pairs, start=0):
    """A shard of (image, caption, group) pairs: <key>.png, <key>.txt, <key>.json {"group"}."""
    with tarfile.open(path, "w") as tar:
        for i, (image, caption, group) in enumerate(pairs, start=start):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", caption.encode()),
                              ("json", json.dumps({"group": group}).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import adapted_run_dir, make_pairs

    tmp = tmp_path_factory.mktemp("mine")
    run, _model, _pre, _tok = adapted_run_dir(tmp, seed=0)
    pairs = make_pairs(24, seed=3)
    shards = [write_pairs(tmp / "train-0.tar", pairs[:12]), write_pairs(tmp / "train-1.tar", pairs[12:], 12)]
    return run, shards, pairs


def test_mine_from_a_run_records_the_model_and_finds_other_groups(tmp_path, tiny_run):
    from mmft.config import DataConfig
    from mmft.embeddings import embed, model_fingerprint
    from mmft.model.adapter import load_model

    run, shards, pairs = tiny_run
    data_cfg = DataConfig(group_field="group", num_workers=0)
    out = mine(run, shards, tmp_path / "mined.jsonl", k=3, data_cfg=data_cfg, progress=False)
    mined = read_mined(out)
    model, pre, tok = load_model(run)
    assert mined.header["model"] == model_fingerprint(model) and mined.header["model"]["adapter_sha256"]
    assert mined.header["source"]["run"].endswith("run") and mined.header["group_field"] == "group"
    assert mined.header["pairs"] == 24 and len(mined.records) == 24
    group = {f"{i:06d}": g for i, (_, _, g) in enumerate(pairs)}
    for key, rec in mined.records.items():
        assert rec["group"] == group[key]
        assert len(rec["images"]) == 3
        assert all(group[j] != group[key] for j in rec["images"] + rec["text_keys"])
    # the same as mining the embeddings directly: the file is what mine_embeddings found
    emb = embed(model, shards, tokenizer=tok, preprocess=pre, data_cfg=data_cfg, progress=False)
    direct = {r["key"]: r for r in mine_embeddings(emb, k=3)}
    assert {k: r["images"] for k, r in mined.records.items()} == {k: r["images"] for k, r in direct.items()}


def test_mine_with_the_base_model_and_the_cli(tmp_path, tiny_run, tiny_vit_cfg):
    from mmft.cli import main

    _run, shards, _ = tiny_run
    out = mine(None, shards, tmp_path / "base.jsonl", k=2, model_cfg=tiny_vit_cfg, progress=False)
    head = read_mined(out).header
    assert head["source"]["base"] == "tiny-vit" and head["model"]["adapter_sha256"] is None

    run, shards, _ = tiny_run
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  group_field: group\n  num_workers: 0\n")
    cli_out = tmp_path / "cli.jsonl"
    assert main(["mine", "--run", str(run), "--shards", *shards, "--k", "2", "--out", str(cli_out),
                 "--config", str(cfg), "data.batch_size=8"]) == 0
    mined = read_mined(cli_out)
    assert mined.k == 2 and mined.header["group_field"] == "group" and len(mined.records) == 24
    assert main(["mine", "--run", str(run), "--shards", *shards, "--k", "0", "--out", str(cli_out)]) == 2
