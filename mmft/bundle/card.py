"""README.md of a bundle: the model card a deployer reads before trusting the folder.

Every figure in it comes from a measurement made during the export (mmft.bundle.measure: mmft's
`evaluate` on the evaluation sets, the ONNX-vs-torch parity, the int8 recall cost with paired CIs,
a short speed check) or from the run directory (base, training data and its hash); a section without
a measurement says so instead of showing a number. Nothing here imports torch.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from mmft.io import sha256_file

DIRS = (("t2i", "text→image"), ("i2t", "image→text"))


def training_data(run_dir: str | Path | None) -> dict | None:
    """What the run trained on: its shard specs, shard count, samples, bytes and one sha256 over the shards.

    The hash covers each local shard's name and sha256, in order; remote shards enter by URL only.
    """
    if run_dir is None:
        return None
    from mmft.data.epochs import count_samples, expand_specs
    from mmft.rundir import RunDir

    run = RunDir(run_dir)
    cfg = run.config()
    urls = expand_specs(list(cfg.data.train)) if cfg.data.train else []
    h, size, local = hashlib.sha256(), 0, [u for u in urls if Path(u).is_file()]
    for u in urls:
        digest = sha256_file(u) if Path(u).is_file() else "remote"
        h.update(f"{Path(u).name}:{digest}\n".encode())
        size += Path(u).stat().st_size if Path(u).is_file() else 0
    summary = run.summary() if run.summary_path.is_file() else {}
    return {"specs": list(cfg.data.train), "weights": list(cfg.data.train_weights), "shards": len(urls),
            "local_shards": len(local), "samples": count_samples(local) if local else None, "bytes": size,
            "sha256": h.hexdigest() if urls else None, "run_dir": str(run.path),
            "steps": summary.get("steps"), "best": summary.get("best")}


def _fmt_ci(m: dict, signed: bool = False) -> str:
    f = "{:+.1f}" if signed else "{:.1f}"
    lo, hi = m["ci"]
    return f"{f.format(m['value'])} [{f.format(lo)}, {f.format(hi)}]"


def _identity(ident: dict | None) -> str:
    if not ident:
        return "unidentified"
    sha = f", sha256 `{ident['sha256'][:16]}…`" if ident.get("sha256") else ""
    return f"`{ident.get('name')}` ({ident.get('pretrained') or 'random init'}{sha})"


def _index_info(m: dict) -> str:
    info = m.get("index_summary") or {}
    thumbs = ", with thumbnails" if info.get("thumbnails") else ""
    return f"`{m['index']}/`: {info.get('vectors', '?'):,} vectors, FAISS `{info.get('factory')}`{thumbs}"


def _preprocess_info(p: dict) -> str:
    crop = "centre crop" if p["crop"] == "center" else "no crop"
    return (f"{p['size'][0]}x{p['size'][1]}, {p['interpolation']} resize ({p['resize_mode']} side), {crop}, "
            f"mean {p['mean']}, std {p['std']}")


def _header(m: dict, preprocess: dict) -> list[str]:
    enc, fp, tok = m["encoders"], m["fingerprint"], m["tokenizer"]
    precisions = ", ".join(sorted(enc["files"]))
    rows = [("base model", _identity(m.get("base_model"))),
            ("adapter sha256", f"`{m['adapter_sha256']}`" if m.get("adapter_sha256") else "none"),
            ("LoRA scale merged in", f"{m['lora_scale']:g}" if m.get("lora_scale") is not None else "n/a"),
            ("embedding", f"{enc['dim']}-d, {'unit rows' if enc['normalized'] else 'raw'}"),
            ("image input", _preprocess_info(preprocess)),
            ("text input", f"{tok['family']} tokenizer, up to {tok['context_length']} tokens"),
            ("encoders", f"{precisions} (default {enc['default_precision']}), ONNX opset {enc['opset']}"),
            ("index", _index_info(m) if m.get("index") else "none shipped"),
            ("fingerprint", (f"indexes must record adapter {(fp.get('adapter_sha256') or 'none')[:12]} at "
                             f"scale {fp.get('lora_scale')}"))]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _training_section(data: dict | None) -> list[str]:
    if not data:
        return ["Not recorded: the bundle was exported from a model, not from a run directory.", ""]
    if not data["shards"]:
        return [f"Run `{data['run_dir']}`: its config names no training shards.", ""]
    mix = f" mixed with weights {data['weights']}" if data["weights"] else ""
    samples = f"{data['samples']:,} samples, " if data.get("samples") else ""
    text = (f"Run `{data['run_dir']}`, {data.get('steps') or '?'} optimizer steps. Training shards: "
            f"{', '.join(f'`{s}`' for s in data['specs'])}{mix}: {data['shards']} shards, {samples}"
            f"{data['bytes'] / 1e6:.1f} MB; sha256 over the shards `{data['sha256']}`.")
    return [text, ""]


def _evaluation_section(ev: dict | None) -> list[str]:
    if not ev:
        return [("Not evaluated: export with `--eval-config CONFIG` (a config whose `eval.domain` / "
                 "`eval.general` name test shards) to measure recall here."), ""]
    from mmft.evaluation.report import metrics_table, sweep_table

    report = ev["report"]
    out = [(f"Measured with `mmft.evaluate` at export: text→image and image→text recall in points, 95% "
            f"bootstrap CIs over queries ({report['config']['bootstrap']} resamples); Δ rows are paired."),
           ""]
    for set_name, info in report["sets"].items():
        title = (f"**{set_name}** ({info['images']} images, {info['captions']} captions, {info['relevance']} "
                 "relevance)")
        out += [title, ""] + metrics_table(report, set_name) + [""]
    sweep = report.get("sweep")
    if sweep:
        out += ["LoRA-scale sweep (0 = frozen base, 1 = tuned):", ""] + sweep_table(sweep) + [""]
        out += [(f"**Recommended LoRA scale: {sweep['recommended_lora_scale']:g}** ({sweep['rule']}); this "
                 f"bundle merges scale {ev['lora_scale']:g}."), ""]
    return out


def _parity_section(parity: dict | None) -> list[str]:
    if not parity:
        return ["Not measured (no evaluation sets).", ""]
    out = [("Cosine between each ONNX Runtime row and the adapted torch model's row (same images and "
            "captions; the ONNX side through tokenizer.json and the numpy transform of preprocess.json):"),
           "",
           "| set | precision | tower | rows | min | mean |", "|---|---|---|---|---|---|"]
    for set_name, p in parity.items():
        for prec, towers in p["cosine"].items():
            for tower, c in towers.items():
                out.append(f"| {set_name} | {prec} | {tower} | {c['rows']} | {c['min']:.6f} | "
                           f"{c['mean']:.6f} |")
    out += ["", "Recall of the torch model minus ONNX fp32 (points):", "",
            "| set | t2i R@1 | t2i R@5 | i2t R@1 | i2t R@5 |", "|---|---|---|---|---|"]
    for set_name, p in parity.items():
        d = p["torch_minus_fp32"]
        cells = [f"{d[k][m]:+.2f}" for k in ("t2i", "i2t") for m in ("R@1", "R@5")]
        out.append(f"| {set_name} | " + " | ".join(cells) + " |")
    return out + [""]


def _quantization_section(q: dict | None) -> list[str]:
    if not q:
        return ["Not quantized: export with `--quantize int8` for int8 encoders.", ""]
    def tower(t: dict | None, name: str) -> str:
        if t is None:
            return f"{name} tower: kept fp32"
        calib = f", {t['calibration_images']} calibration images" if t.get("calibration_images") else ""
        return f"{name} tower: {t['method']} ({t['weights']}, activations {t['activations']}{calib})"

    out = [tower(q["text"], "Text") + "; " + tower(q["image"], "image") + ".", ""]
    cost = q.get("recall_cost")
    if cost:
        out += ["Recall of int8 minus fp32 ONNX, points, paired 95% CIs:", "",
                "| set | direction | R@1 Δ | R@5 Δ | fp32 R@5 | int8 R@5 |", "|---|---|---|---|---|---|"]
        for set_name, dirs in cost.items():
            for d, label in DIRS:
                c = dirs[d]
                out.append(f"| {set_name} | {label} | {_fmt_ci(c['R@1'], True)} | "
                           f"{_fmt_ci(c['R@5'], True)} | {c['fp32_R@5']:.1f} | {c['int8_R@5']:.1f} |")
        out.append("")
    else:
        out += ["Recall cost not measured (no evaluation sets).", ""]
    speed = q.get("speed")
    if speed:
        out += [f"Throughput on the export machine ({speed['machine']}):", "",
                "| tower | batch | fp32 items/s | int8 items/s | int8 / fp32 |", "|---|---|---|---|---|"]
        for r in speed["rows"]:
            out.append(f"| {r['tower']} | {r['batch']} | {r['fp32']:.1f} | {r['int8']:.1f} | "
                       f"{r['int8'] / r['fp32']:.2f}x |")
        out.append("")
    return out


def _files_section(m: dict) -> list[str]:
    out = ["| file | bytes | sha256 |", "|---|---|---|"]
    for rel, e in sorted(m.get("files", {}).items()):
        if "/" not in rel:
            out.append(f"| `{rel}` | {e['bytes']:,} | `{e['sha256'][:16]}…` |")
    return out + ["", ("Every file (the index folder too) is listed with its full sha256 in `manifest.json`; "
                       "`mmft.load_bundle` refuses the folder when any of them differs."), ""]


USAGE = """```python
import mmft
bundle = mmft.load_bundle("path/to/bundle")            # ONNX Runtime only; checks every file's sha256
queries = bundle.encode_text(["a red apple"])          # (1, D) float32 unit rows
images = bundle.encode_image([PIL.Image.open("x.jpg")])
```
Serving: `mmft serve` with `base.backend: onnx` and this folder as a tenant's `adapter` (the packages of
the `serve-onnx` extra, no torch: see mmft's docs/export.md). Other runtimes: `image_encoder.onnx` takes
`pixel_values` (N, 3, H, W) float32 made as `preprocess.json` says (resize, centre crop, /255, mean/std);
`text_encoder.onnx` takes `input_ids` (N, L) int64 from `tokenizer.json` (the `tokenizers` package)."""

LIMITS = """- Intended use: text→image and image→text retrieval over galleries like the evaluation sets above,
  with the index shipped here or one built by the same encoders (same fingerprint).
