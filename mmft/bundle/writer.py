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
    from mmft.bundle.measure import at_scale
    from mmft.embeddings import model_fingerprint

    with at_scale(model, lora_scale):
        return model_fingerprint(model)


def _open(bundle_dir: Path, meta: dict, precision: str, threads: int | None = None):
    """A Bundle over the folder being written (it has no manifest yet)."""
    from mmft.bundle.runtime import Bundle

    return Bundle(bundle_dir, meta, precision, threads)


def _check_parity(bundle_dir: Path, meta: dict, merged, tokenizer, preprocess, images: list) -> dict:
    """ONNX fp32 vs the merged torch model on a few texts and images; refuse the export below PARITY_MIN_COSINE."""
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
                           f"{PARITY_MIN_COSINE}); the export is refused, please report it with the model config")
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
    return [Image.fromarray(rng.integers(0, 256, (h + 17 * i, w + 9 * i, 3), dtype=np.uint8)) for i in range(3)]


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
            raise ValueError("--quantize int8 calibrates the image tower on gallery images: pass --index (its "
                             "gallery shards) or --calibration SHARDS, or use int8-text")
        out["image"] = quantize_image(tmp / files["image"], tmp / IMAGE_INT8, preprocess_batch(calibration, pre_cfg))
        out["files"]["image"] = IMAGE_INT8
    return out


def write_bundle(model, tokenizer, preprocess, out_dir: str | Path, *, lora_scale: float | None = None,
                 quantize: str | None = None, index_dir: str | Path | None = None, eval_sets: dict | None = None,
                 eval_cfg=None, data_cfg=None, calibration_specs=None, calibration_images: int = 64,
                 normalize: bool = True, opset: int = 17, run_dir=None, progress: bool = True) -> Path:
    """Write a bundle for `model` (+ its tokenizer and preprocess_val) to out_dir; see the module docstring.

    lora_scale: the fine-tuning delta merged in (default: the index's scale with index_dir, else 1.0).
    quantize: None, "int8" (both towers) or "int8-text" (the text tower only; the image tower stays fp32).
    eval_sets: {"domain": specs, "general": specs} measured into the card (with eval_cfg, data_cfg).
    calibration_specs: shards the image tower's int8 ranges are calibrated on (default: the index gallery).
    """
    from mmft import __version__
    from mmft.bundle.card import training_data, write_card
    from mmft.bundle.onnx_export import export_towers, merged_copy
    from mmft.bundle.tokenizer import save_tokenizer
    from mmft.config import EvalConfig
    from mmft.model.factory import model_identity

    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"--quantize {quantize!r} is not supported; use {' or '.join(QUANTIZE)} or leave it out")
    has_adapter = getattr(model, "mmft_lora", None) is not None
    if lora_scale is None and index_dir is not None and has_adapter:
        lora_scale = _index_scale(Path(index_dir))
    if not has_adapter and lora_scale not in (None, 1.0):
        raise ValueError(f"--lora-scale {lora_scale} needs a model with an adapter; this one has none")
    scale = float(lora_scale if lora_scale is not None else 1.0) if has_adapter else None
    fingerprint = _fingerprint(model, scale)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pre_cfg = preprocess_config(dict(getattr(model.visual, "preprocess_cfg", {})))
        write_json(tmp / PREPROCESS_FILE, pre_cfg)
        tok = save_tokenizer(tokenizer, tmp)
        merged = merged_copy(model, scale)
        encoders = export_towers(merged, tmp, image_size=tuple(pre_cfg["size"]),
                                 context_length=tok["context_length"], opset=opset, normalize=normalize)
        encoders["files"] = {"fp32": {"image": encoders["image"]["file"], "text": encoders["text"]["file"]}}
        encoders["default_precision"] = "fp32"
        if calibration_specs is None and index_dir is not None:  # the gallery the index was built from
            from mmft.index.manifest import read_manifest

            calibration_specs = (read_manifest(Path(index_dir)).get("source") or {}).get("shards")
        calibration = gallery_images(calibration_specs, calibration_images) if calibration_specs else []
        meta = {"format": BUNDLE_FORMAT, "mmft_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "base_model": model_identity(model), "adapter_sha256": _adapter_digest(model) if has_adapter else None,
                "lora_scale": scale, "fingerprint": fingerprint, "encoders": encoders, "tokenizer": tok,
                "preprocess_file": PREPROCESS_FILE, "index": None, "quantization": None}
        meta["parity_check"] = _check_parity(tmp, meta, merged, tokenizer, preprocess,
                                             _smoke_images(pre_cfg, calibration))
        del merged
        if quantize is not None:
            q = _quantize(tmp, encoders["files"]["fp32"], QUANTIZE[quantize], calibration, pre_cfg)
            encoders["files"]["int8"] = q.pop("files")
            encoders["default_precision"] = "int8"
            meta["quantization"] = q
        if index_dir is not None:
            meta["index_summary"] = _copy_index(Path(index_dir), tmp / INDEX_DIR, fingerprint)
            meta["index"] = INDEX_DIR
        evaluation = parity = None
        if eval_sets:
            from mmft.bundle.measure import onnx_comparison, quick_speed, torch_evaluation

            cfg = eval_cfg or EvalConfig()
            evaluation = torch_evaluation(model, tokenizer, preprocess, eval_sets, scale, cfg, data_cfg, progress)
            bundles = {p: _open(tmp, meta, p) for p in encoders["files"]}
            parity, cost = onnx_comparison(model, scale, bundles, eval_sets, cfg, data_cfg, tokenizer, preprocess,
                                           progress)
            meta["parity"] = parity
            if meta["quantization"] is not None:
                meta["quantization"]["recall_cost"] = cost
                threads = os.cpu_count()
                meta["quantization"]["speed"] = quick_speed(
                    _open(tmp, meta, "fp32", threads), _open(tmp, meta, "int8", threads),
                    preprocess_batch(calibration[:8], pre_cfg), SMOKE_TEXTS)
            meta["evaluation"] = _evaluation_summary(evaluation["report"])
        write_card(tmp / CARD_FILE, {**meta, "files": file_table(tmp)}, pre_cfg,
                   training=training_data(run_dir), evaluation=evaluation, parity=parity)
        write_manifest(tmp, meta)
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle written: %s", out_dir)
    return out_dir


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
            raise FileExistsError(f"{out_dir} exists and is not an mmft bundle; choose another --out or remove it")
        (out_dir / "manifest.json").unlink(missing_ok=True)
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def export_bundle(run_dir: str | Path, out_dir: str | Path, *, adapter: str = "best", **kwargs) -> Path:
    """`mmft export --format onnx`: load base + adapter from a run directory and write a bundle (see write_bundle).

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
