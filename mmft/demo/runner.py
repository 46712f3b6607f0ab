"""`mmft demo`: the offline end-to-end run, a thin script over the ordinary configs and API.

1. build the demo shards (openclipart GENERAL and DOMAIN splits);
2. align mmft-mini on GENERAL train, towers frozen (mmft/demo/configs/align.yaml) and export it: the
   frozen baseline;
3. head-only tuning on DOMAIN train with GENERAL replay (mmft/demo/configs/domain_head.yaml): the row
   users compare adapters with;
4. LoRA on both towers on DOMAIN train + GENERAL replay, from the head-only heads
   (mmft/demo/configs/domain_lora.yaml);
5. FAISS indexes of the DOMAIN test gallery with the tuned model and with the frozen base (thumbnails
   beside them), what `mmft serve --config configs/serve.yaml` shows side by side;
6. baseline vs head-only vs tuned on DOMAIN test and GENERAL test, the LoRA-scale sweep and the tuned model
   at the recommended scale, report + plots.
Every stage writes a directory the next one reads, so a re-run skips what is already complete.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from mmft.config import Config, load_config
from mmft.rundir import RunDir

log = logging.getLogger("mmft.demo.runner")
DATA_PREFIX, RUNS_PREFIX = "data/demo", "runs/demo"
QUICK = ["model.image_size=64", "train.epochs=2", "train.steps=0", "train.val_every=0",
         "train.warmup_steps=1", "data.batch_size=16", "data.num_workers=0", "eval.bootstrap=100",
         "eval.lora_scales=[0.0, 0.5, 1.0]"]
QUICK_STAGE = {"domain_lora": ["data.epoch_samples=64"]}  # the replay mixture's declared epoch, cut to size


def default_configs_dir() -> Path:
    here = Path(__file__).resolve().parent / "configs"
    if not (here / "align.yaml").is_file():
        raise FileNotFoundError(f"the demo configs (align.yaml ...) are missing from {here}; reinstall mmft "
                                "or pass --configs")
    return here


def _relocate(value, data_dir: str, out_dir: str):
    """Rewrite the configs' default data/demo and runs/demo prefixes to the chosen folders."""
    if isinstance(value, str):
        if value.startswith(DATA_PREFIX):
            return data_dir + value[len(DATA_PREFIX):]
        if value.startswith(RUNS_PREFIX):
            return out_dir + value[len(RUNS_PREFIX):]
        return value
    if isinstance(value, list):
        return [_relocate(v, data_dir, out_dir) for v in value]
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            setattr(value, f.name, _relocate(getattr(value, f.name), data_dir, out_dir))
    return value


def stage_config(configs: Path, name: str, data_dir: str, out_dir: str, overrides: list[str],
                 quick: bool = False) -> Config:
    extra = (QUICK + QUICK_STAGE.get(name, []) if quick else []) + list(overrides)
    return _relocate(load_config(configs / f"{name}.yaml", extra), data_dir, out_dir)


