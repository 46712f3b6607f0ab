"""The mmft command line: one subcommand per pipeline stage, each one library call.

    mmft train  --config mmft/demo/configs/domain_lora.yaml train.lr=1e-4
    mmft eval   --run runs/demo/domain-lora --config mmft/demo/configs/domain_lora.yaml
    mmft index  build --run RUN --shards 'data/test-{00000..00003}.tar' --out runs/index
    mmft index  query runs/index "a red apple" -k 5
    mmft export --run RUN --out exported/model.pt --lora-scale 0.5
    mmft export --format onnx --run RUN --out bundle/ --quantize int8 --index runs/index
    mmft mine   --run RUN --shards 'data/train-{00000..00003}.tar' --k 8 --out mined.jsonl
    mmft shards ...            (see mmft shards --help)
    mmft demo-data data/demo   (the offline demo datasets as shards)
    mmft demo                  (the offline end-to-end demo)
    mmft serve  --config configs/serve.yaml   (search service + page; see docs/serving.md)
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path


def _config(args):
    from mmft.config import load_config

    return load_config(getattr(args, "config", None), getattr(args, "overrides", []) or [])


def cmd_train(args) -> int:
    from mmft.distributed import init_from_env
    from mmft.training.trainer import train

    init_from_env()
    run = train(_config(args))
    print(f"run directory: {run}")
    return 0


def cmd_eval(args) -> int:
    from mmft.evaluation.core import evaluate_run
    from mmft.rundir import RunDir

    cfg = _config(args)
    against = {}
    for item in args.against or []:
        name, sep, run = item.partition("=")
        if not sep or not name or not run:
            raise SystemExit(f"--against takes NAME=RUN_DIR (e.g. head-only=runs/demo/domain-head), "
                             f"got {item!r}")
        against[name] = run
    report = evaluate_run(args.run, cfg.eval, args.out, index_cfg=cfg.index,
                          data_cfg=cfg.data if args.config else None, against=against, last=args.last)
    out = Path(args.out) if args.out else RunDir(args.run).eval_dir
    print((out / "report.md").read_text() if (out / "report.md").is_file() else json.dumps(report, indent=1))
    return 0


def cmd_index_build(args) -> int:
    from mmft.distributed import init_from_env
    from mmft.index.core import build_index_from_run
    from mmft.rundir import RunDir

    cfg = _config(args)
    if args.factory is not None:
        cfg.index.factory = args.factory
    if args.lora_scale is not None:
        cfg.index.lora_scale = args.lora_scale
    for key in ("target_recall", "max_memory", "max_latency_ms"):  # tuning (mmft.index.tuning)
        if getattr(args, key) is not None:
            setattr(cfg.index, key, getattr(args, key))
    if init_from_env():  # under torchrun: every rank embeds its share, rank 0 merges
        from mmft.index.distributed import build_index_distributed

        out = build_index_distributed(args.run, args.shards, args.out, cfg.index, data_cfg=cfg.data)
        print(f"index: {out}")
        return 0
    index = build_index_from_run(args.run, args.shards, args.out, cfg.index, data_cfg=cfg.data)
    print(f"index: {args.out or RunDir(args.run).index_dir} ({index})")
    if index.manifest.get("tuning"):
        print(index.manifest["tuning"]["note"])
    return 0


def cmd_index_info(args) -> int:
    from mmft.index.versions import index_info

    print(index_info(args.index))
    return 0


def cmd_index_add(args) -> int:
    from mmft.index.append import add_to_index

    cfg = _config(args)
    result = add_to_index(args.index, args.shards, model=args.run, data_cfg=cfg.data if args.config else None)
    print(result.note)
    return 0


def cmd_index_query(args) -> int:
    from mmft.index.core import query_index

    kind = "image" if args.image else "text"
    results = query_index(args.index, args.run, **{kind: args.query}, k=args.k, index_cfg=_config(args).index)
    for query, hits in zip(args.query, results):
        print(f"{query}")
        for h in hits:
            print(f"  {h['rank']:>3}  {h['score']:.4f}  {h['id']}")
    return 0


def cmd_index_merge(args) -> int:
    from mmft.index.distributed import merge_index_parts

    merge_index_parts(args.parts, args.out, _config(args).index)
    print(f"merged index: {args.out}")
    return 0


def cmd_embed(args) -> int:
    from mmft.distributed import init_from_env
    from mmft.index.distributed import embed_run

    cfg = _config(args)
    init_from_env()
    scale = cfg.index.lora_scale if args.lora_scale is None else args.lora_scale
    embed_run(args.run, args.shards, args.out, lora_scale=scale, data_cfg=cfg.data, fp16=cfg.index.fp16)
    return 0


def cmd_export(args) -> int:
    from mmft.model.adapter import export, load_model

    if args.format == "onnx":
        return _export_bundle(args)
    model = load_model(args.run, adapter=args.adapter).model
    scale = _config(args).index.lora_scale if args.lora_scale is None else args.lora_scale  # as the index
    path = export(model, args.out, lora_scale=scale)
    print(f"exported merged open_clip state dict: {path} (config: {path.with_suffix('.json')})")
    return 0


def _export_bundle(args) -> int:
    from mmft.bundle.writer import export_bundle
    from mmft.config import load_config

    scale = args.lora_scale
    if scale is None and not args.index:  # with --index the bundle takes the index's scale
        scale = _config(args).index.lora_scale
    eval_cfg = load_config(args.eval_config).eval if args.eval_config else None
    out = export_bundle(args.run, args.out, adapter=args.adapter, lora_scale=scale, quantize=args.quantize,
                        index_dir=args.index, eval_cfg=eval_cfg, calibration_specs=args.calibration)
    print(f"bundle: {out} (model card: {out / 'README.md'})")
    return 0


def cmd_shards(args) -> int:
    from mmft.data.shard_writer import ShardError, format_summary, make_shards

    skip = ("input", "out_dir", "quiet", "fn", "verbose", "command")
    opts = {k: v for k, v in vars(args).items() if k not in skip}  # the rest are make_shards options
    try:
        stats = make_shards(args.input, args.out_dir, progress=not args.quiet, **opts)
    except (ShardError, FileExistsError) as e:
        print(f"mmft shards: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(stats))
    print(f"wrote {stats['written']} samples to {stats['out_dir']} in {stats['seconds']:.1f} s")
    return 0


def cmd_demo_data(args) -> int:
    from mmft.demo.datasets import build_demo_data

    try:
        build_demo_data(args.out_dir, which=args.which, image_size=args.image_size, workers=args.workers,
                        limit=args.limit, overwrite=args.overwrite, progress=not args.quiet,
                        svg_root=args.svg_root)
    except (FileNotFoundError, FileExistsError, ModuleNotFoundError, ValueError) as e:
        print(f"mmft demo-data: error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_index_thumbnails(args) -> int:
    from mmft.index.thumbnails import add_thumbnails

    summary = add_thumbnails(args.index, args.shards, size=args.size)
    print(f"thumbnails: {summary['count'] - summary['missing']} of {summary['count']} images in {args.index}")
    return 0


def cmd_serve(args) -> int:
    if args.feedback_pairs:
        from mmft.serve.server import export_feedback

        stats = export_feedback(args.config, args.overrides, args.feedback_pairs)
        print(f"{stats['pairs']} pairs on {stats['images']} images in {stats['table']} "
              f"(skipped: {stats['skipped']}); next: mmft shards {stats['table']} OUT_DIR --group-col group")
        return 0
    from mmft.serve.server import serve

    return serve(args.config, args.overrides)


def cmd_demo(args) -> int:
    from mmft.demo.runner import run_demo

    run_demo(out_dir=args.out, data_dir=args.data, configs_dir=args.configs, quick=args.quick,
             overrides=args.overrides, bundle=args.bundle)
    return 0


SCALE_HELP = "scale of the fine-tuning delta (default: index.lora_scale, 1.0)"


def cmd_mine(args) -> int:
    from mmft.mining.core import mine

    cfg = _config(args)
    out = mine(args.run, args.shards, args.out, k=args.k, model_cfg=cfg.model, data_cfg=cfg.data,
               index_cfg=cfg.index, threshold=args.threshold, by=args.by)
    print(f"mined negatives: {out} (use with data.hard_negatives={out})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmft", description="Fine-tune CLIP-style dual encoders with LoRA and "
                                "ship FAISS search indexes.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, required=False):
        sp.add_argument("--config", required=required, help="YAML run config")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")

    sp = sub.add_parser("train", help="fine-tune (resumes from the newest checkpoint of the run directory)")
    with_config(sp, required=True)
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("eval", help="baseline vs tuned recall with CIs, LoRA-scale sweep, report.md + plots")
    sp.add_argument("--run", required=True, help="training run directory")
    sp.add_argument("--out", help="report directory (default RUN/eval)")
    sp.add_argument("--against", action="append", metavar="NAME=RUN",
                    help="another run on the same base, scored first: every delta is paired against it "
                         "(repeatable; e.g. head-only=runs/demo/domain-head)")
    sp.add_argument("--last", action="store_true", help="also score the run's last step beside the kept one")
    with_config(sp)
    sp.set_defaults(fn=cmd_eval)

    idx_parser = sub.add_parser("index", help="build, query or merge FAISS indexes")
    idx = idx_parser.add_subparsers(dest="action", required=True)
    sp = idx.add_parser("build", help="embed a gallery with a trained run and save a FAISS index")
    sp.add_argument("--run", required=True)
    sp.add_argument("--shards", required=True, nargs="+", help="gallery shard specs")
    sp.add_argument("--out", help="index directory (default RUN/index)")
    sp.add_argument("--factory", help="FAISS factory string (default: chosen from the gallery size)")
    sp.add_argument("--lora-scale", type=float, help=SCALE_HELP)
    sp.add_argument("--target-recall", type=float, help="tune: the fastest index whose recall@10 on held-out "
                    "queries meets this, e.g. 0.95 (docs/indexes.md)")
    sp.add_argument("--max-memory", help="with --target-recall: memory budget of the index, e.g. 2GB")
    sp.add_argument("--max-latency-ms", type=float, help="with --target-recall: budget per query (ms)")
    with_config(sp)
    sp.set_defaults(fn=cmd_index_build)
    sp = idx.add_parser("info", help="what an index holds, its versions and its measured recall curve")
    sp.add_argument("index", help="index directory")
    sp.set_defaults(fn=cmd_index_info)
    sp = idx.add_parser("add", help="append shards to an index (same model) as a new version")
    sp.add_argument("--index", required=True, help="index directory")
    sp.add_argument("--shards", required=True, nargs="+", help="shard specs of the new gallery items")
    sp.add_argument("--run", help="run directory of the model (default: the one recorded in the index)")
    with_config(sp)
    sp.set_defaults(fn=cmd_index_add)
    sp = idx.add_parser("query", help="top-k gallery ids for text (or image paths with --image)")
    sp.add_argument("index", help="index directory")
    sp.add_argument("query", nargs="+", help="query texts (or image paths with --image)")
    sp.add_argument("-k", type=int, default=5)
    sp.add_argument("--image", action="store_true", help="queries are image files")
    sp.add_argument("--run", help="run directory of the model (default: the one recorded in the index)")
    with_config(sp)
    sp.set_defaults(fn=cmd_index_query)
    sp = idx.add_parser("merge", help="merge per-rank index parts into one index")
    sp.add_argument("parts", nargs="+", help="part directories written by `mmft embed`")
    sp.add_argument("--out", required=True)
    with_config(sp)
    sp.set_defaults(fn=cmd_index_merge)
    sp = idx.add_parser("thumbnails", help="add the thumbnail store `mmft serve` shows to an existing index")
    sp.add_argument("index", help="index directory")
    sp.add_argument("--shards", nargs="+", help="gallery shards (default: those the manifest records)")
    sp.add_argument("--size", type=int, default=128, help="thumbnail side in pixels")
    sp.set_defaults(fn=cmd_index_thumbnails)

    sp = sub.add_parser("embed", help="embed a gallery into part files (one per rank under torchrun)")
    # --run-dir: torchrun's own parser would take a bare --run for its --run-path
    sp.add_argument("--run", "--run-dir", dest="run", required=True)
    sp.add_argument("--shards", required=True, nargs="+")
    sp.add_argument("--out", required=True)
    sp.add_argument("--lora-scale", type=float, help=SCALE_HELP)
    with_config(sp)
    sp.set_defaults(fn=cmd_embed)

    sp = sub.add_parser("export", help="merge the adapter into a plain open_clip state dict, or write an "
                        "ONNX deployment bundle (--format onnx)")
    sp.add_argument("--run", required=True)
    sp.add_argument("--out", required=True, help="output .pt path (torch) or bundle folder (onnx)")
    sp.add_argument("--adapter", default="best", help="best, last, or an adapter directory")
    sp.add_argument("--lora-scale", type=float, help=SCALE_HELP + "; onnx with --index: the index's scale")
    sp.add_argument("--format", choices=["torch", "onnx"], default="torch",
                    help="torch: merged state dict; onnx: bundle of ONNX encoders, tokenizer, card "
                         "(docs/export.md)")
    sp.add_argument("--quantize", choices=["int8", "int8-text"],
                    help="onnx: add int8 encoders, both towers or the text tower only "
                         "(and make them the default)")
    sp.add_argument("--index", help="onnx: copy this index folder (and its thumbnails) into the bundle")
    sp.add_argument("--eval-config",
                    help="onnx: a config whose eval section names the sets the card measures")
    sp.add_argument("--calibration", nargs="+", help="onnx --quantize: gallery shards for the image tower's "
                    "int8 ranges (default: the shards the --index was built from)")
    with_config(sp)
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("mine", help="hard negatives: the k most similar other images and captions per pair")
    sp.add_argument("--run", help="run directory whose model mines (default: the config's base model)")
    sp.add_argument("--shards", nargs="+", help="training shard specs (default: data.train of the config)")
    sp.add_argument("--k", type=int, default=8, help="negatives mined per pair and modality")
    sp.add_argument("--out", default="mined.jsonl", help="output file (for data.hard_negatives)")
    sp.add_argument("--threshold", type=float, default=0.95,
                    help="skip near-duplicates: same-modality cosine above this")
    sp.add_argument("--by", choices=["same", "cross"], default="same",
                    help="neighbours by the same modality (look-alikes) or across (retrieval confusions)")
    with_config(sp)
    sp.set_defaults(fn=cmd_mine)

    _shards_parser(sub.add_parser("shards", help="write WebDataset shards from folders, CSV/TSV/JSONL or "
                                  "class folders"))
    _demo_data_parser(sub.add_parser("demo-data", help="build the offline demo datasets (openclipart, "
                                     "textile) as shards"))

    sp = sub.add_parser("demo", help="offline end-to-end demo: data, align, fine-tune, index, report")
    sp.add_argument("--out", default="runs/demo", help="where runs, index and report go")
    sp.add_argument("--data", default="data/demo", help="where the demo shards go")
    sp.add_argument("--configs", default=None, help="config folder (default: the project's configs/)")
    sp.add_argument("--quick", action="store_true", help="tiny splits and few steps (a smoke test)")
    sp.add_argument("--bundle", action="store_true", help="end with ONNX deployment bundles (docs/export.md)")
    sp.add_argument("overrides", nargs="*", help="dotted overrides applied to every training stage")
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("serve", help="search service over built indexes: REST API, page, metrics")
    with_config(sp, required=True)
    sp.add_argument("--feedback-pairs", metavar="OUT_DIR",
                    help="instead of serving: turn the feedback file into a `mmft shards` table in OUT_DIR")
    sp.set_defaults(fn=cmd_serve)
    return p


def _shards_parser(sp) -> None:
    a = sp.add_argument
    a("input", help="folder of images with .txt/.json captions, a .csv/.tsv/.jsonl table, or class folders")
    a("out_dir", help="output folder for the .tar shards, sizes.json and stats.json")
    a("--type", dest="input_type", default="auto", choices=["auto", "folder", "table", "classes"])
    a("--image-col", default=None, help="table column with the image path (default: guessed)")
    a("--caption-col", dest="caption_cols", action="append", default=None,
      help="table caption column; repeat for several captions per image (default: guessed)")
    a("--group-col", default=None, help="table column with a group id")
    a("--template", dest="templates", action="append", default=None,
      help="class-folder caption template using {label}; repeat for several captions")
    a("--splits", default=None, help="e.g. train=0.8,val=0.1,test=0.1 (default: one unsplit set)")
    a("--split-by", default="sample", choices=["sample", "group", "stratified"])
    a("--seed", type=int, default=0)
    a("--per-shard", dest="samples_per_shard", type=int, default=1000)
    a("--max-side", type=int, default=None, help="downscale so the longer side is at most this (pixels)")
    a("--format", dest="image_format", default="auto", choices=["auto", "jpg", "png"])
    a("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    a("--no-verify", dest="verify", action="store_false", help="skip the full decode check")
    a("--no-dedup", dest="dedup", action="store_false", help="keep byte-identical duplicate images")
    a("--prefix", default="", help="shard name prefix (shards are <prefix>-<split>-00000.tar)")
    a("--overwrite", action="store_true", help="replace shards already in out_dir")
    a("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=cmd_shards)


def _demo_data_parser(sp) -> None:
    from mmft.demo.datasets import DEFAULT_SVG_ROOT, SOURCES

    sp.add_argument("out_dir", nargs="?", default="data/demo")
    sp.add_argument("--which", nargs="+", default=list(SOURCES), choices=SOURCES)
    sp.add_argument("--image-size", type=int, default=192, help="openclipart render size (pixels)")
    sp.add_argument("--workers", type=int, default=2, help="render processes")
    sp.add_argument("--limit", type=int, default=None, help="at most this many images per dataset/class")
    sp.add_argument("--svg-root", default=str(DEFAULT_SVG_ROOT))
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_demo_data)


# A dotted override (section.key=value) among positionals or list options such as --shards.
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def _split_overrides(args, extra: list[str] = ()) -> list[str]:
    """Move dotted overrides to args.overrides: those argparse gave to a list argument (--shards a.tar
    x.y=1) and those left over after options (merge P --out X x.y=1); return what is neither."""
    if not hasattr(args, "overrides"):
        return list(extra)
    found = [x for x in extra if _OVERRIDE.match(x)]
    for name in ("shards", "query", "parts"):
        items = getattr(args, name, None)
        if isinstance(items, list):
            setattr(args, name, [x for x in items if not _OVERRIDE.match(x)])
            found = [x for x in items if _OVERRIDE.match(x)] + found
    args.overrides = found + list(args.overrides or [])
    return [x for x in extra if not _OVERRIDE.match(x)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line parsed, every dotted override (wherever it stands) in args.overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = _split_overrides(args, extra)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Errors raised by mmft are sentences for people; show them without a traceback.
        if args.verbose:
            raise
        print(f"mmft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