- Recall outside the evaluated domains is unmeasured; the GENERAL set (when present) is the forgetting check.
- Small evaluation sets carry wide CIs (see the brackets); compare models on paired deltas, not on rows.
- int8 encoders trade recall for speed as measured above on this export machine; other CPUs differ.
- The image transform converts to RGB first (an alpha channel is dropped), as mmft's embedding path does."""


def write_card(path: str | Path, manifest: dict, preprocess: dict, *, training: dict | None,
               evaluation: dict | None, parity: dict | None) -> Path:
    """Write README.md (the model card) from the manifest facts (its "files": every file but the card)."""
    name = (manifest.get("base_model") or {}).get("name", "model")
    scale = manifest.get("lora_scale")
    title = f"# {name} + adapter at LoRA scale {scale:g}" if manifest.get("adapter_sha256") else f"# {name}"
    intro = (f"An mmft deployment bundle (format `{manifest['format']}`, mmft {manifest['mmft_version']}, "
             f"exported {manifest['created']}): ONNX encoders for both towers, tokenizer, image transform"
             f"{', FAISS index' if manifest.get('index') else ''} and this card.")
    lines = [title, "", intro, ""]
    lines += _header(manifest, preprocess) + [""]
    lines += ["## Training data", ""] + _training_section(training)
    lines += ["## Evaluation", ""] + _evaluation_section(evaluation)
    lines += ["## ONNX parity", ""] + _parity_section(parity)
    lines += ["## Quantization", ""] + _quantization_section(manifest.get("quantization"))
    lines += ["## Files", ""] + _files_section(manifest)
    lines += ["## Use", "", USAGE, "", "## Intended use and limits", "", LIMITS, ""]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
