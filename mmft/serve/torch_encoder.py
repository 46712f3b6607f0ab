"""The torch query encoder: one base model in memory, each tenant's adapter a slot swapped in by reference.

The base carries LoRA layers (the widest layout among the configured adapters). A slot holds one
adapter's LoRA A/B factors and fully trained parameters (projections, temperature) as its own tensors;
`_activate` points the layers and parameter attributes at them, an O(layers) assignment with no weight
copy, so 8 tenants cost the base once plus 8 small adapters (tools/bench_serve.py measures it).
Layers a slot does not adapt run at scale 0, and the "baseline" slot (scale 0, no tensors) is the
frozen base exactly. A slot at LoRA scale s between 0 and 1 keeps base + s * (tuned - base) for its
fully trained parameters, as `set_lora_scale` would.

Encoding goes through mmft.embeddings (encode_texts / encode_images): the same code `Index.search_text`
and the index builder use, so a served answer equals the library's.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmft.config import ModelConfig, _build, config_from_dict
from mmft.model.adapter import ADAPTER_WEIGHTS, AdapterMismatchError, check_identity, read_adapter_config
from mmft.model.factory import create_model, model_identity
from mmft.model.lora import LORA_LAYERS, apply_lora, tower_bodies

logger = logging.getLogger("mmft.serve")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, shape, float32 bytes) in name order: what adapter.adapter_digest hashes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Slot:
    """One adapter ready to swap in: LoRA factors per layer, fully trained parameters, the scale."""

    name: str
    scale: float
    lora: dict[str, tuple[nn.Parameter | None, nn.Parameter | None, float]] = field(default_factory=dict)
    full: dict[str, nn.Parameter] = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)


def _frozen(t: torch.Tensor, device) -> nn.Parameter:
    return nn.Parameter(t.to(device), requires_grad=False)


class TorchEncoder:
    """Encoder (mmft.serve.encoders) over an open_clip dual encoder with per-slot LoRA adapters."""

    def __init__(self, model_cfg: ModelConfig, lora_meta: dict | None = None, *, device: str = "cpu",
                 threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model, _, self.preprocess, self.tokenizer = create_model(model_cfg, device=self.device)
        self.model.eval()
        if lora_meta is not None:  # the LoRA layers every slot shares
            apply_lora(self.model, config_from_dict({"lora": lora_meta["lora"]}).lora)
            self.model.mmft_lora = None  # no scale sweep here: the slots hold every delta
            self.model.eval()
        self.identity = model_identity(self.model)
        self._layers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, LORA_LAYERS)]
        self._lora_shapes = {}  # the layers' own A/B were placeholders: keep their shapes, free them
        for name, layer in self._layers:
            layer.scale = 0.0  # off until a slot with factors for it is active
            for leaf in ("lora_A", "lora_B"):
                if getattr(layer, leaf, None) is not None:
                    self._lora_shapes[f"{name}.{leaf}"] = tuple(getattr(layer, leaf).shape)
                    empty = nn.Parameter(torch.empty(0, device=self.device), requires_grad=False)
                    setattr(layer, leaf, empty)
        self._base = dict(self.model.named_parameters())  # before any swap: the base's own tensors
        self._layer_names = {n for n, _ in self._layers}
        self._image_prefix = tower_bodies(self.model)["image"][0] + "."
        self._owners: dict[str, tuple[nn.Module, str]] = {}
        self._slots: dict[str, Slot] = {}
        self._active: Slot | None = None
        self._lock = threading.Lock()
        with torch.inference_mode():
            probe = self.model.encode_text(self.tokenizer(["probe"]).to(self.device), normalize=True)
        self.dim = int(probe.shape[-1])

    @classmethod
    def from_config(cls, cfg) -> TorchEncoder:
        """The encoder a ServeConfig describes: its base model, LoRA layers wide enough for its tenants."""
        from mmft.rundir import RunDir
        from mmft.serve.config import base_model_source, tenant_adapter

        source = base_model_source(cfg)
        model_cfg = (_build(ModelConfig, source, "base.model.") if isinstance(source, dict)
                     else RunDir(source).config().model)
        metas = [read_adapter_config(a) for t in cfg.tenants.values() if (a := tenant_adapter(t)) is not None]
        widest = max(metas, key=lambda m: sum(len(v) for v in m.get("adapted", {}).values()), default=None)
        if widest is not None and not any(widest.get("adapted", {}).values()):
            widest = None  # head-only adapters: no LoRA layers needed
        return cls(model_cfg, widest, device=cfg.base.device, threads=cfg.base.threads)

    # ---------------------------------------------------------------- slots

    @property
    def tenants(self) -> list[str]:
        return sorted(self._slots)

    def load_tenant(self, slot: str, adapter: str | None, lora_scale: float) -> None:
        """Load the adapter folder `adapter` (None = the base) at `lora_scale` as slot `slot`."""
        if adapter is None or lora_scale == 0.0:
            self._slots[slot] = Slot(slot, 0.0, fingerprint={"model": dict(self.identity),
                                                             "adapter_sha256": None, "lora_scale": None})
            return
        new = self._read_slot(slot, Path(adapter), float(lora_scale))
        with self._lock:  # _activate walks the owners: register new ones between batches
            for pname in new.full:
                if pname not in self._owners:
                    owner, _, leaf = pname.rpartition(".")
                    self._owners[pname] = (self.model.get_submodule(owner) if owner else self.model, leaf)
            self._slots[slot] = new

    def drop_tenant(self, slot: str) -> None:
        self._slots.pop(slot, None)

    def fingerprint(self, tenant: str) -> dict:
        return dict(self._slot(tenant).fingerprint)

    def _slot(self, name: str) -> Slot:
        slot = self._slots.get(name)
        if slot is None:
            loaded = ", ".join(self.tenants) or "none"
            raise KeyError(f"no adapter slot '{name}' is loaded (loaded: {loaded})")
        return slot

    def _read_slot(self, name: str, adapter: Path, scale: float) -> Slot:
        from safetensors.torch import load_file

        meta = read_adapter_config(adapter)
        check_identity(meta["base_model"], self.model, f"the adapter in '{adapter}'")
        tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
        fp = {"model": dict(self.identity), "adapter_sha256": tensors_digest(tensors), "lora_scale": scale}
        slot = Slot(name, scale, fingerprint=fp)
        towers = meta.get("lora", {})
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for pname, t in tensors.items():
            layer, _, leaf = pname.rpartition(".")
            if leaf in ("lora_A", "lora_B"):
                factors.setdefault(layer, {})[leaf] = t
            elif pname in meta.get("full", []):
                slot.full[pname] = self._full_param(pname, t, scale, adapter)
            else:
                raise AdapterMismatchError(f"the adapter in '{adapter}' holds {pname}, which is neither a "
                                           "LoRA factor nor a listed fully trained parameter; re-save it")
        for layer, pair in factors.items():
            self._check_layer(layer, pair, adapter)
            tower = towers.get("image" if layer.startswith(self._image_prefix) else "text", {})
            scaling = float(tower.get("alpha", 16.0)) / float(tower.get("rank", 8))
            slot.lora[layer] = (_frozen(pair["lora_A"], self.device) if "lora_A" in pair else None,
                                _frozen(pair["lora_B"], self.device) if "lora_B" in pair else None, scaling)
        return slot

    def _check_layer(self, layer: str, pair: dict, adapter: Path) -> None:
        if layer not in self._layer_names:
            raise AdapterMismatchError(
                f"the adapter in '{adapter}' adapts {layer}, where the shared base has no LoRA layer: serve "
                "adapters trained with the same lora targets together (or this one from a second service)")
        for leaf, t in pair.items():
            like = self._lora_shapes.get(f"{layer}.{leaf}")
            other = 1 if leaf == "lora_A" else 0  # A is (r, fan_in), B is (fan_out, r): r may differ
            if like is None or t.shape[other] != like[other]:
                raise AdapterMismatchError(f"adapter tensor {layer}.{leaf} in '{adapter}' has shape "
                                           f"{tuple(t.shape)}, the base layer needs {like}")

    def _full_param(self, pname: str, tuned: torch.Tensor, scale: float, adapter: Path) -> nn.Parameter:
        base = self._base.get(pname)
        if base is None or base.shape != tuned.shape:
            need = None if base is None else tuple(base.shape)
            raise AdapterMismatchError(f"adapter tensor {pname} in '{adapter}' does not fit the base model "
                                       f"({tuple(tuned.shape)} vs {need})")
        tuned = tuned.to(device=self.device, dtype=base.dtype)
        value = tuned if scale == 1.0 else base.detach() + scale * (tuned - base.detach())
        return _frozen(value, self.device)

    def _activate(self, slot: Slot) -> None:
        """Point every LoRA layer and fully trained parameter at `slot`'s tensors (no copy)."""
        if self._active is slot:
            return
        for name, layer in self._layers:
            entry = slot.lora.get(name)
            if entry is None or slot.scale == 0.0:
                layer.scale = 0.0
                continue
            a, b, scaling = entry
            if a is not None:
                layer.lora_A, layer.lora_B = a, b
            layer.scaling, layer.scale = scaling, slot.scale
        for pname, (owner, leaf) in self._owners.items():
            setattr(owner, leaf, slot.full.get(pname, self._base[pname]))
        self._active = slot

    # ---------------------------------------------------------------- encoding

    def encode_text(self, texts: list[str], tenant: str) -> np.ndarray:
        from mmft.embeddings import encode_texts

        slot = self._slot(tenant)
        with self._lock:
            self._activate(slot)
            return encode_texts(self.model, self.tokenizer, list(texts))  # (n, D)

    def encode_image(self, images: list, tenant: str) -> np.ndarray:
        from mmft.embeddings import encode_images

        slot = self._slot(tenant)
        with self._lock:
            self._activate(slot)
            return encode_images(self.model, list(images), preprocess=self.preprocess)  # (n, D)

    def adapter_bytes(self) -> int:
        """Bytes held by the slots' own tensors (what each tenant adds to the one base)."""
        seen, total = set(), 0
        for slot in self._slots.values():
            tensors = [t for a, b, _ in slot.lora.values() for t in (a, b) if t is not None]
            for t in tensors + list(slot.full.values()):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total
