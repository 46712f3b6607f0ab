"""Retrieval evaluation: frozen baseline vs tuned model (and any named rows), forgetting, LoRA-scale sweep.

    report = evaluate(model, {"domain": domain_shards, "general": general_shards}, tokenizer=tok,
                      preprocess=preprocess_val, eval_cfg=EvalConfig(), out_dir="runs/x/eval")

Protocol (eval/README.md): every caption queries the images (text->image) and every image queries the
captions (image->text); an image query hits when ANY of its captions is in the top k. With group ids
(relevance "group") any item of the same group is relevant. Search goes through a FAISS index built
with the index settings (mmft.config.IndexConfig: the factory, fp16, nprobe and train_sample the shipped
index uses; exact `Flat` below 250,000 vectors by default); with an approximate index the exact recall
is reported beside it. Ranks are exact and need O(N * k) memory, not N x N.
95% CIs: percentile bootstrap over queries; deltas use the same resampled queries for both rows.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmft.config import EvalConfig, IndexConfig
from mmft.evaluation import metrics as M

DIRECTIONS = ("t2i", "i2t")
# Recommended LoRA scale: maximise the mean of these domain metrics ...
SWEEP_SCORE = (("t2i", "R@1"), ("t2i", "R@5"), ("i2t", "R@1"), ("i2t", "R@5"))
# ... while GENERAL R@5 loses at most eval_cfg.max_general_drop points in each direction.
SWEEP_GUARD = "R@5"
MAX_GROUPS_SHOWN = 20  # per-group recall is reported for class-like groups only
EXACT = IndexConfig(factory="Flat")  # the LoRA-scale sweep compares models, not indexes


@dataclass
class EvalRow:
    """One row of the report: a model (default: the evaluated one) at a LoRA scale (None = as it is)."""

    name: str
    lora_scale: float | None = None
    model: Any = None
    tokenizer: Any = None
    preprocess: Any = None


# ---------------------------------------------------------------- per-query results


def _search_rows(gallery: np.ndarray, queries: np.ndarray, k: int, index_cfg: IndexConfig) -> np.ndarray:
    """(Q, k) gallery rows of each query's top k through a FAISS index built with `index_cfg`."""
    from mmft.index.core import build_index

    return build_index(gallery, index_cfg=index_cfg).search_rows(queries, k)[1]


def direction_results(queries: np.ndarray, gallery: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray,
                      ks: list[int], index_cfg: IndexConfig | None = None) -> dict:
    """Per-query hits@k, AP@10 and exact first-relevant rank of one direction.

    Queries without any relevant gallery item are left out. Returns {"hits": {k: (Q,) bool},
    "ap10": (Q,), "rank": (Q,) int, "gallery": N, "factory": the index factory used, and, for an
    approximate factory, "exact_hits"/"exact_ap10"}. index_cfg: the index settings (default IndexConfig()).
    """
    from mmft.index.faiss_backend import resolve_factory

    cfg = index_cfg or IndexConfig()
    factory = resolve_factory(cfg.factory, len(gallery), cfg.fp16)
    keep = M.relevant_counts(q_labels, g_labels) > 0
    queries, q_labels = queries[keep], q_labels[keep]
    k = max(max(ks), M.AP_DEPTH)
    exact_cfg = dataclasses.replace(cfg, factory="Flat", fp16=False)
    exact = M.search_metrics(_search_rows(gallery, queries, k, exact_cfg), q_labels, g_labels, ks)
    rank = exact["first"] + 1  # exact search: position of the first relevant item
    miss = np.flatnonzero(exact["first"] < 0)
    if len(miss):  # beyond the top k: count the items scoring higher (O(block) memory)
        rank[miss] = M.exact_first_ranks(queries[miss], gallery, q_labels[miss], g_labels)
    out = {"hits": exact["hits"], "ap10": exact["ap10"], "rank": rank, "gallery": len(gallery),
           "labels": q_labels, "factory": factory}
    tuned = bool(cfg.target_recall) and cfg.factory != "Flat"  # the tuner picks it (mmft.index.tuning)
    if factory != "Flat" or tuned:
        from mmft.index.core import build_index

        # (an untuned factory already says fp16; the tuner applies index.fp16 itself)
        approx_cfg = cfg if tuned else dataclasses.replace(cfg, factory=factory, fp16=False)
        index = build_index(gallery, index_cfg=approx_cfg)
        approx = M.search_metrics(index.search_rows(queries, k)[1], q_labels, g_labels, ks)
        out.update(hits=approx["hits"], ap10=approx["ap10"], exact_hits=exact["hits"],
                   exact_ap10=exact["ap10"], factory=index.manifest["factory"])
    return out


