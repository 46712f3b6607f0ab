"""The figures of a bundle's model card, measured at export on the evaluation sets.

- evaluation: `mmft.evaluate` of the torch model (frozen baseline vs tuned, the LoRA-scale sweep and
  its recommended scale), exactly what `mmft eval` reports;
- parity: every image and caption of the sets embedded by the adapted torch model and by the ONNX
  encoders (through the bundle's own tokenizer and numpy image transform), row cosines and the recall
  difference;
- quantization cost: recall of the int8 encoders minus the fp32 ones with paired bootstrap CIs (the
  same resampled queries for both rows, `mmft.evaluation.core.summarize_rows`), and a short throughput
  check of both.
The ONNX encoders enter mmft's embedding code through thin torch shims, so both paths go through the
same data loading, batching and metrics.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from mmft.bundle.preprocess import preprocess_image
from mmft.bundle.runtime import Bundle


class _OnnxModel(torch.nn.Module):
    """A bundle where mmft.embeddings expects a model (encode_image / encode_text on tensors)."""

    def __init__(self, bundle: Bundle):
        super().__init__()
        self.bundle = bundle
        self.mmft_identity = bundle.fingerprint().get("model")

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return torch.from_numpy(self.bundle.embed_pixels(images.cpu().numpy()))  # (B, D)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return torch.from_numpy(self.bundle.embed_tokens(tokens.cpu().numpy()))  # (B, D)


class _Tokenizer:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle

    def __call__(self, texts) -> torch.Tensor:
        return torch.from_numpy(self.bundle.tokenizer(texts))  # (N, L)


class _Preprocess:
    def __init__(self, bundle: Bundle):
        self.cfg = bundle.preprocess

    def __call__(self, image) -> torch.Tensor:
        return torch.from_numpy(preprocess_image(image, self.cfg))  # (3, H, W)


def torch_evaluation(model, tokenizer, preprocess, sets: dict, lora_scale: float | None, eval_cfg, data_cfg,
                     progress: bool) -> dict:
    """`mmft.evaluate`: baseline vs tuned (and the exported scale), the sweep and its recommended scale."""
    from mmft.evaluation.core import EvalRow, evaluate
    from mmft.model.lora import has_adapter

    rows = None
    if has_adapter(model):
        rows = [EvalRow("baseline", 0.0), EvalRow("tuned", 1.0)]
        if lora_scale not in (0.0, 1.0):
            rows.append(EvalRow(f"exported @ scale {lora_scale:g}", lora_scale))
    sweep = has_adapter(model) and "domain" in sets
    report = evaluate(model, sets, tokenizer=tokenizer, preprocess=preprocess, eval_cfg=eval_cfg,
                      data_cfg=data_cfg, rows=rows, sweep=sweep, progress=progress)
    return {"report": report, "lora_scale": lora_scale}


def _cosines(a: np.ndarray, b: np.ndarray) -> dict:
    cos = np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64), axis=1)  # (N,)
    return {"rows": len(cos), "min": float(cos.min()) if len(cos) else 1.0,
            "mean": float(cos.mean()) if len(cos) else 1.0}


def onnx_comparison(model, lora_scale: float | None, bundles: dict[str, Bundle], sets: dict, eval_cfg,
                    data_cfg, tokenizer, preprocess, progress: bool) -> tuple[dict, dict | None]:
    """(parity, recall cost): torch vs ONNX rows of every set, and each other precision minus fp32 recall
    with paired CIs ({set: {precision: {direction: ...}}}).

    bundles: {"fp32": Bundle[, "int8": Bundle, ...]} of the bundle being written.
    """
    from mmft.embeddings import embed
    from mmft.evaluation.core import retrieval_results, summarize_rows
    from mmft.model.lora import has_adapter
    from mmft.model.lora import lora_scale as scaled

    parity, cost = {}, {}
    ks = sorted(set(eval_cfg.ks) | {1, 5})
    for set_name, source in sets.items():
        with scaled(model, lora_scale if has_adapter(model) else None):
            ref = embed(model, source, tokenizer=tokenizer, preprocess=preprocess, data_cfg=data_cfg,
                        batch_size=eval_cfg.batch_size, progress=progress)
        results = {"torch": retrieval_results(ref, ks)}
        parity[set_name] = {"cosine": {}}
        for p, b in bundles.items():
            emb = embed(_OnnxModel(b), source, tokenizer=_Tokenizer(b), preprocess=_Preprocess(b),
                        data_cfg=data_cfg, batch_size=eval_cfg.batch_size, progress=progress)
            parity[set_name]["cosine"][p] = {"image": _cosines(ref.image, emb.image),
                                             "text": _cosines(ref.text, emb.text)}
            results[f"onnx {p}"] = retrieval_results(emb, ks)
        table, deltas = summarize_rows({"onnx fp32": results["onnx fp32"], **results}, eval_cfg.bootstrap)
        parity[set_name]["torch_minus_fp32"] = {  # recall points; 0 when the encoders agree
            d: {m: deltas["torch"][d][m]["value"] for m in ("R@1", "R@5")} for d in ("t2i", "i2t")}
        for p in bundles:
            if p != "fp32":
                row = f"onnx {p}"
                cost.setdefault(set_name, {})[p] = {
                    d: {"R@1": deltas[row][d]["R@1"], "R@5": deltas[row][d]["R@5"],
                        "fp32_R@5": table["onnx fp32"][d]["R@5"]["value"],
                        "int8_R@5": table[row][d]["R@5"]["value"]} for d in ("t2i", "i2t")}
    return parity, cost or None


def _items_per_s(fn, n_items: int, seconds: float) -> float:
    fn()  # warm-up
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        fn()
        runs += 1
    return n_items * runs / (time.perf_counter() - start)


def quick_speed(b32: Bundle, b8: Bundle, pixels: np.ndarray, texts: list[str], seconds: float = 1.0) -> dict:
    """fp32 vs int8 ONNX throughput of each tower (text batch 64, image batch 32) on this machine."""
    threads = os.cpu_count() or 1
    ids = b32.tokenizer((texts * 64)[:64])  # (64, L)
    px = np.concatenate([pixels] * (32 // max(len(pixels), 1) + 1))[:32]  # (32, 3, H, W)
    rows = []
    for tower, batch in (("text", 64), ("image", 32)):
        speed = {}
        for name, b in (("fp32", b32), ("int8", b8)):
            run = (lambda b=b: b.embed_tokens(ids)) if tower == "text" else (lambda b=b: b.embed_pixels(px))
            speed[name] = _items_per_s(run, batch, seconds)
        rows.append({"tower": tower, "batch": batch, **speed})
    return {"machine": f"{threads} CPU threads, onnxruntime CPU", "rows": rows}
