"""Shard writing: inputs (folder, table, class folders), skips by reason, splits, dedup, layout on disk."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mmft.data.shard_writer import (
    ShardError,
    assign_splits,
    brace_pattern,
    load_images,
    make_shards,
    parse_splits,
    prepare_images,
    write_tar,
)


def _img(path: Path, color=(200, 30, 30), size=(24, 16), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def _read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """All samples of all shards in `out`, by key: {ext: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def test_folder_input_skips_bad_files_and_writes_layout(tmp_path):
    src = tmp_path / "src"
    for i in range(5):
        _img(src / "sub" / f"a{i}.jpg", color=(40 * i, 10, 10))
        (src / "sub" / f"a{i}.txt").write_text(f"red thing {i}\nsecond caption {i}\n")
    (src / "sub" / "a0.json").write_text(json.dumps({"group": "g0", "author": "x", "caption": "extra"}))
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "corrupt.txt").write_text("a caption")
    _img(src / "empty.png", color=(0, 0, 255))
    (src / "empty.txt").write_text("  \n\n")
    _img(src / "nocap.jpg")  # no caption file at all

    out = tmp_path / "out"
    stats = make_shards(src, out, samples_per_shard=2, progress=False)
    assert stats["written"] == 5
    assert stats["skipped"] == {"undecodable": 1, "empty_caption": 2}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"shard-00000.tar": 2, "shard-00001.tar": 2, "shard-00002.tar": 1}
    assert stats["splits"]["all"]["pattern"] == "shard-{00000..00002}.tar"

    samples = _read_shards(out)
    assert len(samples) == 5 and all(set(s) == {"jpg", "txt", "json"} for s in samples.values())
    metas = [json.loads(s["json"]) for s in samples.values()]
    first = next(m for m in metas if m["source"] == "sub/a0.jpg")
    assert first["caption"] == ["red thing 0", "second caption 0", "extra"]
    assert first["group"] == "g0" and first["author"] == "x"
    assert samples[first["key"]]["txt"].decode().splitlines() == first["caption"]
    assert all("." not in k for k in samples)
    # JPEGs needing no change are copied byte for byte, not re-encoded
    assert samples[first["key"]]["jpg"] == (src / "sub" / "a0.jpg").read_bytes()
    assert json.loads((out / "stats.json").read_text())["written"] == 5


