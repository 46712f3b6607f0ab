"""Trained adapters as artifacts: save/load (safetensors + JSON), export to plain open_clip, load a run.

An adapter directory holds `adapter_model.safetensors` (LoRA A/B matrices and the fully trained
parameters such as projections and temperature) and `adapter_config.json` (LoRA config, adapted
modules, and the identity of the base model it was trained on). Loading onto another base is refused.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch

from mmft import __version__
from mmft.config import LoraConfig, config_from_dict, to_dict
from mmft.io import atomic_path, write_json
from mmft.model.factory import create_model, describe_identity, model_identity
from mmft.model.identity import identity_diffs
from mmft.model.lora import (
    apply_lora,
    get_lora_scale,
    has_adapter,
    lora_state,
    merge_lora,
    set_lora_scale,
    tuned_full_params,
)
from mmft.model.lora import lora_scale as scaled
from mmft.rundir import RunDir

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "mmft-lora-1"


class AdapterLoadError(ValueError):
    """An adapter folder that is missing a file, damaged or inconsistent; the message names the file."""


class AdapterMismatchError(AdapterLoadError):
    """An adapter that does not belong to the model it is loaded onto."""


# adapter_config.json fields and their JSON types, checked before any is used
_CONFIG_FIELDS = {"base_model": dict, "lora": dict, "adapted": dict, "full": list,
                  "digest": (str, type(None))}


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA matrices and fully trained parameters (at scale 1), keyed by parameter name."""
    if not has_adapter(model):
        raise ValueError("this model has no adapter (apply_lora first)")
    out = {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}
    out.update(tuned_full_params(model))
    return {n: t.contiguous().cpu() for n, t in sorted(out.items())}


