"""`mmft export --format onnx`: write a deployment bundle from a run directory (or a model).

    export_bundle("runs/demo/domain-lora", "runs/demo/bundle", quantize="int8",
                  index_dir="runs/demo/index", eval_cfg=load_config("...domain_lora.yaml").eval)

The bundle is assembled in a hidden folder beside `out_dir` and renamed into place at the end, with
manifest.json written last, so an interrupted export never leaves a folder that loads. Steps: merge the
adapter at the LoRA scale into a copy of the model -> ONNX towers (checked) -> tokenizer.json and
preprocess.json -> a parity check of the ONNX encoders against torch -> int8 encoders (optional) -> the
index and its thumbnails (optional; refused when built by another model or scale) -> the card's
measurements (optional) -> README.md -> manifest.json.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmft.bundle.manifest import BUNDLE_FORMAT, CARD_FILE, file_table, write_manifest
from mmft.bundle.preprocess import PREPROCESS_FILE, preprocess_batch, preprocess_config
from mmft.io import write_json

log = logging.getLogger("mmft.bundle")
INDEX_DIR = "index"
PARITY_MIN_COSINE = 0.999  # below this the export is refused: the graphs do not compute the model
SMOKE_TEXTS = ["a photo of a dog", "A RED apple on a wooden table, seen from above", "x",
               "two cats & a dog playing in the snow while a child watches from the window"]


def gallery_images(specs, n: int) -> list:
    """The first `n` decodable images (RGB PIL) of shard specs: the calibration sample."""
    from mmft.data.epochs import expand_specs
    from mmft.data.stages import SkipSample, SkipStats, decode_image, read_shards

    out = []
    for sample in read_shards(expand_specs([str(s) for s in specs]), SkipStats()):
        try:
            out.append(decode_image(sample, draft_size=512))
        except SkipSample:
            continue
        if len(out) >= n:
            break
    return out


def _fingerprint(model, lora_scale: float) -> dict:
    from mmft.embeddings import model_fingerprint
    from mmft.model.lora import has_adapter
    from mmft.model.lora import lora_scale as scaled

    with scaled(model, lora_scale if has_adapter(model) else None):
        return model_fingerprint(model)


def _open(bundle_dir: Path, meta: dict, precision: str, threads: int | None = None):
    """A Bundle over the folder being written (it has no manifest yet)."""
    from mmft.bundle.runtime import Bundle

    return Bundle(bundle_dir, meta, precision, threads)


def _check_parity(bundle_dir: Path, meta: dict, merged, tokenizer, preprocess, images: list) -> dict:
    """ONNX fp32 vs the merged torch model on a few texts and images; refuse below PARITY_MIN_COSINE."""
    import torch

    b = _open(bundle_dir, meta, "fp32")
    with torch.no_grad():
        t_ref = merged.encode_text(tokenizer(SMOKE_TEXTS), normalize=True).numpy()  # (T, D)
        px = torch.stack([preprocess(im) for im in images])  # (I, 3, H, W)
        i_ref = merged.encode_image(px, normalize=True).numpy()  # (I, D)
    cos_t = np.sum(t_ref * b.encode_text(SMOKE_TEXTS), axis=1)
    cos_i = np.sum(i_ref * b.encode_image(images), axis=1)
    worst = float(min(cos_t.min(), cos_i.min()))
    if worst < PARITY_MIN_COSINE:
        raise RuntimeError(f"the ONNX encoders disagree with the torch model (row cosine {worst:.5f} < "
                           f"{PARITY_MIN_COSINE}); the export is refused: please report it with the model "
                           "config")
    return {"texts": len(SMOKE_TEXTS), "images": len(images), "min_cosine": worst}


def _copy_index(index_dir: Path, dest: Path, fingerprint: dict) -> dict:
    """Copy an index folder (thumbnails included) into the bundle after checking it fits the encoders."""
    from mmft.index.manifest import check_fingerprint, read_manifest
    from mmft.index.thumbnails import THUMBS_JSON

    manifest = read_manifest(index_dir)
    check_fingerprint(manifest, fingerprint, str(index_dir))
    shutil.copytree(index_dir, dest, ignore=shutil.ignore_patterns(".*", "embeddings"))
    return {"vectors": manifest.get("count"), "dim": manifest.get("dim"), "factory": manifest.get("factory"),
            "thumbnails": (dest / THUMBS_JSON).is_file()}


def _smoke_images(preprocess_cfg: dict, calibration: list) -> list:
    if calibration:
        return calibration[:4]
    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = preprocess_cfg["size"]
    return [Image.fromarray(rng.integers(0, 256, (h + 17 * i, w + 9 * i, 3), dtype=np.uint8))
            for i in range(3)]


QUANTIZE = {"int8": ("text", "image"), "int8-text": ("text",)}  # --quantize value -> towers made int8


def _quantize(tmp: Path, files: dict, towers: tuple[str, ...], calibration: list, pre_cfg: dict) -> dict:
    """int8 encoders of `towers` (the others stay fp32 in the int8 set); what the manifest records."""
    from mmft.bundle.quantize import IMAGE_INT8, TEXT_INT8, quantize_image, quantize_text

    out = {"files": dict(files), "text": None, "image": None}
    if "text" in towers:
        out["text"] = quantize_text(tmp / files["text"], tmp / TEXT_INT8)
        out["files"]["text"] = TEXT_INT8
    if "image" in towers:
        if not calibration:
            raise ValueError("--quantize int8 calibrates the image tower on gallery images: pass --index "
                             "(its gallery shards) or --calibration SHARDS, or use int8-text")
        pixels = preprocess_batch(calibration, pre_cfg)  # (N, 3, H, W)
        out["image"] = quantize_image(tmp / files["image"], tmp / IMAGE_INT8, pixels)
        out["files"]["image"] = IMAGE_INT8
    return out


@dataclass
class _Export:
    """One export in progress: the model, the hidden folder being filled and the manifest facts so far."""

    model: object
    tokenizer: object
    preprocess: object
    tmp: Path
    scale: float | None
    pre_cfg: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    calibration: list = field(default_factory=list)

    def open(self, precision: str, threads: int | None = None):
        return _open(self.tmp, self.meta, precision, threads)


def _scale(model, lora_scale: float | None, index_dir) -> float | None:
    """The LoRA scale to merge: given, else the index's (with an index), else 1.0; None without an adapter."""
    from mmft.model.lora import has_adapter

    if not has_adapter(model):
        if lora_scale not in (None, 1.0):
            raise ValueError(f"--lora-scale {lora_scale} needs a model with an adapter; this one has none")
        return None
    if lora_scale is None and index_dir is not None:
        lora_scale = _index_scale(Path(index_dir))
    return float(lora_scale if lora_scale is not None else 1.0)