def _say(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def _train_once(cfg: Config):
    from mmft.training.trainer import train

    run = RunDir(cfg.train.output_dir)
    if run.is_complete():
        print(f"{run.path} is complete; reusing it")
        return run.path
    return train(cfg)


def run_demo(out_dir: str = RUNS_PREFIX, data_dir: str = DATA_PREFIX, configs_dir: str | None = None,
             quick: bool = False, overrides: list[str] | None = None, svg_root: str | None = None,
             limit: int | None = None, bundle: bool = False) -> dict:
    """Run the whole demo; returns the evaluation report (also written to out_dir/report).

    bundle: end with a deployment bundle of the tuned model (int8 text tower, the index inside, the card
    measured on the test sets) in out_dir/bundle, and one of the frozen base in out_dir/bundle-base.
    """
    from mmft.demo.datasets import build_demo_data
    from mmft.evaluation.core import EvalRow, evaluate
    from mmft.evaluation.report import summary_table
    from mmft.index.core import build_index_from_run
    from mmft.model.adapter import export, load_model

    t0 = time.perf_counter()
    configs = Path(configs_dir) if configs_dir else default_configs_dir()
    extra = list(overrides or [])
    out_dir, data_dir = str(out_dir), str(data_dir)

    _say("1/6 demo data: openclipart rendered into GENERAL and DOMAIN shards")
    kw = {"svg_root": svg_root} if svg_root else {}
    build_demo_data(data_dir, which=("openclipart",), limit=limit, **kw)

    _say("2/6 align mmft-mini on GENERAL train (towers frozen, features cached): the frozen baseline")
    align = _train_once(stage_config(configs, "align", data_dir, out_dir, extra, quick))
    base_path = Path(out_dir) / "base" / "mmft-mini-aligned.pt"
    if not base_path.is_file():
        export(load_model(align).model, base_path)
    print(f"baseline model: {base_path}")

    _say("3/6 head-only tuning on DOMAIN train + GENERAL replay (projections + temperature)")
    head = _train_once(stage_config(configs, "domain_head", data_dir, out_dir, extra, quick))

    _say("4/6 LoRA on both towers on DOMAIN train + GENERAL replay, from the head-only heads")
    lora_cfg = stage_config(configs, "domain_lora", data_dir, out_dir, extra, quick)
    tuned_run = _train_once(lora_cfg)

    _say("5/6 FAISS index of the DOMAIN test gallery with the tuned model")
    index_dir = Path(out_dir) / "index"
    build_index_from_run(tuned_run, lora_cfg.eval.domain, index_dir, lora_cfg.index, data_cfg=lora_cfg.data)
    print(f"index: {index_dir}")
    # the same gallery embedded by the frozen base: what `mmft serve` shows beside the tuned answers
    build_index_from_run(tuned_run, lora_cfg.eval.domain, Path(out_dir) / "index-baseline",
                         dataclasses.replace(lora_cfg.index, lora_scale=0.0), data_cfg=lora_cfg.data)

    _say("6/6 evaluation: baseline vs head-only vs tuned, DOMAIN and GENERAL test, LoRA-scale sweep")
    tuned = load_model(tuned_run)
    head_model = load_model(head)
    last = load_model(tuned_run, adapter="last")  # what the adapters reached, whichever step validation kept
    rows = [EvalRow("baseline", 0.0), EvalRow("head-only", 1.0, model=head_model.model),
            EvalRow("LoRA last step", 1.0, model=last.model), EvalRow("tuned", 1.0)]
    sets = {"domain": lora_cfg.eval.domain, "general": lora_cfg.eval.general}
    report_dir = Path(out_dir) / "report"
    report = evaluate(tuned.model, sets, tokenizer=tuned.tokenizer, preprocess=tuned.preprocess,
                      eval_cfg=lora_cfg.eval, index_cfg=lora_cfg.index, data_cfg=lora_cfg.data, rows=rows,
                      out_dir=report_dir,
                      info={"runs": {"align": str(align), "head_only": str(head), "tuned": str(tuned_run)},
                            "demo_seconds": None})
    if bundle:
        _say("and: deployment bundles (ONNX encoders, int8 text tower, tokenizer, index, model card)")
        from mmft.bundle.writer import export_bundle

        out = export_bundle(tuned_run, Path(out_dir) / "bundle", quantize="int8-text", index_dir=index_dir,
                            eval_cfg=lora_cfg.eval, data_cfg=lora_cfg.data)
        export_bundle(tuned_run, Path(out_dir) / "bundle-base", index_dir=Path(out_dir) / "index-baseline")
        print(f"bundle: {out} (model card: {out / 'README.md'}); "
              f"frozen base: {Path(out_dir) / 'bundle-base'}")
    minutes = (time.perf_counter() - t0) / 60
    print("\n" + summary_table(report))
    print(f"\nreport: {report_dir / 'report.md'} (plots beside it); demo took {minutes:.1f} min")
    print(f"\nsearch the baseline and the tuned model side by side at http://127.0.0.1:8000/ with:\n"
          f"  {serve_command(out_dir)}")
    return report


def serve_command(out_dir: str) -> str:
    """The command serving this demo's baseline and tuned model (configs/serve.yaml names runs/demo)."""
    import os
    import shlex
    import sys

    exe = Path(sys.executable).parent / "mmft"
    rel = os.path.relpath(exe) if exe.is_file() else "mmft"
    cmd = f"{'mmft' if rel.startswith('..') else rel} serve --config configs/serve.yaml"
    if Path(out_dir) != Path(RUNS_PREFIX):
        paths = {"base.run": "domain-lora", "tenants.tuned.run": "domain-lora",
                 "tenants.tuned.index": "index", "baseline.index": "index-baseline",
                 "feedback.path": "feedback.jsonl"}
        cmd += "".join(" " + shlex.quote(f"{k}={Path(out_dir) / v}") for k, v in paths.items())
    return cmd