def adapter_digest(model: torch.nn.Module) -> str | None:
    """sha256 over the adapter tensors (names, shapes, bytes); None when the model has no adapter."""
    if not has_adapter(model):
        return None
    return tensor_digest(adapter_tensors(model))


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors in name order (names, shapes, values as float32 bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()


def save_adapter(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the adapter of `model` to `out_dir` (both files atomically). Returns the directory."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    tensors = adapter_tensors(model)
    state = lora_state(model)
    with atomic_path(out_dir / ADAPTER_WEIGHTS) as tmp:
        tmp.write_bytes(save(tensors))  # a Python write: a full disk raises OSError with its errno
    write_json(out_dir / ADAPTER_CONFIG, {
        "format": FORMAT,
        "mmft_version": __version__,
        "base_model": model_identity(model),
        "lora": to_dict(state.config),
        "adapted": state.adapted,
        "full": state.full,
        "digest": adapter_digest(model),
    })
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no adapter in '{adapter_dir}': {ADAPTER_CONFIG} is missing")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{path} is not valid JSON ({e}): the adapter folder is damaged; "
                               "save it again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AdapterMismatchError(f"'{path}' is not an mmft adapter (format {found!r}, expected {FORMAT})")
    for name, kind in _CONFIG_FIELDS.items():
        if not isinstance(meta.get(name), kind):
            got = "missing" if name not in meta else f"of type {type(meta[name]).__name__}"
            want = kind[0] if isinstance(kind, tuple) else kind
            raise AdapterLoadError(f"{path}: field '{name}' is {got}, expected {want.__name__}; the adapter "
                                   "config is damaged or was edited: save the adapter again")
    try:
        config_from_dict({"lora": meta["lora"]})
    except ValueError as e:
        raise AdapterLoadError(f"{path}: field 'lora' is not a LoRA config ({e}); "
                               "save the adapter again") from None
    return meta


def read_adapter_tensors(adapter_dir: str | Path, meta: dict) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder, checked against the digest its config records."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterLoadError(f"no adapter tensors in '{adapter_dir}': {ADAPTER_WEIGHTS} is missing; "
                               "save it again")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise AdapterLoadError(f"{path} is not a readable safetensors file ({e}): the adapter is damaged or "
                               "cut short; save it again") from None
    if meta.get("digest") and tensor_digest(tensors) != meta["digest"]:
        raise AdapterLoadError(f"the tensors in {path} do not match the digest recorded in {ADAPTER_CONFIG}: "
                               "the file is damaged or belongs to another adapter; save the adapter again")
    return tensors


def check_identity(expected: dict, model: torch.nn.Module, what: str) -> None:
    """Refuse with one sentence when `model`'s base identity differs from `expected`."""
    actual = model_identity(model)
    diffs = identity_diffs(expected, actual)
    if diffs:
        raise AdapterMismatchError(
            f"{what} was trained on base {describe_identity(expected)}, but the model is "
            f"{describe_identity(actual)} "
            f"({', '.join(diffs)} differ); load it onto the base it was trained on"
        )


@torch.no_grad()
def load_adapter(model: torch.nn.Module, adapter_dir: str | Path, *,
                 partial: bool = False) -> torch.nn.Module:
    """Apply LoRA as recorded in `adapter_dir` (if the model has none yet) and load its tensors.

    partial=True loads only the tensors the model's own adapter layout also has (e.g. the heads of a
    head-only run as the starting point of a LoRA run) and leaves the rest as they are.
    """
    meta = read_adapter_config(adapter_dir)
    check_identity(meta["base_model"], model, f"the adapter in '{adapter_dir}'")
    if not has_adapter(model):
        apply_lora(model, config_from_dict({"lora": meta["lora"]}).lora)
    tensors = read_adapter_tensors(adapter_dir, meta)
    params = dict(model.named_parameters())
    expected = {n for n in params if ".lora_" in n} | set(lora_state(model).full)
    if partial:
        tensors = {n: t for n, t in tensors.items() if n in expected}
        if not tensors:
            raise AdapterMismatchError(f"the adapter in '{adapter_dir}' shares no tensor with this model's "
                                       "adapter")
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if (missing and not partial) or unexpected:
        raise AdapterMismatchError(
            f"the adapter in '{adapter_dir}' does not fit this model's LoRA layout "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it saved with another lora config?"
        )
    for name, t in tensors.items():
        if params[name].shape != t.shape:
            raise AdapterMismatchError(f"adapter tensor {name} in '{adapter_dir}' has shape "
                                       f"{tuple(t.shape)}, the model needs {tuple(params[name].shape)}: "
                                       f"its {ADAPTER_CONFIG} does not describe its tensors")
    with scaled(model, 1.0):  # the saved tensors are the scale-1 values
        for name, t in tensors.items():
            params[name].copy_(t)
    return model


def export(model: torch.nn.Module, path: str | Path, *, lora_scale: float | None = None) -> Path:
    """Save a merged plain open_clip state dict to `path`, with `<stem>.json` and `<stem>.mmft.json`
    beside it.

    `open_clip.create_model(name, pretrained=path)` loads it and embeds exactly like the adapted model at
    `lora_scale` (default: its current scale). For custom towers (mmft-mini included) first register the
    architecture with `open_clip.add_model_config("<stem>.json")` and use the name "<stem>"; the preprocessing
    (mean/std, size) is in `<stem>.mmft.json`. `mmft.create_model(ModelConfig(name=..., pretrained=path))`
    does all of that and is how an exported model becomes the base of the next fine-tune.
    """
    path = Path(path)
    merged = copy.deepcopy(model)
    if has_adapter(merged):
        if lora_scale is not None:
            set_lora_scale(merged, lora_scale)
        merge_lora(merged)
    state = {k: v.detach().cpu() for k, v in merged.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    model_cfg = getattr(model, "mmft_model_cfg", None)
    if model_cfg is not None:
        import open_clip

        arch = open_clip.get_model_config(model_cfg.name)
        if arch is not None:  # what open_clip.add_model_config needs for custom towers
            write_json(path.with_suffix(".json"), arch)
        write_json(path.with_suffix(".mmft.json"), {
            "model_name": model_cfg.name,
            "base_model": model_identity(model),
            "adapter_digest": adapter_digest(model),
            "lora_scale": get_lora_scale(model) if lora_scale is None else lora_scale,
            "preprocess_cfg": dict(getattr(model.visual, "preprocess_cfg", {})),
            "mmft_version": __version__,
        })
    return path


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    preprocess: object
    tokenizer: object


def load_model(run_dir: str | Path, *, adapter: str = "best",
               device: str | torch.device = "cpu") -> LoadedModel:
    """Base model + adapter back from a training run directory, in eval mode, ready to embed.

    `adapter` is "best" (best validation checkpoint), "last", or a path to an adapter directory.
    """
    run = RunDir(run_dir)
    cfg = run.config()
    model, _, preprocess_val, tokenizer = create_model(cfg.model, device=device)
    load_adapter(model, run.find_adapter(adapter))
    model.eval()
    return LoadedModel(model, preprocess_val, tokenizer)


__all__ = [
    "AdapterMismatchError",
    "LoadedModel",
    "LoraConfig",
    "adapter_digest",
    "export",
    "load_adapter",
    "load_model",
    "save_adapter",
]