def _export_encoders(job: _Export, opset: int, normalize: bool) -> None:
    """preprocess.json, tokenizer.json, both ONNX towers and the manifest's facts about them."""
    from mmft import __version__
    from mmft.bundle.onnx_export import export_towers, merged_copy
    from mmft.bundle.tokenizer import save_tokenizer
    from mmft.model.factory import model_identity

    job.pre_cfg = preprocess_config(dict(getattr(job.model.visual, "preprocess_cfg", {})))
    write_json(job.tmp / PREPROCESS_FILE, job.pre_cfg)
    tok = save_tokenizer(job.tokenizer, job.tmp)
    merged = merged_copy(job.model, job.scale)
    enc = export_towers(merged, job.tmp, image_size=tuple(job.pre_cfg["size"]),
                        context_length=tok["context_length"], opset=opset, normalize=normalize)
    enc["files"] = {"fp32": {"image": enc["image"]["file"], "text": enc["text"]["file"]}}
    enc["default_precision"] = "fp32"
    from mmft.model.lora import has_adapter

    adapted = has_adapter(job.model)
    job.meta = {"format": BUNDLE_FORMAT, "mmft_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "base_model": model_identity(job.model),
                "adapter_sha256": _adapter_digest(job.model) if adapted else None,
                "lora_scale": job.scale,
                "fingerprint": _fingerprint(job.model, job.scale), "encoders": enc, "tokenizer": tok,
                "preprocess_file": PREPROCESS_FILE, "index": None, "quantization": None}
    job.meta["parity_check"] = _check_parity(job.tmp, job.meta, merged, job.tokenizer, job.preprocess,
                                             _smoke_images(job.pre_cfg, job.calibration))


def _add_int8(job: _Export, towers: tuple[str, ...]) -> None:
    q = _quantize(job.tmp, job.meta["encoders"]["files"]["fp32"], towers, job.calibration, job.pre_cfg)
    job.meta["encoders"]["files"]["int8"] = q.pop("files")
    job.meta["encoders"]["default_precision"] = "int8"
    job.meta["quantization"] = q


def _measure(job: _Export, eval_sets: dict, eval_cfg, data_cfg, progress: bool) -> tuple[dict, dict]:
    """The card's evaluation, ONNX parity and (with int8 encoders) the recall and speed int8 costs."""
    from mmft.bundle.measure import onnx_comparison, quick_speed, torch_evaluation
    from mmft.config import EvalConfig

    cfg = eval_cfg or EvalConfig()
    evaluation = torch_evaluation(job.model, job.tokenizer, job.preprocess, eval_sets, job.scale, cfg,
                                  data_cfg, progress)
    bundles = {p: job.open(p) for p in job.meta["encoders"]["files"]}
    parity, cost = onnx_comparison(job.model, job.scale, bundles, eval_sets, cfg, data_cfg, job.tokenizer,
                                   job.preprocess, progress)
    job.meta["parity"] = parity
    job.meta["evaluation"] = _evaluation_summary(evaluation["report"])
    q = job.meta["quantization"]
    if q is not None:
        q["recall_cost"] = {set_name: c["int8"] for set_name, c in (cost or {}).items()} or None
        threads = os.cpu_count()
        q["speed"] = quick_speed(job.open("fp32", threads), job.open("int8", threads),
                                 preprocess_batch(job.calibration[:8], job.pre_cfg), SMOKE_TEXTS)
    return evaluation, parity


