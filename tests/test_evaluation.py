"""Evaluation: rows and paired deltas, sweep rule, approximate-index loss, report files, run directories."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, adapted_run_dir

from mmft.config import EvalConfig, IndexConfig, LoraConfig, ModelConfig
from mmft.embeddings import Embeddings, embed
from mmft.evaluation.core import (
    EvalRow,
    approximate_loss,
    evaluate,
    evaluate_run,
    recommend_scale,
    retrieval_results,
)
from mmft.evaluation.report import markdown
from mmft.model.factory import create_model
from mmft.model.lora import apply_lora, get_lora_scale

TINY = TINY_VIT  # the shared tiny open_clip config (conftest.py)


def _tuned_tiny(seed=0):
    """A tiny random model with LoRA whose B matrices are perturbed (a stand-in for training)."""
    torch.manual_seed(seed)
    model, _, preprocess, tok = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY))
    base = copy.deepcopy(model)
    apply_lora(model, LoraConfig())
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3, generator=g)
    return model, base, preprocess, tok


@pytest.fixture(scope="module")
def tuned():
    return _tuned_tiny()


def _batches(n, seed, groups=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, 10):
        idx = range(s, min(n, s + 10))
        out.append({"image": torch.randn(len(idx), 3, 32, 32, generator=g),
                    "key": [f"{seed}-{i}" for i in idx],
                    "captions": [[f"picture {i}", f"item {i} seen from above"][: 1 + i % 2] for i in idx],
                    "group": [f"class{i % 3}" for i in idx] if groups else None})
    return out


def test_end_to_end_report_with_baseline_tuned_deltas_and_sweep(tuned, tmp_path):
    model, base, _, tok = tuned
    sets = {"domain": _batches(30, 0), "general": _batches(20, 1)}
    cfg = EvalConfig(bootstrap=200, lora_scales=[0.0, 0.5, 1.0], max_general_drop=5.0)
    report = evaluate(model, sets, tokenizer=tok, eval_cfg=cfg, out_dir=tmp_path / "eval", progress=False)
    for name in ("report.json", "report.md", "recall_bars.png", "lora_sweep.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert (tmp_path / "eval" / "recall_bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["rows"] == ["baseline", "tuned"] and set(saved["metrics"]) == {"domain", "general"}
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| baseline |" in md and "| tuned |" in md
    assert "Δ tuned − baseline" in md and "Recommended LoRA" in md
    dom = report["metrics"]["domain"]
    for row in ("baseline", "tuned"):
        for d in ("t2i", "i2t"):
            m = dom[row][d]["R@5"]
            assert m["ci"][0] <= m["value"] <= m["ci"][1]
    delta = report["deltas"]["domain"]["tuned"]["t2i"]["R@1"]
    tuned_r1, base_r1 = dom["tuned"]["t2i"]["R@1"]["value"], dom["baseline"]["t2i"]["R@1"]["value"]
    assert delta["value"] == pytest.approx(tuned_r1 - base_r1)
    assert delta["ci"][0] <= delta["value"] <= delta["ci"][1]
    assert dom["baseline"]["t2i"]["queries"] == 45 and dom["baseline"]["i2t"]["gallery"] == 45
    # the baseline row is exactly the model before LoRA was applied
    plain = retrieval_results(embed(base, sets["domain"], tokenizer=tok, progress=False), [1, 5, 10])
    assert dom["baseline"]["t2i"]["R@5"]["value"] == pytest.approx(100 * plain["t2i"]["hits"][5].mean())
    assert dom["baseline"]["i2t"]["median_rank"] == float(np.median(plain["i2t"]["rank"]))
    # the sweep's end points are the baseline and tuned rows, and the model's scale is restored
    pts = {p["lora_scale"]: p for p in report["sweep"]["points"]}
    assert pts[1.0]["domain"]["t2i"]["R@1"] == pytest.approx(dom["tuned"]["t2i"]["R@1"]["value"])
    assert report["sweep"]["recommended_lora_scale"] in (0.0, 0.5, 1.0)
    assert get_lora_scale(model) == 1.0


def test_recommended_scale_gets_its_own_row(tuned, monkeypatch):
    import mmft.evaluation.core as E

    model, _, _, tok = tuned
    monkeypatch.setattr(E, "recommend_scale", lambda points, drop: (0.5, "forced for the test"))
    cfg = EvalConfig(bootstrap=50, lora_scales=[0.5, 1.0])
    report = evaluate(model, {"domain": _batches(30, 0)}, tokenizer=tok, eval_cfg=cfg, progress=False)
    assert report["rows"] == ["baseline", "tuned", "tuned @ scale 0.5"]
    row = report["metrics"]["domain"]["tuned @ scale 0.5"]
    half = {p["lora_scale"]: p for p in report["sweep"]["points"]}[0.5]["domain"]
    for d in ("t2i", "i2t"):
        assert row[d]["R@1"]["value"] == pytest.approx(half[d]["R@1"])
        assert row[d]["R@5"]["value"] == pytest.approx(half[d]["R@5"])
    assert "tuned @ scale 0.5" in report["deltas"]["domain"]
    # a row that already sits at the recommended scale is not repeated
    assert E.recommended_rows([E.EvalRow("baseline", 0.0), E.EvalRow("tuned", 1.0)], 1.0) == []
    assert E.recommended_rows([E.EvalRow("other", 1.0, model=object())], 1.0)[0].lora_scale == 1.0


def test_recommend_scale_rule():
    def point(a, dom, gen_t2i, gen_i2t):
        r = {"R@1": dom, "R@5": dom}
        return {"lora_scale": a, "domain": {"t2i": r, "i2t": r},
                "general": {"t2i": {"R@5": gen_t2i}, "i2t": {"R@5": gen_i2t}}}

    pts = [point(0.0, 10, 50, 50), point(0.5, 20, 49, 48.5), point(1.0, 30, 49, 45)]
    best, rule = recommend_scale(pts, max_general_drop=2.0)
    assert best == 0.5  # 1.0 scores higher on the domain but loses 5 points of general i2t R@5
    assert [p["allowed"] for p in pts] == [True, True, False] and pts[2]["general_drop"] == 5
    assert recommend_scale(pts, max_general_drop=10.0)[0] == 1.0
    no_general = [{k: v for k, v in p.items() if k != "general"} for p in pts]
    best, rule = recommend_scale(no_general, 2.0)
    assert best == 1.0 and "no forgetting guard" in rule


def test_named_rows_and_group_relevance(tuned):
    model, base, _, tok = tuned
    rows = [EvalRow("frozen", 0.0), EvalRow("half", 0.5), EvalRow("other-model", model=base)]
    report = evaluate(model, {"domain": _batches(24, 2, groups=True)}, tokenizer=tok, rows=rows, sweep=False,
                      eval_cfg=EvalConfig(bootstrap=100), progress=False)
    assert report["sets"]["domain"]["relevance"] == "group"
    assert list(report["metrics"]["domain"]) == ["frozen", "half", "other-model"]
    assert list(report["deltas"]["domain"]) == ["half", "other-model"]
    frozen, other = report["metrics"]["domain"]["frozen"], report["metrics"]["domain"]["other-model"]
    assert frozen["t2i"]["mAP@10"]["value"] == pytest.approx(other["t2i"]["mAP@10"]["value"])  # same model
    assert report["sweep"] is None
    # three classes, ~8 images each: class-level R@10 is far above an instance-level one
    assert frozen["t2i"]["R@10"]["value"] > 90
    # per-class image->text R@1, checked against a plain loop over the embeddings
    emb = embed(base, _batches(24, 2, groups=True), tokenizer=tok, progress=False)
    per = report["per_group"]["domain"]["other-model"]
    assert sorted(per) == ["class0", "class1", "class2"] and sum(v["queries"] for v in per.values()) == 24
    text_group = [emb.groups[i] for i in emb.caption_image]
    for cls, v in per.items():
        mine = [i for i, g in enumerate(emb.groups) if g == cls]
        hit = [text_group[int(np.argmax(emb.text @ emb.image[i]))] == cls for i in mine]
        assert v["R@1"] == pytest.approx(100.0 * np.mean(hit))
    assert "R@1 per group" in markdown(report, []) and "| frozen |" in markdown(report, [])


def test_approximate_factory_reports_recall_lost():
    """IVF probing 16 of 256 lists on structureless vectors loses recall; the report says how much."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((3000, 24)).astype(np.float32)
    caption_image = np.arange(3000)
    text = image + 0.8 * rng.standard_normal((3000, 24)).astype(np.float32)
    emb = Embeddings(image=image / np.linalg.norm(image, axis=1, keepdims=True),
                     text=text / np.linalg.norm(text, axis=1, keepdims=True),
                     keys=[str(i) for i in range(3000)], captions=["c"] * 3000, caption_image=caption_image)
    res = retrieval_results(emb, [1, 5, 10], IndexConfig(factory="IVF256,Flat"))
    loss = approximate_loss(res)
    for d in ("t2i", "i2t"):
        lost = loss[d]["R@10"]["exact"] - loss[d]["R@10"]["approximate"]
        assert lost == pytest.approx(loss[d]["R@10"]["loss"])
        assert loss[d]["R@10"]["loss"] > 1  # points lost, a real loss
        assert (res[d]["exact_hits"][10] >= res[d]["hits"][10]).mean() > 0.95  # IVF only finds exact hits