def retrieval_results(emb, ks: list[int], index_cfg: IndexConfig | None = None,
                      relevance: str = "auto") -> dict:
    """{"t2i": ..., "i2t": ...} per-query results (see `direction_results`) of an Embeddings set."""
    if relevance == "auto":
        grouped = emb.groups is not None and all(g is not None for g in emb.groups)
        relevance = "group" if grouped else "instance"
    labels = M.relevance_labels(emb.caption_image, len(emb.keys), emb.groups, relevance)
    image, text = np.asarray(emb.image, np.float32), np.asarray(emb.text, np.float32)
    out = {"t2i": direction_results(text, image, *labels["t2i"], ks, index_cfg),
           "i2t": direction_results(image, text, *labels["i2t"], ks, index_cfg)}
    out["relevance"] = relevance
    if relevance == "group":
        out["group_names"] = M.group_codes(emb.groups)[0]  # the names of the label ids relevance_labels gave
    return out


def per_group_recall(res: dict, k: int = 1) -> dict[str, dict] | None:
    """Image->text R@k per group (with class captions: per-class accuracy), or None when there are no
    groups or more than MAX_GROUPS_SHOWN of them (near-duplicate groups are not classes)."""
    names = res.get("group_names")
    if not names or len(names) > MAX_GROUPS_SHOWN:
        return None
    d = res["i2t"]
    hits, labels = d["hits"][k], d["labels"]
    return {name: {"queries": int((labels == i).sum()), f"R@{k}": 100.0 * float(hits[labels == i].mean())}
            for i, name in enumerate(names) if (labels == i).any()}


def metric_vectors(res: dict, exact: bool = False) -> dict[str, np.ndarray]:
    """Per-query values in points (0-100) of one direction: R@k and mAP@10 (exact: of the exact search)."""
    exact = exact and "exact_hits" in res  # an exact factory has one set of results
    hits, ap = (res["exact_hits"], res["exact_ap10"]) if exact else (res["hits"], res["ap10"])
    out = {f"R@{k}": 100.0 * h.astype(np.float64) for k, h in hits.items()}
    out["mAP@10"] = 100.0 * ap
    return out


def summarize_rows(results: dict[str, dict], n_boot: int, seed: int = 0) -> tuple[dict, dict]:
    """Rows {name: direction results} of one set -> (metrics with CIs per row, deltas vs the first row).

    Every row and metric of a direction shares the bootstrap resamples, so deltas are paired.
    """
    names = list(results)
    table: dict = {n: {} for n in names}
    deltas: dict = {n: {} for n in names[1:]}
    for d in DIRECTIONS:
        vecs = {n: metric_vectors(results[n][d]) for n in names}
        mnames = list(vecs[names[0]])
        stack = np.stack([vecs[n][m] for n in names for m in mnames])  # (rows * metrics, Q)
        boot = M.bootstrap_means(stack, n_boot, seed).reshape(n_boot, len(names), len(mnames))
        for i, n in enumerate(names):
            rank = results[n][d]["rank"]
            table[n][d] = {m: {"value": float(stack[i * len(mnames) + j].mean()),
                               "ci": list(M.percentile_ci(boot[:, i, j]))} for j, m in enumerate(mnames)}
            table[n][d].update(mean_rank=float(rank.mean()), median_rank=float(np.median(rank)),
                               queries=len(rank), gallery=int(results[n][d]["gallery"]))
            if i:
                deltas[n][d] = {m: {"value": table[n][d][m]["value"] - table[names[0]][d][m]["value"],
                                    "ci": list(M.percentile_ci(boot[:, i, j] - boot[:, 0, j]))}
                                for j, m in enumerate(mnames)}
    return table, deltas


