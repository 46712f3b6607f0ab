"""Offline demo datasets: openclipart cleaning/rendering/splitting on synthetic SVGs, textile classes."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from PIL import Image

from mmft.demo import datasets as dd

pytest.importorskip("cairosvg")

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="120" height="80">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:description>{desc}</dc:description>
    <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>
    <dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
  </cc:Work></rdf:RDF></metadata>
  {body}
</svg>
"""


def _svg(root: Path, rel: str, title: str, *, desc: str = "", keywords=(), creator: str = "Jane Doe",
         color: str = "#c03020", body: str | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    body = body if body is not None else (
        f'<rect x="10" y="10" width="60" height="50" fill="{color}"/>'
        '<circle cx="90" cy="40" r="15" fill="#203080"/>')
    kws = "".join(f"<rdf:li>{escape(k)}</rdf:li>" for k in keywords)
    path.write_text(SVG.format(title=escape(title), desc=escape(desc), keywords=kws, creator=escape(creator),
                               body=body))
    return path


@pytest.fixture(scope="module")
def svg_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("openclipart") / "svg"
    cat = _svg(root, "animals/cat.svg", "Sleeping Cat", desc="line drawing of a sleeping cat",
               keywords=["animal", "cat", "hash", "", "Jane Doe"], color="#404040")
    (root / "people" / "cat_copy.svg").parent.mkdir(parents=True)
    (root / "people" / "cat_copy.svg").write_bytes(cat.read_bytes())  # byte-identical copy
    _svg(root, "animals/horse.svg", "Cavallo", color="#805020")  # Italian title
    _svg(root, "animals/dog.svg", "Copper the Beagle", keywords=["dog"], color="#a06010")
    _svg(root, "food/apple.svg", "Apple", desc="contact: jean@example.com", keywords=["fruit"],
         color="#e02020")
    _svg(root, "food/apple_bw.svg", "Apple (B and W)", color="#101010")
    _svg(root, "food/pear.svg", "Pear", desc="EPS converted from  http://aiga.org", color="#a0c020")
    _svg(root, "food/bread.svg", "Loaf of Bread", color="#c08040")
    _svg(root, "plants/oak.svg", "Oak Tree", keywords=["tree", "plant"], color="#208020")
    _svg(root, "plants/blank.svg", "Empty Leaf", body='<rect width="120" height="80" fill="#ffffff"/>')
    _svg(root, "computer/icon.svg", "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)")
    _svg(root, "computer/fc.svg", "Clipart by Nicu Buculei - fc23", color="#3030c0")
    _svg(root, "computer/monitor.svg", "Flat Monitor", desc="a flat computer screen", color="#303030")
    (root / "computer" / "broken.svg").write_text("<svg><metadata><dc:title>Broken</svg")
    for i in range(8):
        _svg(root, f"shapes/star{i}.svg", "gramastar", color=f"#{20 * i + 10:02x}4040")  # a collection
    _svg(root, "office/pen.svg", "Pen", color="#0000a0")
    _svg(root, "office/untitled.svg", "", color="#00a000")
    _svg(root, "people/runner.svg", "Running Man", color="#a000a0")
    _svg(root, "transportation/car.svg", "Red Car", color="#ff0000")
    _svg(root, "transportation/car2.svg", "red car", color="#ee1111")  # duplicate title
    _svg(root, "recreation/apple_toy.svg", "Apple 2", color="#dd3333")  # same group as a DOMAIN drawing
    return root


def test_cleaning_rules_on_titles_descriptions_keywords():
    assert dd.normalize_title("Clipart by Nicu Buculei - pear") == "pear"
    assert dd.normalize_title("tree_with_fruits2") == "tree with fruits"
    assert dd.normalize_title("Onion Rings (B and W)") == "Onion Rings (black and white)"
    assert dd.normalize_title("telefono (email: someone@email.it)") == "telefono"
    flat = "Part of the Flat Icon Collection (Wed Aug 25 23:23:49 2004)"
    assert dd.title_problem(flat) == "boilerplate_title"
    assert dd.title_problem("fc23") == dd.title_problem("TV") == "code_like_title"
    assert dd.title_problem("Cigno di notte nella palude") == "foreign_title"
    assert dd.title_problem("Gatto Cat") is None and dd.title_problem("Baden-Württemberg") is None
    assert dd.strip_creator("Coccinella Rollandin", "Architetto Francesco Rollandin") == "Coccinella"
    assert dd.clean_description("HASH(0x861a740)", "ireland", 1) is None
    assert dd.clean_description("Kitten.", "Kitten", 1) is None
    assert dd.clean_description("UK roadsigns", "Stop", 58) is None  # a collection's shared description
    long = "A red fox " * 40
    cut = dd.clean_description(long, "Fox", 1)
    assert cut.endswith("...") and len(cut) < 210
    assert dd.clean_keywords(["Hash", "", "united_nations_member", "www.x.net", "Jane Doe", "flag", "flag"],
                             "Peru", "Jane Doe") == ["united nations member", "flag"]
    assert dd.group_stem("Ice Cream Cone (2 Scoop) (black and white)") == "ice cream cone"


def _samples(folder: Path) -> list[dict]:
    out = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            files: dict[str, dict] = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                files.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key, f in files.items():
            out.append({"split": tar.name.split("-")[0], "meta": json.loads(f["json"]),
                        "txt": f["txt"].decode(), "png": f.get("png"), "key": key})
    return out


def test_openclipart_build_keeps_drops_and_splits_by_category(svg_root, tmp_path, capsys):
    out = tmp_path / "openclipart"
    stats = dd.build_openclipart(out, svg_root=svg_root, image_size=48, workers=2, progress=True)
    assert stats["skipped"] == {
        "duplicate_file": 1, "broken_xml": 1, "foreign_title": 1, "boilerplate_title": 1,
        "code_like_title": 1, "collection_title": 8, "no_title": 1, "duplicate_title": 1,
        "general_overlaps_domain": 1, "blank_render": 1}
    domain, general = _samples(out / "domain"), _samples(out / "general")
    assert {s["meta"]["category"] for s in domain} == {"animals", "food", "plants"}
    assert {s["meta"]["category"] for s in general} <= {"computer", "office", "people", "transportation"}
    titles = {s["meta"]["caption"][0] for s in domain + general}
    assert titles == {"Sleeping Cat", "Copper the Beagle", "Apple", "Apple (black and white)", "Pear",
                      "Loaf of Bread", "Oak Tree", "Flat Monitor", "Pen", "Running Man", "Red Car"}
    by_title = {s["meta"]["caption"][0]: s for s in domain + general}
    cat = by_title["Sleeping Cat"]
    assert cat["meta"]["caption"] == ["Sleeping Cat", "line drawing of a sleeping cat",
                                      "keywords: animal, cat"]
    assert cat["txt"].splitlines() == cat["meta"]["caption"] and cat["meta"]["source"] == "animals/cat.svg"
    assert by_title["Apple"]["meta"]["caption"] == ["Apple", "keywords: fruit"]  # e-mail description dropped
    assert by_title["Pear"]["meta"]["caption"] == ["Pear"]
    # near-duplicate titles share a group and therefore a split
    apple, apple_bw = by_title["Apple"], by_title["Apple (black and white)"]
    assert apple["meta"]["group"] == apple_bw["meta"]["group"] == "apple"
    assert by_title["Apple"]["split"] == by_title["Apple (black and white)"]["split"]
    im = Image.open(io.BytesIO(cat["png"]))
    assert im.size == (48, 48) and im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)
    sizes = json.loads((out / "domain" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(domain) == stats["datasets"]["domain"]["written"]
    assert stats["by_category"]["food"] == 4 and stats["by_category"]["animals"] == 2
    assert "openclipart domain" in capsys.readouterr().err  # tqdm progress

    again = dd.build_openclipart(out, svg_root=svg_root, image_size=48, workers=1)
    assert again["seconds"] == stats["seconds"] and "already built" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="overwrite"):
        dd.build_openclipart(out, svg_root=svg_root, image_size=40, workers=1, progress=False)
    rebuilt = dd.build_openclipart(out, svg_root=svg_root, image_size=40, workers=1, overwrite=True,
                                   progress=False)
    assert rebuilt["datasets"]["domain"]["written"] == stats["datasets"]["domain"]["written"]
    twin = dd.build_openclipart(tmp_path / "twin", svg_root=svg_root, image_size=40, workers=2,
                                progress=False)
    assert twin["skipped"] == rebuilt["skipped"]
    for tar in (out / "domain").glob("*.tar"):  # deterministic: same bytes from 1 or 2 workers
        assert tar.read_bytes() == (tmp_path / "twin" / "domain" / tar.name).read_bytes()


def test_render_timeout_and_errors_are_counted(svg_root, monkeypatch):
    from collections import Counter

    recs = [{"key": "a", "path": svg_root / "food" / "bread.svg", "source": "food/bread.svg"},
            {"key": "b", "path": svg_root / "nope.svg", "source": "nope.svg"}]
    skipped: Counter = Counter()
    failures: dict = {}
    kept = dd.render_records(recs, skipped, image_size=32, workers=1, progress=False, failures=failures)
    assert [r["key"] for r in kept] == ["a"]
    assert skipped == {"render_error": 1} and failures == {"nope.svg": "render_error"}

    def slow(data, size):
        import time
        time.sleep(2)

    monkeypatch.setattr(dd, "render_svg", slow)
    skipped = Counter()
    assert list(dd.render_records(recs[:1], skipped, workers=1, timeout_s=0.2, progress=False)) == []
    assert skipped == {"render_timeout": 1}


def test_missing_svg_root_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make demo.*openclipart-svg"):
        dd.build_openclipart(tmp_path / "o", svg_root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown demo dataset 'mnist'"):
        dd.build_demo_data(tmp_path / "o", which=("mnist",))


def _textile_tree(root: Path, counts: dict[str, int]) -> Path:
    for c, (cls, n) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            # noisy texture: re-encoding it would change its bytes (a flat colour survives re-encoding)
            noise = Image.effect_noise((32, 32), 40 + 10 * c + i).convert("RGB")
            noise.save(root / cls / f"textile_{i:04d}.jpg", quality=90)
    return root


def test_textile_build_is_stratified_and_keeps_jpeg_bytes(tmp_path):
    root = _textile_tree(tmp_path / "simulated", {"nominal": 10, "local": 5, "global": 5})
    stats = dd.build_demo_data(tmp_path / "demo", which=("textile",), textile_dir=root, progress=False)
    t = stats["textile"]
    n = {k: v["samples"] for k, v in t["datasets"]["."]["splits"].items()}
    assert n == {"train": 12, "val": 4, "test": 4}
    assert t["by_category"] == {"global": 5, "local": 5, "nominal": 10}
    samples = _samples(tmp_path / "demo" / "textile")
    per = {(s["split"], s["meta"]["group"]) for s in samples}
    assert ("test", "local") in per and ("val", "global") in per and ("train", "nominal") in per
    local = next(s for s in samples if s["meta"]["group"] == "local")
    assert local["meta"]["caption"] == dd.TEXTILE_CAPTIONS["local"]
    with tarfile.open(next((tmp_path / "demo" / "textile").glob("train-*.tar"))) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
        src = json.loads(tf.extractfile(m.name.replace(".jpg", ".json")).read())["source"]
        assert tf.extractfile(m).read() == (root / src).read_bytes()  # native resolution, not re-encoded
    limited = dd.build_textile(tmp_path / "lim", root=root, limit=5, progress=False)
    assert limited["by_category"] == {"global": 5, "local": 5, "nominal": 5}


def test_textile_from_installed_package_and_cli(tmp_path):
    pytest.importorskip("conformal_clip_data")
    out = tmp_path / "demo"
    from mmft.cli import main

    assert main(["demo-data", str(out), "--which", "textile", "--limit", "5", "--quiet"]) == 0
    stats = json.loads((out / "textile" / "stats.json").read_text())
    assert stats["by_category"] == {"global": 5, "local": 5, "nominal": 5}
    with tarfile.open(out / "textile" / "train-00000.tar") as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
        assert Image.open(tf.extractfile(m)).size == (250, 250)


def test_tools_script_is_the_cli_verb():
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "tools" / "make_demo_data.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0 and "mmft demo-data" in out.stdout and "--which" in out.stdout
