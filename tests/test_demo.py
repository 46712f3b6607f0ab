"""A CI-sized `mmft demo`: synthetic clip art through every stage, with the report checked against real
searches."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("cairosvg")

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="100" height="100">
  <metadata><rdf:RDF><cc:Work rdf:about=""><dc:title>{title}</dc:title>
  <dc:subject><rdf:Bag><rdf:li>{kw}</rdf:li></rdf:Bag></dc:subject></cc:Work></rdf:RDF></metadata>
  <{shape} fill="{color}" {geom}/>
</svg>
"""
COLORS = {"red": "#d02020", "green": "#20a030", "blue": "#2040d0", "yellow": "#e0d020", "purple": "#8020a0",
          "orange": "#f08010", "black": "#101010", "pink": "#f080c0", "brown": "#804010", "teal": "#108080"}
THINGS = {"animals": ["cat", "dog", "horse"], "food": ["apple", "bread", "cake"], "plants": ["tree", "rose"],
          "computer": ["mouse", "screen", "keyboard"], "transportation": ["car", "boat", "train"]}


def _write_svgs(root: Path) -> None:
    """One drawing per (colour, thing): the thing sets the shape's geometry, so no two images are equal."""
    index = 0
    for category, things in THINGS.items():
        for thing in things:
            index += 1
            size, pos = 20 + 4 * index, 8 + 3 * (index % 5)
            for color, hex_ in COLORS.items():
                shape, geom = (("rect", f'x="{pos}" y="{pos}" width="{size}" height="{100 - 2 * pos}"')
                               if index % 2
                               else ("ellipse", f'cx="50" cy="50" rx="{size // 2 + 5}" ry="{45 - pos}"'))
                path = root / category / f"{color}_{thing}.svg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(SVG.format(title=f"{color.title()} {thing}", kw=thing, shape=shape,
                                           color=hex_, geom=geom))


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    from mmft.demo.runner import run_demo

    svg_root = tmp_path / "svg"
    _write_svgs(svg_root)
    out, data = tmp_path / "runs", tmp_path / "data"
    report = run_demo(out_dir=str(out), data_dir=str(data), quick=True, svg_root=str(svg_root))

    # every stage left its artifact
    for path in ("align/adapter-best", "base/mmft-mini-aligned.pt", "domain-head/adapter-best",
                 "domain-lora/adapter-best", "index/manifest.json", "report/report.md", "report/report.json",
                 "index/thumbs.json", "index-baseline/manifest.json", "index-baseline/thumbs.json"):
        assert (out / path).exists(), path
    # the serve command it prints passes the start-up check (each index matches its model)
    import shlex

    from mmft.demo.runner import serve_command
    from mmft.serve.config import check_config, load_serve_config

    check_config(load_serve_config("configs/serve.yaml", shlex.split(serve_command(str(out)))[4:]))
    assert sorted(p.name for p in (out / "report").glob("*.png"))
    # report structure: three rows on both sets, deltas against the baseline, the sweep
    saved = json.loads((out / "report" / "report.json").read_text())
    rows = ["baseline", "head-only", "LoRA last step", "tuned"]
    scale = saved["sweep"]["recommended_lora_scale"]
    if scale != 1.0:  # the model at the recommended scale has its own row
        rows.append(f"tuned @ scale {scale:g}")
    assert saved["rows"] == rows
    for set_name in ("domain", "general"):
        assert set(saved["metrics"][set_name]) == set(rows)  # report.json keeps its keys sorted
        assert set(saved["deltas"][set_name]) == set(rows[1:])
        for d in ("t2i", "i2t"):
            cell = saved["metrics"][set_name]["tuned"][d]["R@1"]
            assert cell["ci"][0] <= cell["value"] <= cell["ci"][1]
    assert saved["sweep"]["recommended_lora_scale"] in [p["lora_scale"] for p in saved["sweep"]["points"]]
    assert report["rows"] == saved["rows"]

    # tuned text->image R@1 equals what the saved index answers for the domain test captions
    from mmft.config import DataConfig
    from mmft.data.stream import eval_loader
    from mmft.index.core import load_index
    from mmft.model.adapter import load_model

    tuned = load_model(out / "domain-lora")
    index = load_index(out / "index", model=tuned.model)
    captions, owners = [], []
    for batch in eval_loader(sorted(str(p) for p in (data / "openclipart" / "domain").glob("test-*.tar")),
                             DataConfig(num_workers=0), tuned.preprocess):
        for key, caps in zip(batch["key"], batch["captions"]):
            captions += caps
            owners += [key] * len(caps)
    _, ids = index.search_text(captions, tuned.model, tuned.tokenizer, k=1)
    r1 = 100.0 * sum(i[0] == o for i, o in zip(ids, owners)) / len(owners)
    assert saved["metrics"]["domain"]["tuned"]["t2i"]["R@1"]["value"] == pytest.approx(r1, abs=1e-6)