def approximate_loss(res: dict) -> dict:
    """Exact minus approximate R@k / mAP@10 (points) per direction, for an approximate factory.

    A direction whose gallery got an exact index (below the approximate size) loses nothing."""
    out = {}
    for d in DIRECTIONS:
        ex, ap = metric_vectors(res[d], exact=True), metric_vectors(res[d])
        out[d] = {m: {"exact": float(ex[m].mean()), "approximate": float(ap[m].mean()),
                      "loss": float(ex[m].mean() - ap[m].mean())} for m in ex}
    return out


# ---------------------------------------------------------------- embedding rows


class _Embedder:
    """Embeds each named set once per (model, LoRA scale), restoring every model's scale afterwards."""

    def __init__(self, sets: dict, data_cfg, batch_size: int, progress: bool):
        self.sets, self.data_cfg, self.batch_size, self.progress = sets, data_cfg, batch_size, progress
        self.cache: dict = {}
        for name, src in sets.items():
            if not isinstance(src, (list, tuple, str, Path)) and not callable(src) and iter(src) is src:
                raise ValueError(f"eval set '{name}' is a one-shot iterator; pass shard specs, a list of "
                                 "batches or a zero-argument callable, since each row embeds it again")

    def __call__(self, set_name: str, model, tokenizer, preprocess, scale: float | None):
        from mmft.embeddings import embed
        from mmft.model.lora import lora_scale

        key = (set_name, id(model), scale)
        if key not in self.cache:
            with lora_scale(model, scale):
                self.cache[key] = embed(model, self.sets[set_name], tokenizer=tokenizer,
                                        preprocess=preprocess, data_cfg=self.data_cfg,
                                        batch_size=self.batch_size, progress=self.progress)
        return self.cache[key]


def _default_rows(model) -> list[EvalRow]:
    from mmft.model.lora import has_adapter

    if not has_adapter(model):
        return [EvalRow("model")]
    return [EvalRow("baseline", 0.0), EvalRow("tuned", 1.0)]


def _means(res: dict) -> dict:
    return {d: {m: float(v.mean()) for m, v in metric_vectors(res[d]).items()} for d in DIRECTIONS}


def recommend_scale(points: list[dict], max_general_drop: float) -> tuple[float, str]:
    """Mark each sweep point allowed or not and return (recommended scale, rule in words).

    points: [{"lora_scale", "domain": {dir: {metric: value}}, "general"?: ...}], the first at scale 0.
    Score = mean of SWEEP_SCORE on the domain set; a point is allowed when GENERAL SWEEP_GUARD drops at
    most `max_general_drop` points in each direction vs scale 0. Ties go to the smaller scale.
    """
    base = points[0]
    for p in points:
        p["score"] = float(np.mean([p["domain"][d][m] for d, m in SWEEP_SCORE]))
        p["general_drop"] = (max(base["general"][d][SWEEP_GUARD] - p["general"][d][SWEEP_GUARD]
                                 for d in DIRECTIONS) if p.get("general") else None)
        p["allowed"] = p["general_drop"] is None or p["general_drop"] <= max_general_drop + 1e-9
    best = max((p for p in points if p["allowed"]), key=lambda p: (p["score"], -p["lora_scale"]))
    rule = (f"highest domain mean of R@1/R@5 (both directions) whose GENERAL {SWEEP_GUARD} drops at most "
            f"{max_general_drop:g} points in each direction vs scale 0")
    if not points[0].get("general"):
        rule += "; no general set, so no forgetting guard"
    return best["lora_scale"], rule


def _relevance_for(relevance: str | dict, set_name: str) -> str:
    """A per-set relevance ({"domain": "group"}; missing sets are "auto") or one for all sets."""
    return relevance.get(set_name, "auto") if isinstance(relevance, dict) else relevance


