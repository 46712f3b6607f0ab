"""Run configuration: dataclasses hold the schema, YAML holds the values, dotted overrides tweak them.

    cfg = load_config("configs/domain.yaml", ["train.lr=1e-4", "lora.image.rank=16"])

An unknown key or a value of the wrong type is a `ConfigError` that names the key.
"""
from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    # open_clip model name ("ViT-B-32"), or "mmft-mini" for the offline default base.
    name: str = "mmft-mini"
    # open_clip pretrained tag ("laion2b_s34b_b79k") or a local checkpoint file; None = random init
    # (mmft-mini: the packaged pretrained towers with fresh projections).
    pretrained: str | None = None
    # A custom open_clip model config (embed_dim, vision_cfg, text_cfg), registered under `name`.
    model_cfg: dict | None = None
    image_size: int | None = None  # override the model's input resolution (pixels)
    embed_dim: int | None = None  # mmft-mini: width of the shared embedding space (default 256)
    cache_dir: str | None = None  # where open_clip caches downloaded weights


@dataclass
class LoraTowerConfig:
    enabled: bool = True
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module-name suffixes to adapt; empty = the tower type's default (see mmft.model.lora.DEFAULT_TARGETS).
    targets: list[str] = field(default_factory=list)
    # Regex a module's full name must match too (e.g. "blocks\\.[3-6]\\." or "layer\\.(4|5)\\."); "" = all.
    layers: str = ""


@dataclass
class LoraConfig:
    image: LoraTowerConfig = field(default_factory=LoraTowerConfig)
    text: LoraTowerConfig = field(default_factory=LoraTowerConfig)
    # Regexes of parameter names trained in full besides the adapters (projections, temperature).
    unfreeze: list[str] = field(
        default_factory=lambda: ["logit_scale", "logit_bias", r"^visual\.proj$", r"^visual\.head\.",
                                 r"^text\.proj", r"text_projection"]
    )


@dataclass
class DataConfig:
    # Shard specs: brace patterns, lists, local paths, URLs or "pipe:" commands, as webdataset reads them.
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    train_weights: list[float] = field(default_factory=list)  # one per train spec: mixture weights
    resampled: bool = False  # sample shards with replacement forever (needed for weighted mixtures)
    caption_key: str = "txt"  # "txt" (one caption per line) or "json"
    caption_field: str = "caption"  # json field holding a caption or a list of captions
    group_field: str = ""  # json field with a group/label id ("" = none)
    batch_size: int = 64
    num_workers: int = 2
    shuffle_buffer: int = 1000
    epoch_samples: int = 0  # samples per epoch when no sizes.json is found and counting is unwanted
    # Training augmentation for open_clip's preprocess_train.
    augment_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    augment_color_jitter: float = 0.0
    augment_hflip: bool = False
    # Mined hard negatives (`mmft mine` output): each batch also carries K of every sample's mined
    # images and captions as extra negatives (mmft.data.negatives). "" = none.
    hard_negatives: str = ""
    negatives_per_sample: int = 4  # K, at most the k that was mined
    # Re-mine the negatives with the model being trained every N epochs (into the run directory); 0 = never.
    remine_every: int = 0
    # Ship augmented images from the workers as uint8; the trainer converts and normalises on its device.
    uint8_images: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/mmft"
    steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 1.0
    lr: float = 5e-4
    head_lr: float = 0.0  # lr for fully trained (unfrozen) parameters; 0 = same as lr
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    accum_steps: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 only on CUDA)
    seed: int = 0
    loss: str = "auto"  # auto | infonce | sigmoid
    loss_impl: str = "auto"  # auto | reference | chunked | triton
    use_groups: bool = True  # mask same-group pairs out of the negatives when the data has groups
    log_every: int = 10
    val_every: int = 0  # steps between validations; 0 = only at the end
    val_metric: str = "mean"  # mean of R@1 and R@5, both directions (steadier than R@1 alone)
    early_stop_patience: int = 0  # validations without improvement before stopping; 0 = never
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at validations and the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in output_dir
    # Recompute activations in backward instead of storing them: less peak memory, ~one more forward.
    activation_checkpointing: bool = False
    tensorboard: bool = False  # also write TensorBoard events to <output_dir>/tensorboard (mmft[tensorboard])
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Start from another run's adapter on the same base (e.g. heads of a head-only run: LP-FT). "" = fresh.
    init_adapter: str = ""
    # Frozen towers (head-only training): embed the trunks once and train the heads on cached features.
    cache_features: bool = False
    # Gradient caching: embed each batch in micro-batches without autograd, take the loss and its gradient
    # w.r.t. the embeddings over the whole batch, then re-run each micro-batch with autograd (equal
    # gradients, activation memory of one micro-batch; docs/training.md).
    grad_cache: bool = False
    micro_batch_size: int = 0  # samples per micro-batch with grad_cache (its extras come along)