def test_table_inputs_with_several_caption_columns(tmp_path):
    _img(tmp_path / "imgs" / "x.png", mode="RGBA", color=(0, 0, 0, 0))
    _img(tmp_path / "imgs" / "y.jpg", size=(64, 32))
    (tmp_path / "data.csv").write_text(
        "file,cap1,cap2,extra\nimgs/x.png,a cat,a small cat,1\nimgs/y.jpg,a dog,,2\n"
        "imgs/missing.jpg,a ghost,,3\nimgs/y.jpg,,,4\n")
    out = tmp_path / "csv_out"
    stats = make_shards(tmp_path / "data.csv", out, image_col="file", caption_cols=["cap1", "cap2"],
                        max_side=32, progress=False)
    assert stats["written"] == 2
    assert stats["skipped"] == {"missing_image": 1, "empty_caption": 1}
    samples = _read_shards(out)
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    x, y = by_source["imgs/x.png"], by_source["imgs/y.jpg"]
    assert json.loads(x["json"])["caption"] == ["a cat", "a small cat"]
    assert json.loads(x["json"])["extra"] == "1"
    # transparent PNG flattened onto white, kept as PNG; the large JPEG downscaled keeping aspect
    assert Image.open(io.BytesIO(x["png"])).convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    assert Image.open(io.BytesIO(y["jpg"])).size == (32, 16)

    rows = [{"image": "imgs/x.png", "caption": ["one", "two"], "alt": "three", "grp": "k"},
            {"image": "imgs/y.jpg", "caption": "four", "alt": None, "grp": "k"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    stats = make_shards(tmp_path / "data.jsonl", tmp_path / "jsonl_out", caption_cols=["caption", "alt"],
                        group_col="grp", image_format="jpg", progress=False)
    assert stats["written"] == 2 and stats["skipped"] == {"bad_row": 1}
    metas = sorted((json.loads(s["json"]) for s in _read_shards(tmp_path / "jsonl_out").values()),
                   key=lambda m: m["source"])
    assert metas[0]["caption"] == ["one", "two", "three"] and metas[0]["group"] == "k"
    assert metas[1]["caption"] == ["four"]


def test_table_with_unknown_column_is_one_clear_error(tmp_path):
    (tmp_path / "t.csv").write_text("path,caption\na.jpg,x\n")
    with pytest.raises(ShardError, match="no image column 'img_path'"):
        make_shards(tmp_path / "t.csv", tmp_path / "o", image_col="img_path", progress=False)


def test_class_folders_with_templates_and_group_split(tmp_path):
    root = tmp_path / "classes"
    for c, cls in enumerate(["golden_retriever", "tabby_cat", "red_fox", "barn_owl", "koi", "emu"]):
        for i in range(4):
            _img(root / cls / f"{i}.jpg", color=(10 * c, 20 * i, 5))
    out = tmp_path / "out"
    stats = make_shards(root, out, templates=["a photo of a {label}", "a {label}"],
                        splits={"train": 0.5, "val": 0.25, "test": 0.25}, split_by="group", seed=3,
                        samples_per_shard=5, progress=False)
    assert stats["written"] == 24
    groups_by_split: dict[str, set] = {}
    for tar in out.glob("*.tar"):
        split = tar.name.split("-")[0]
        for s in _read_shards_one(tar):
            meta = json.loads(s["json"])
            groups_by_split.setdefault(split, set()).add(meta["group"])
            assert meta["caption"] == [f"a photo of a {meta['label']}", f"a {meta['label']}"]
            assert "_" not in meta["label"]
    all_groups = [g for gs in groups_by_split.values() for g in gs]
    assert len(all_groups) == len(set(all_groups)) == 6  # no group in two splits
    assert len(groups_by_split) >= 2
    assert sum(s["samples"] for s in stats["splits"].values()) == 24


def _read_shards_one(tar: Path) -> list[dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return list(samples.values())


def test_assign_splits_is_deterministic_and_group_safe():
    recs = [{"source": f"s{i}", "group": f"g{i % 17}"} for i in range(600)]
    fr = parse_splits("train=0.6,val=0.2,test=0.2")
    a = [r["split"] for r in assign_splits([dict(r) for r in recs], fr, by="group", seed=1)]
    b = [r["split"] for r in assign_splits([dict(r) for r in recs], fr, by="group", seed=1)]
    c = [r["split"] for r in assign_splits([dict(r) for r in recs], fr, by="group", seed=2)]
    assert a == b and a != c
    split_of_group: dict[str, set] = {}
    for r, s in zip(recs, a):
        split_of_group.setdefault(r["group"], set()).add(s)
    assert all(len(v) == 1 for v in split_of_group.values())
    by_sample = Counter(r["split"] for r in assign_splits([dict(r) for r in recs], fr, by="sample"))
    assert abs(by_sample["train"] - 360) < 60 and abs(by_sample["test"] - 120) < 45
    strat = list(assign_splits([dict(r) for r in recs[:100]] + [{"source": f"t{i}", "group": "z"}
                                                               for i in range(10)], fr, by="stratified"))
    z = Counter(r["split"] for r in strat if r["group"] == "z")
    assert z == {"train": 6, "val": 2, "test": 2}


def test_exact_duplicates_are_removed(tmp_path):
    a = _img(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(a.read_bytes())
    _img(tmp_path / "c.png", color=(1, 2, 3))
    skipped: Counter = Counter()
    recs = [{"path": tmp_path / n, "source": n} for n in ("a.png", "b.png", "c.png", "gone.png")]
    kept = list(load_images(recs, skipped))
    assert [r["source"] for r in kept] == ["a.png", "c.png"]
    assert skipped == {"duplicate": 1, "missing_image": 1}
    assert len(list(load_images([dict(r) for r in recs[:2]], Counter(), dedup=False))) == 2


def test_prepare_images_formats(tmp_path):
    buf = io.BytesIO()
    Image.new("P", (20, 20)).save(buf, format="GIF")
    recs = [{"image": buf.getvalue()}, {"image": b"garbage"}]
    skipped: Counter = Counter()
    out = list(prepare_images(recs, skipped, image_format="auto"))
    assert [r["ext"] for r in out] == ["png"] and skipped == {"undecodable": 1}
    with pytest.raises(ShardError, match="image_format='webp'"):
        list(prepare_images([], Counter(), image_format="webp"))


def test_overwrite_refusal_and_cli(tmp_path, capsys):
    from mmft.cli import main as mmft_main

    src = tmp_path / "src"
    for i in range(3):
        _img(src / f"{i}.jpg", color=(i, i, i))
        (src / f"{i}.txt").write_text(f"caption {i}")
    out = tmp_path / "out"
    assert mmft_main(["shards", str(src), str(out), "--quiet", "--splits", "train=0.7,test=0.3"]) == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="already holds .* pass overwrite=True"):
        make_shards(src, out, progress=False)
    assert mmft_main(["shards", str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1
    stats = make_shards(src, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-00000.tar"]
    assert stats["written"] == 3
    # same input and options -> byte-identical shards (fixed mtime, sorted inputs)
    make_shards(src, tmp_path / "again", progress=False)
    assert (out / "shard-00000.tar").read_bytes() == (tmp_path / "again" / "shard-00000.tar").read_bytes()


def test_written_shards_read_back_with_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    src = tmp_path / "src"
    for i in range(4):
        _img(src / f"{i}.jpg", color=(50 * i, 0, 0))
        (src / f"{i}.txt").write_text(f"caption {i}")
    out = tmp_path / "out"
    make_shards(src, out, samples_per_shard=3, prefix="demo", progress=False)
    pattern = str(out / brace_pattern("demo", 2))
    samples = list(wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json"))
    assert len(samples) == 4
    assert [s[1] for s in samples] == [f"caption {i}" for i in range(4)]
    assert samples[0][0].size == (24, 16) and samples[2][2]["caption"] == ["caption 2"]


def test_table_whose_images_resolve_to_nothing_is_an_error_saying_where(tmp_path, capsys):
    from mmft.cli import main as mmft_main

    table = tmp_path / "meta" / "pairs.csv"
    table.parent.mkdir()
    _img(tmp_path / "images" / "0.jpg")  # beside the table's folder, not inside it
    table.write_text("image,caption\nimages/0.jpg,a red box\nimages/1.jpg,a blue box\n")
    with pytest.raises(ShardError, match=r"read 2 row\(s\) .*relative to the table's folder .*meta") as exn:
        make_shards(table, tmp_path / "out", progress=False)
    assert "images/0.jpg" in str(exn.value) and "\n" not in str(exn.value)
    assert not list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / "sizes.json").exists()
    rc = mmft_main(["shards", str(table), str(tmp_path / "out2"), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "read 2 row(s)" in err and str(table.parent) in err and err.count("\n") == 1
    table.write_text("image,caption\n../images/0.jpg,a red box\n")  # the same path, relative to meta/
    assert make_shards(table, tmp_path / "out3", progress=False)["written"] == 1


def test_folder_without_images_is_an_error(tmp_path, capsys):
    from mmft.cli import main as mmft_main

    src = tmp_path / "src"
    src.mkdir()
    (src / "readme.txt").write_text("captions but no images")
    rc = mmft_main(["shards", str(src), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "found no image files" in err and str(src) in err
    _img(src / "a.jpg")  # an image without a caption: found, then dropped
    with pytest.raises(ShardError, match=r"found 1 image\(s\) in .* empty_caption 1"):
        make_shards(src, tmp_path / "out", progress=False)
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    with pytest.raises(ShardError, match="no image files .* class folders"):
        make_shards(tmp_path / "classes", tmp_path / "out", templates=["a {label}"], progress=False)


def test_tools_script_is_the_cli_verb(tmp_path):
    import subprocess
    import sys

    src = tmp_path / "src"
    _img(src / "a.jpg")
    (src / "a.txt").write_text("a caption")
    script = Path(__file__).resolve().parent.parent / "tools" / "make_shards.py"
    out = subprocess.run([sys.executable, str(script), str(src), str(tmp_path / "out"), "--quiet"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "wrote 1 samples" in out.stdout and (tmp_path / "out" / "shard-00000.tar").is_file()


def test_write_tar_keeps_every_member_as_given_and_is_reproducible(tmp_path):
    members = [("k1.png", b"\x89PNG not an image"), ("k1.txt", b"a caption\n"), ("../up.txt", b""),
               ("k0.json", b"{}"), ("k1.txt", b"a second k1.txt")]  # odd names and order stay as given
    first = write_tar(tmp_path / "sub" / "a.tar", members)
    with tarfile.open(first) as tar:
        back = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert first == str(tmp_path / "sub" / "a.tar") and back == members
    write_tar(tmp_path / "b.tar", members)
    assert (tmp_path / "b.tar").read_bytes() == Path(first).read_bytes()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.tar", "b.tar", "sub"]  # no temp file left