def lora_sweep(model, tokenizer, preprocess, embedder: _Embedder, cfg: EvalConfig,
               relevance: str | dict) -> dict:
    """Domain and general recall at each LoRA scale (plus 0), and the recommended scale."""
    points, ks = [], sorted(set(cfg.ks) | {1, 5})  # the score and guard need R@1 and R@5
    for a in sorted(set(cfg.lora_scales) | {0.0}):
        point: dict = {"lora_scale": a}
        for set_name in [s for s in ("domain", "general") if s in embedder.sets]:
            emb = embedder(set_name, model, tokenizer, preprocess, a)
            point[set_name] = _means(retrieval_results(emb, ks, EXACT, _relevance_for(relevance, set_name)))
        points.append(point)
    best, rule = recommend_scale(points, cfg.max_general_drop)
    return {"points": points, "recommended_lora_scale": best, "rule": rule}


def recommended_rows(rows: list[EvalRow], scale: float) -> list[EvalRow]:
    """The row at the recommended LoRA scale, unless a row of the evaluated model already has that scale."""
    if any(r.model is None and r.lora_scale is not None and abs(r.lora_scale - scale) < 1e-9 for r in rows):
        return []
    return [EvalRow(f"tuned @ scale {scale:g}", scale)]


def _set_info(emb, res: dict) -> dict:
    return {"images": len(emb.keys), "captions": len(emb.captions), "relevance": res["relevance"]}


def evaluate(model, sets: dict[str, Any], *, tokenizer=None, preprocess=None,
             eval_cfg: EvalConfig | None = None, index_cfg: IndexConfig | None = None, data_cfg=None,
             rows: list[EvalRow] | None = None, sweep: bool | None = None,
             relevance: str | dict = "auto", out_dir: str | Path | None = None, seed: int = 0,
             progress: bool = True, info: dict | None = None) -> dict:
    """Score named rows (default: baseline at LoRA scale 0 and tuned at 1) on named sets -> report dict.

    sets: {name: shard specs | list of batches | zero-arg callable}; "domain" is the set the sweep
    maximises and "general" the set whose R@5 may drop at most eval_cfg.max_general_drop points.
    rows: EvalRow(name, lora_scale, model=None -> `model`); deltas are each row minus the first.
    sweep: run the LoRA-scale sweep over eval_cfg.lora_scales (default: when `model` has an adapter);
    the model at the recommended scale then gets its own row ("tuned @ scale a") unless a row has that scale.
    relevance: "auto" (group when every image has a group id, else instance), "instance", "group",
    or a dict per set name. index_cfg: the index settings searches use (default IndexConfig(): exact
    below 250,000 vectors); an approximate index adds a table of the recall it loses. With out_dir,
    writes report.json, report.md and PNG plots there
    (mmft.evaluation.report); `info` is added to the report as is.
    """
    from mmft import __version__
    from mmft.embeddings import model_fingerprint
    from mmft.model.lora import has_adapter

    cfg, icfg = eval_cfg or EvalConfig(), index_cfg or IndexConfig()
    if not sets:
        raise ValueError("evaluate needs at least one named set, "
                         "e.g. {'domain': ['test-{00000..00003}.tar']}")
    start = time.time()
    rows = rows or _default_rows(model)
    if len({r.name for r in rows}) != len(rows):
        raise ValueError(f"row names must be unique, got {[r.name for r in rows]}")
    do_sweep = sweep if sweep is not None else has_adapter(model)
    if do_sweep and "domain" not in sets:
        raise ValueError("the LoRA-scale sweep needs a set named 'domain'; name one so or pass sweep=False")
    embedder = _Embedder(sets, data_cfg, cfg.batch_size, progress)
    sweep_report = lora_sweep(model, tokenizer, preprocess, embedder, cfg, relevance) if do_sweep else None
    if sweep_report is not None:
        rows = rows + recommended_rows(rows, sweep_report["recommended_lora_scale"])
    report: dict = {"mmft_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    **(info or {}),
                    "config": {"ks": list(cfg.ks), "bootstrap": cfg.bootstrap, "factory": None,
                               "index": dataclasses.asdict(icfg),
                               "seed": seed, "ci_level": 0.95, "relevance": relevance,
                               "lora_scales": list(cfg.lora_scales),
                               "max_general_drop": cfg.max_general_drop},
                    "model": model_fingerprint(model), "rows": [r.name for r in rows], "sets": {},
                    "metrics": {}, "deltas": {}, "approximate": {}, "per_group": {}}
    factories: set[str] = set()  # what the searches used: the factory depends on the gallery size
    for set_name in sets:
        results = {}
        for row in rows:
            m = row.model if row.model is not None else model
            emb = embedder(set_name, m, row.tokenizer or tokenizer, row.preprocess or preprocess,
                           row.lora_scale)
            res = retrieval_results(emb, cfg.ks, icfg, _relevance_for(relevance, set_name))
            results[row.name] = res
            factories.update(res[d]["factory"] for d in DIRECTIONS)
            groups = per_group_recall(res)
            if groups is not None:
                report["per_group"].setdefault(set_name, {})[row.name] = groups
            if any("exact_hits" in res[d] for d in DIRECTIONS):
                report["approximate"].setdefault(set_name, {})[row.name] = approximate_loss(res)
        report["sets"][set_name] = _set_info(emb, results[rows[-1].name])
        report["metrics"][set_name], report["deltas"][set_name] = summarize_rows(results, cfg.bootstrap, seed)
    report["config"]["factory"] = ", ".join(sorted(factories))
    report["sweep"] = sweep_report
    report["seconds"] = round(time.time() - start, 2)
    if out_dir is not None:
        from mmft.evaluation.report import write_report

        write_report(report, out_dir)
    return report