def write_bundle(model, tokenizer, preprocess, out_dir: str | Path, *, lora_scale: float | None = None,
                 quantize: str | None = None, index_dir: str | Path | None = None,
                 eval_sets: dict | None = None, eval_cfg=None, data_cfg=None, calibration_specs=None,
                 calibration_images: int = 64, normalize: bool = True, opset: int = 17, run_dir=None,
                 progress: bool = True) -> Path:
    """Write a bundle for `model` (+ its tokenizer and preprocess_val) to out_dir; see the module docstring.

    lora_scale: the fine-tuning delta merged in (default: the index's scale with index_dir, else 1.0).
    quantize: None, "int8" (both towers) or "int8-text" (the text tower only; the image tower stays fp32).
    eval_sets: {"domain": specs, "general": specs} measured into the card (with eval_cfg, data_cfg).
    calibration_specs: shards the image tower's int8 ranges are calibrated on (default: the index gallery).
    """
    from mmft.bundle.card import training_data, write_card

    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"--quantize {quantize!r} is not supported; use {' or '.join(QUANTIZE)} or leave it "
                         "out")
    scale = _scale(model, lora_scale, index_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))  # renamed into place last
    job = _Export(model, tokenizer, preprocess, tmp, scale)
    try:
        job.calibration = _calibration(calibration_specs, index_dir, calibration_images)
        _export_encoders(job, opset, normalize)
        if quantize is not None:
            _add_int8(job, QUANTIZE[quantize])
        if index_dir is not None:
            job.meta["index_summary"] = _copy_index(Path(index_dir), job.tmp / INDEX_DIR,
                                                    job.meta["fingerprint"])
            job.meta["index"] = INDEX_DIR
        evaluation = parity = None
        if eval_sets:
            evaluation, parity = _measure(job, eval_sets, eval_cfg, data_cfg, progress)
        write_card(job.tmp / CARD_FILE, {**job.meta, "files": file_table(job.tmp)}, job.pre_cfg,
                   training=training_data(run_dir), evaluation=evaluation, parity=parity)
        write_manifest(job.tmp, job.meta)
        _replace(job.tmp, out_dir)
    except BaseException:
        shutil.rmtree(job.tmp, ignore_errors=True)
        raise
    log.info("bundle written: %s", out_dir)
    return out_dir


def _calibration(specs, index_dir, n: int) -> list:
    """Calibration images: from `specs`, else from the shards the index was built from; [] without either."""
    if specs is None and index_dir is not None:
        from mmft.index.manifest import read_manifest

        specs = (read_manifest(Path(index_dir)).get("source") or {}).get("shards")
    return gallery_images(specs, n) if specs else []


def _index_scale(index_dir: Path) -> float:
    """The LoRA scale an index was embedded at (0 when it records no adapter: the base)."""
    from mmft.index.manifest import read_manifest

    m = read_manifest(index_dir)
    return float(m["lora_scale"]) if m.get("adapter_sha256") and m.get("lora_scale") is not None else 0.0


def _adapter_digest(model) -> str | None:
    from mmft.model.adapter import adapter_digest

    return adapter_digest(model)


def _evaluation_summary(report: dict) -> dict:
    """The headline numbers of the card's evaluation, for the manifest (the card has the full tables)."""
    sweep = report.get("sweep") or {}
    out = {"recommended_lora_scale": sweep.get("recommended_lora_scale"), "sets": {}}
    for set_name, rows in report["metrics"].items():
        out["sets"][set_name] = {row: {d: {m: v[m]["value"] for m in ("R@1", "R@5")} for d, v in dirs.items()
                                       if d in ("t2i", "i2t")} for row, dirs in rows.items()}
    return out


def _replace(tmp: Path, out_dir: Path) -> None:
    """Move the finished bundle into place; an older bundle there is removed first (manifest first)."""
    if out_dir.exists():
        if not (out_dir / "manifest.json").is_file() and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists and is not an mmft bundle; choose another --out or "
                                  "remove it")
        (out_dir / "manifest.json").unlink(missing_ok=True)
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def export_bundle(run_dir: str | Path, out_dir: str | Path, *, adapter: str = "best", **kwargs) -> Path:
    """`mmft export --format onnx`: base + adapter from a run directory written as a bundle (write_bundle).

    The evaluation sets come from kwargs["eval_cfg"] (its domain / general shard specs) when given.
    """
    from mmft.model.adapter import load_model
    from mmft.rundir import RunDir

    loaded = load_model(run_dir, adapter=adapter)
    eval_cfg = kwargs.get("eval_cfg")
    if eval_cfg is not None and kwargs.get("eval_sets") is None and eval_cfg.domain:
        kwargs["eval_sets"] = {"domain": list(eval_cfg.domain),
                               **({"general": list(eval_cfg.general)} if eval_cfg.general else {})}
    if kwargs.get("data_cfg") is None:
        kwargs["data_cfg"] = RunDir(run_dir).config().data
    return write_bundle(loaded.model, loaded.tokenizer, loaded.preprocess, out_dir, run_dir=run_dir, **kwargs)
