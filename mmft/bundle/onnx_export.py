"""Both towers of a dual encoder as ONNX graphs, the adapter merged in at a chosen LoRA scale.

A deep copy of the model gets its LoRA delta (and the fully trained heads) set to the scale and folded
into the base weights (`merge_lora`), so the graphs are plain open_clip towers: the caller's model is
left as it was. The graphs take `pixel_values` (N, 3, H, W) float32 and `input_ids` (N, L) int64 and
return `image_embeds` / `text_embeds` (N, D) float32, unit rows unless normalize=False.

Exporter: torch's TorchScript-based exporter (`dynamo=False`). It handles open_clip's ViT and text
transformers, timm CNNs and Hugging Face BERT-style towers in seconds, with a dynamic batch axis and,
for Hugging Face text towers (which mask padding and number positions from the left), a dynamic
sequence axis. open_clip's own text transformer keeps its context length (a fixed positional table and
the end-token pooling). PyTorch's fused MultiheadAttention fast path has no ONNX form, so it is
switched off while tracing.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch

IMAGE_ONNX, TEXT_ONNX = "image_encoder.onnx", "text_encoder.onnx"
DEFAULT_OPSET = 17


class _ImageTower(torch.nn.Module):
    def __init__(self, model, normalize: bool):
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values, normalize=self.normalize)  # (N, D)


class _TextTower(torch.nn.Module):
    def __init__(self, model, normalize: bool):
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, normalize=self.normalize)  # (N, D)


@torch.no_grad()
def merged_copy(model: torch.nn.Module, lora_scale: float | None = None) -> torch.nn.Module:
    """A copy of `model` in eval mode, its adapter folded in at `lora_scale` (default: its current scale)."""
    from mmft.model.lora import has_adapter, merge_lora, set_lora_scale

    merged = copy.deepcopy(model)
    if has_adapter(merged):
        if lora_scale is not None:
            set_lora_scale(merged, lora_scale)
        merge_lora(merged)
    elif lora_scale not in (None, 1.0):
        raise ValueError(f"lora_scale={lora_scale} needs a model with an adapter; this one has none")
    return merged.eval()


def dynamic_sequence(model: torch.nn.Module) -> bool:
    """True when the text tower gives the same features for any padded length (Hugging Face towers)."""
    from mmft.model.factory import trimmable_pad_id

    return trimmable_pad_id(model) is not None


def _example_ids(merged: torch.nn.Module, dyn_seq: bool, context_length: int) -> torch.Tensor:
    """(2, L) token ids to trace with; with a dynamic sequence, row 1 is half padding so masking is traced."""
    from mmft.model.factory import trimmable_pad_id

    seq = min(8, context_length) if dyn_seq else context_length
    ids = torch.ones(2, seq, dtype=torch.int64)  # (2, L) the values do not matter for tracing
    if dyn_seq:
        ids[1, seq // 2:] = trimmable_pad_id(merged)
    return ids


@contextlib.contextmanager
def _exportable_attention():
    """Turn off the fused nn.MultiheadAttention inference path (no ONNX symbolic) while tracing."""
    mha = getattr(torch.backends, "mha", None)
    old = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(old)


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
            axes: dict, opset: int) -> None:
    # the exporter puts the module back into the mode it found it in: a fresh wrapper is in training mode,
    # which would leave BatchNorm layers of the model updating their statistics on every later forward
    module.eval()
    with _exportable_attention(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks in the towers
        torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: axes, output_name: {0: "batch"}}, opset_version=opset,
                          dynamo=False, do_constant_folding=True)


def check_onnx(path: Path) -> None:
    """onnx.checker on a saved graph (by path, so graphs over 2 GB are checked too)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def export_towers(merged: torch.nn.Module, out_dir: str | Path, *, image_size: tuple[int, int],
                  context_length: int, opset: int = DEFAULT_OPSET, normalize: bool = True) -> dict:
    """Write image_encoder.onnx and text_encoder.onnx for an already merged model; check both.

    Returns the manifest's "encoders" facts: file names, input/output names, dynamic axes, dim, opset.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dyn_seq = dynamic_sequence(merged)
    h, w = image_size
    pixels = torch.randn(2, 3, h, w)  # (2, 3, H, W)
    ids = _example_ids(merged, dyn_seq, context_length)  # (2, L)
    _export(_ImageTower(merged, normalize), pixels, out_dir / IMAGE_ONNX, "pixel_values", "image_embeds",
            {0: "batch"}, opset)
    _export(_TextTower(merged, normalize), ids, out_dir / TEXT_ONNX, "input_ids", "text_embeds",
            {0: "batch", 1: "sequence"} if dyn_seq else {0: "batch"}, opset)
    for name in (IMAGE_ONNX, TEXT_ONNX):
        check_onnx(out_dir / name)
    with torch.no_grad():
        dim = int(merged.encode_image(pixels[:1]).shape[-1])
    return {"image": {"file": IMAGE_ONNX, "input": "pixel_values", "output": "image_embeds",
                      "input_shape": ["batch", 3, h, w]},
            "text": {"file": TEXT_ONNX, "input": "input_ids", "output": "text_embeds",
                     "input_shape": ["batch", "sequence" if dyn_seq else context_length]},
            "dim": dim, "opset": opset, "normalized": normalize, "dynamic_sequence": dyn_seq,
            "exporter": f"torch.onnx (TorchScript) {torch.__version__}"}