@dataclass
class EvalConfig:
    domain: list[str] = field(default_factory=list)  # shard specs of the domain test split
    general: list[str] = field(default_factory=list)  # shard specs of a general split (forgetting)
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    bootstrap: int = 1000
    lora_scales: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    max_general_drop: float = 2.0  # recall points of GENERAL R@5 a recommended LoRA scale may lose
    batch_size: int = 128
    # Search goes through an index built with the `index` section (factory, fp16, nprobe, train_sample).


@dataclass
class IndexConfig:
    # FAISS factory string; "" = chosen from the gallery size (exact Flat below 250,000 vectors).
    # Evaluation searches with it too, reporting exact recall beside it when it is approximate.
    factory: str = ""
    lora_scale: float = 1.0
    fp16: bool = False
    train_sample: int = 100_000  # vectors used to train IVF/PQ
    nprobe: int = 0  # 0 = factory default
    use_gpu: str = "auto"  # auto | never | always
    thumbnails: int = 128  # side (px) of the JPEG thumbnails saved beside the index (mmft serve); 0 = none
    # Tuning (mmft.index.tuning): > 0 = measure candidate indexes on held-out queries and keep the
    # fastest whose recall@10 meets this target within the budgets ("2GB"; ms per query; 0 = none).
    target_recall: float = 0.0
    max_memory: str = ""
    max_latency_ms: float = 0.0
    heldout: int = 1000  # held-out queries recall is measured on (saved with the index)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` coerced to `tp` where that is lossless (int -> float), else raise naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _check_type(key, value, opt)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' expects {tp}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_type(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a nested dict, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping, "
                          f"got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = prefix + str(key)
        if key not in known:
            raise ConfigError(f"unknown config key '{full}' (known keys here: {', '.join(sorted(known))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, full + ".")
        else:
            kwargs[key] = _check_type(full, value, tp)
    return cls(**kwargs)


def _migrate(values: dict) -> dict:
    """Read configs of earlier mmft versions: `eval.factory` became `index.factory`.

    Evaluation now searches with the index settings. The old default `Flat` is dropped (an empty
    index.factory picks Flat below 250,000 vectors); another value moves to index.factory.
    """
    ev = values.get("eval")
    if not isinstance(ev, dict) or "factory" not in ev:
        return values
    old = ev["factory"]
    index = values.get("index") if isinstance(values.get("index"), dict) else {}
    values = {**values, "eval": {k: v for k, v in ev.items() if k != "factory"}}
    if old in ("Flat", index.get("factory") or "Flat"):
        return values
    if index.get("factory"):
        raise ConfigError(f"config key 'eval.factory' ({old!r}) is now 'index.factory', which this config "
                          f"also sets ({index['factory']!r}): keep one value under index.factory")
    logging.getLogger("mmft.config").warning(
        "config key 'eval.factory' is now 'index.factory' (evaluation searches with the index settings); "
        "reading %r as index.factory", old)
    return {**values, "index": {**index, "factory": old}}


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """["train.lr=1e-4", "data.train=[a.tar,b.tar]"] -> nested dict; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML run config (None = all defaults) and apply dotted overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        values = yaml.safe_load(p.read_text()) or {}
    values = _merge(values, parse_overrides(overrides or []))
    return _build(Config, _migrate(values), "")


def config_from_dict(values: dict) -> Config:
    """A Config from a nested dict, validated like a YAML file."""
    return _build(Config, _migrate(values), "")


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of any config dataclass (for run directories and manifests)."""
    return dataclasses.asdict(cfg)