def test_index_settings_reach_the_evaluation_search():
    """index.nprobe probes every list of the same IVF: nothing lost; the default 16 of 256 loses recall."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((3000, 24)).astype(np.float32)
    text = image + 0.8 * rng.standard_normal((3000, 24)).astype(np.float32)
    emb = Embeddings(image=image / np.linalg.norm(image, axis=1, keepdims=True),
                     text=text / np.linalg.norm(text, axis=1, keepdims=True),
                     keys=[str(i) for i in range(3000)], captions=["c"] * 3000, caption_image=np.arange(3000))
    full = approximate_loss(retrieval_results(emb, [10], IndexConfig(factory="IVF256,Flat", nprobe=256)))
    some = approximate_loss(retrieval_results(emb, [10], IndexConfig(factory="IVF256,Flat")))
    for d in ("t2i", "i2t"):
        assert full[d]["R@10"]["loss"] == 0 and some[d]["R@10"]["loss"] > 1
    assert retrieval_results(emb, [10], IndexConfig(fp16=True))["t2i"]["factory"] == "SQfp16"
    assert "exact_hits" not in retrieval_results(emb, [10])["t2i"]  # default: exact Flat below 250,000


def test_exhaustive_ivf_through_evaluate_loses_nothing(tuned):
    model, _, _, tok = tuned
    cfg = EvalConfig(bootstrap=50)
    icfg = IndexConfig(factory="IVF4,Flat")  # 4 lists, all probed: exact
    report = evaluate(model, {"domain": _batches(40, 3)}, tokenizer=tok, eval_cfg=cfg, index_cfg=icfg,
                      sweep=False, progress=False)
    approx = report["approximate"]["domain"]["tuned"]["t2i"]
    for k in ("R@1", "R@5", "R@10"):
        assert approx[k]["loss"] == 0 and approx[k]["exact"] == approx[k]["approximate"]
    assert "Approximate index `IVF4,Flat`" in markdown(report, [])


def test_package_level_evaluate_works_after_the_submodule_is_imported(tuned):
    import mmft
    import mmft.evaluation.core  # the module has its own name, so `mmft.evaluate` stays the function

    model, _, _, tok = tuned
    report = mmft.evaluate(model, {"domain": _batches(8, 4)}, tokenizer=tok, sweep=False,
                           eval_cfg=EvalConfig(bootstrap=20), progress=False)
    assert report["rows"] == ["baseline", "tuned"]


def test_one_shot_iterator_is_refused(tuned):
    model, _, _, tok = tuned
    with pytest.raises(ValueError, match="one-shot iterator"):
        evaluate(model, {"domain": iter(_batches(10, 0))}, tokenizer=tok, progress=False)


def _swatch_shards(tmp_path, n: int, step: int, captions: tuple[str, ...]) -> list[str]:
    """n flat-colour 36 px images (colour i * step) with the given captions ("{i}" filled in), written
    as real shards of 5 through mmft.data.shard_writer; returns the shard paths."""
    from PIL import Image

    from mmft.data.shard_writer import make_shards

    src = tmp_path / "src"
    src.mkdir()
    for i in range(n):
        Image.new("RGB", (36, 36), (step * i, 255 - step * i, (70 * i) % 255)).save(src / f"im{i:02d}.png")
        (src / f"im{i:02d}.txt").write_text("".join(c.format(i=i) + "\n" for c in captions))
    make_shards(src, tmp_path / "shards", samples_per_shard=5, progress=False)
    return [str(p) for p in sorted((tmp_path / "shards").glob("*.tar"))]


def test_evaluate_run_on_real_shards(tmp_path):
    """A run directory (config + adapter) and real shards through mmft.data.stream: the path `mmft eval`
    takes."""
    pytest.importorskip("mmft.data.stream")
    run, model, preprocess, tok = adapted_run_dir(tmp_path, seed=5)
    shards = _swatch_shards(tmp_path, 12, step=20, captions=("swatch {i}", "colour card number {i}"))
    ecfg = EvalConfig(domain=shards, general=shards[:1], bootstrap=50, lora_scales=[0.0, 1.0])
    report = evaluate_run(run, ecfg, progress=False)
    assert report["sets"]["domain"] == {"images": 12, "captions": 24, "relevance": "instance"}
    assert (run / "eval" / "report.md").is_file() and (run / "eval" / "lora_sweep.png").is_file()
    assert json.loads((run / "eval" / "report.json").read_text())["run_dir"] == str(run)
    # the in-memory model gives the same numbers as the run directory
    direct = evaluate(model, {"domain": shards}, tokenizer=tok, preprocess=preprocess, eval_cfg=ecfg,
                      sweep=False, progress=False)
    for row in ("baseline", "tuned"):
        assert report["metrics"]["domain"][row]["i2t"]["mAP@10"]["value"] == pytest.approx(
            direct["metrics"]["domain"][row]["i2t"]["mAP@10"]["value"])
    with pytest.raises(ValueError, match="eval.domain lists no shards"):
        evaluate_run(run, EvalConfig(), progress=False)


def test_evaluate_run_against_another_run_pairs_every_delta_with_it(tmp_path):
    """`mmft eval --against head-only=RUN --last`: the other run is scored first and as it is, every delta
    is that row's paired difference, and the last-step row scores the run's adapter-last."""
    pytest.importorskip("mmft.data.stream")
    from mmft.cli import main

    run, _, preprocess, tok = adapted_run_dir(tmp_path, seed=5)
    (tmp_path / "other").mkdir()
    other, other_model, _, _ = adapted_run_dir(tmp_path / "other", seed=6)
    shards = _swatch_shards(tmp_path, 10, step=25, captions=("swatch {i}",))
    ecfg = EvalConfig(domain=shards, bootstrap=50, lora_scales=[0.0, 1.0])
    report = evaluate_run(run, ecfg, tmp_path / "cmp", progress=False, against={"head-only": other},
                          last=True)
    assert report["rows"][:4] == ["head-only", "baseline", "tuned", "last step"]
    metrics, deltas = report["metrics"]["domain"], report["deltas"]["domain"]

    def value(row, d="i2t"):
        return metrics[row][d]["mAP@10"]["value"]

    assert set(deltas) == set(report["rows"][1:])
    for row in ("baseline", "tuned"):
        d = deltas[row]["t2i"]["mAP@10"]["value"]
        assert d == pytest.approx(value(row, "t2i") - value("head-only", "t2i"))
    direct = evaluate(other_model, {"domain": shards}, tokenizer=tok, preprocess=preprocess, eval_cfg=ecfg,
                      rows=[EvalRow("m", None)], sweep=False, progress=False)
    assert value("head-only") == pytest.approx(direct["metrics"]["domain"]["m"]["i2t"]["mAP@10"]["value"])
    # this run keeps only adapter-last, so its kept step is its last step
    assert value("last step") == pytest.approx(value("tuned"))
    assert value("head-only") != pytest.approx(value("tuned"))
    with pytest.raises(SystemExit, match="NAME=RUN_DIR"):
        main(["eval", "--run", str(run), "--against", str(other)])