def _run_row(name: str, loaded) -> EvalRow:
    """A report row scoring another loaded run (model, preprocess, tokenizer) as it is."""
    return EvalRow(name, None, model=loaded.model, tokenizer=loaded.tokenizer, preprocess=loaded.preprocess)


def _run_data_config(run_dir: Path):
    """The data section of the run's saved config (caption/group fields), or the defaults."""
    from mmft.config import ConfigError, DataConfig
    from mmft.rundir import RunDir

    run = RunDir(run_dir)
    if run.config_path.is_file():
        try:
            return run.config().data
        except ConfigError:  # an older or foreign config: fall back to the defaults
            pass
    return DataConfig()


def evaluate_run(run_dir: str | Path, eval_cfg: EvalConfig | None = None,
                 out_dir: str | Path | None = None, *,
                 index_cfg: IndexConfig | None = None, data_cfg=None, relevance: str | dict = "auto",
                 seed: int = 0, progress: bool = True, against: dict[str, str | Path] | None = None,
                 last: bool = False) -> dict:
    """`mmft eval`: load base + adapter from `run_dir`, evaluate on eval_cfg.domain / .general, write the
    report.

    out_dir defaults to run_dir/eval; data_cfg (caption/group fields) defaults to the run's saved config;
    index_cfg: the settings of the index searches go through (see `evaluate`).
    against: {row name: run directory} of other runs on the same base (say a head-only run); they come
    first, so every delta is paired against the first of them. last: also a row for the run's last
    step beside the kept (best) one.
    """
    from mmft.model.adapter import load_model
    from mmft.rundir import RunDir

    cfg = eval_cfg or EvalConfig()
    if not cfg.domain:
        raise ValueError("eval.domain lists no shards: set it to your domain's test shards, e.g. "
                         "eval.domain=[data/mydomain/test-{00000..00001}.tar]")
    run_dir = Path(run_dir)
    model, preprocess, tokenizer = load_model(run_dir)
    sets = {"domain": list(cfg.domain), **({"general": list(cfg.general)} if cfg.general else {})}
    rows = None
    if against or last:
        rows = [_run_row(name, load_model(Path(other))) for name, other in (against or {}).items()]
        rows += _default_rows(model)
        if last:
            rows.append(_run_row("last step", load_model(run_dir, adapter="last")))
    report = evaluate(model, sets, tokenizer=tokenizer, preprocess=preprocess, eval_cfg=cfg,
                      index_cfg=index_cfg, rows=rows,
                      data_cfg=data_cfg or _run_data_config(run_dir), relevance=relevance,
                      out_dir=Path(out_dir) if out_dir is not None else RunDir(run_dir).eval_dir, seed=seed,
                      progress=progress, info={"run_dir": str(run_dir)})
    return report
