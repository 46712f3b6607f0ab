"""The `mmft serve` config: one base model, any number of tenants (adapter + index), and the service knobs.

    cfg = load_serve_config("configs/serve.yaml", ["batching.max_wait_ms=5", "tenants.tuned.token=env:TOK"])

Validated like the training config (mmft.config): an unknown key or a wrong type is a ConfigError
naming the key. `tenants` is a mapping name -> TenantConfig. The tenant "baseline" is reserved: it is
always the base model at LoRA scale 0 (section `baseline`), so every tuned answer can be compared with
what the frozen model returns. `check_config` refuses, without loading torch, an index whose manifest
does not match its adapter, with the same sentence `load_index` uses.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmft.config import ConfigError, _build, _merge, parse_overrides

BASELINE = "baseline"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class BaseModelConfig:
    backend: str = "torch"  # torch (mmft.serve.torch_encoder) | onnx (mmft.bundle, no torch)
    run: str = ""  # a run directory whose config.yaml names the base ("" = the first tenant's run)
    model: dict = field(default_factory=dict)  # or the base as ModelConfig fields (name, pretrained, ...)
    bundle: str = ""  # backend onnx: the exported bundle folder
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads per worker process; 0 = torch's default
    process: bool = True  # run the encoder in a child process of each worker: the model never holds the GIL


@dataclass
class TenantConfig:
    run: str = ""  # a run directory: its adapter-best (adapter-last when it kept no best)
    adapter: str = ""  # or an adapter directory; neither = the base model itself
    lora_scale: float = 1.0
    index: str = ""  # image gallery index folder (text -> image and image -> image search)
    text_index: str = ""  # caption gallery index (image -> text); "" = the thumbnail store's captions
    token: str = ""  # bearer token for this tenant ("env:NAME" reads the variable NAME); "" = open


@dataclass
class BaselineConfig:
    enabled: bool = True
    index: str = ""  # the same gallery embedded by the base model (mmft index build --lora-scale 0)
    text_index: str = ""
    token: str = ""


@dataclass
class BatchingConfig:
    enabled: bool = True  # false: every query is encoded and searched alone (the unbatched reference)
    max_batch: int = 64  # queries encoded together at most
    max_wait_ms: float = 2.0  # how long the first query of a batch waits for company


@dataclass
class LimitsConfig:
    default_k: int = 10
    max_k: int = 100
    max_query_chars: int = 512
    max_body_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # decoded size refused above this (decompression bombs)
    request_timeout_s: float = 10.0
    max_caption_gallery: int = 200_000  # captions embedded at load when a tenant has no text_index


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1  # uvicorn worker processes; indexes are memory-mapped, so they share one copy
    mmap: bool = True  # memory-map FAISS files (IndexFlat codes, IVF lists) instead of reading them
    state_dir: str = ""  # reload generation + Prometheus files shared by the workers ("" = a temp folder)
    access_log: str = ""  # JSON-lines access log file ("" = the 'mmft.serve.access' logger on stderr)
    log_queries: bool = False  # put query texts in the access log
    reload_poll_s: float = 1.0  # how often a worker checks whether another one reloaded


@dataclass
class AuthConfig:
    admin_token: str = ""  # needed by /admin/*; "" = admin endpoints off ("env:NAME" reads a variable)


@dataclass
class FeedbackConfig:
    path: str = "runs/feedback.jsonl"  # POST /feedback appends here; "" = feedback off


@dataclass
class ServeConfig:
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    tenants: dict = field(default_factory=dict)  # name -> TenantConfig
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)


def serve_config_from_dict(values: dict) -> ServeConfig:
    """A ServeConfig from a nested dict, validated key by key (tenants too)."""
    cfg = _build(ServeConfig, values or {}, "")
    tenants = {}
    for name, tvalues in (cfg.tenants or {}).items():
        name = str(name)
        if name == BASELINE:
            raise ConfigError("tenant name 'baseline' is reserved for the base model at LoRA scale 0; "
                              "configure it in the 'baseline' section or rename the tenant")
        if not _NAME_RE.match(name):
            raise ConfigError(f"tenant name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        tenants[name] = _build(TenantConfig, tvalues or {}, f"tenants.{name}.")
    cfg.tenants = tenants
    _check_values(cfg)
    return cfg


def _check_values(cfg: ServeConfig) -> None:
    lim, bat = cfg.limits, cfg.batching
    positive = {"limits.max_k": lim.max_k, "limits.default_k": lim.default_k, "limits.max_query_chars":
                lim.max_query_chars, "limits.max_body_bytes": lim.max_body_bytes, "batching.max_batch":
                bat.max_batch, "server.workers": cfg.server.workers, "limits.request_timeout_s":
                lim.request_timeout_s, "limits.max_image_pixels": lim.max_image_pixels}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    if lim.default_k > lim.max_k:
        raise ConfigError(f"limits.default_k={lim.default_k} is over limits.max_k={lim.max_k}")
    if bat.max_wait_ms < 0:
        raise ConfigError(f"batching.max_wait_ms={bat.max_wait_ms} must be 0 or more")
    if cfg.base.backend not in ("torch", "onnx"):
        raise ConfigError(f"base.backend={cfg.base.backend!r} is not one of 'torch', 'onnx'")
    for name, t in cfg.tenants.items():
        if t.run and t.adapter:
            raise ConfigError(f"tenant '{name}' sets both run and adapter; give one of them")
        if not t.index:
            raise ConfigError(f"tenant '{name}' has no index: set tenants.{name}.index to an index folder")
    if not cfg.tenants and not (cfg.baseline.enabled and cfg.baseline.index):
        raise ConfigError("the config serves nothing: add a tenant under 'tenants' or set baseline.index")


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServeConfig:
    """Read a serve YAML (None = all defaults) and apply dotted overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"serve config file '{p}' does not exist")
        values = yaml.safe_load(p.read_text()) or {}
    return serve_config_from_dict(_merge(values, parse_overrides(overrides or [])))


def resolve_secret(value: str, what: str) -> str:
    """A token as configured: 'env:NAME' reads the environment variable NAME; anything else is the token."""
    if not value.startswith("env:"):
        return value
    name = value[4:]
    secret = os.environ.get(name, "")
    if not secret:
        raise ConfigError(f"{what} reads the environment variable {name}, which is not set: export it "
                          "before starting the server")
    return secret


def tenant_adapter(t: TenantConfig) -> Path | None:
    """The adapter directory a tenant serves (None = the base model)."""
    if t.adapter:
        return Path(t.adapter)
    if t.run:
        from mmft.rundir import RunDir

        return RunDir(t.run).find_adapter("best")
    return None


def base_model_source(cfg: ServeConfig) -> str | dict:
    """Where the base model comes from: base.model fields, base.run, or the first tenant's run."""
    if cfg.base.model:
        return dict(cfg.base.model)
    if cfg.base.run:
        return cfg.base.run
    runs = [t.run for t in cfg.tenants.values() if t.run]
    if not runs:
        raise ConfigError("no base model: set base.run (a run directory) or base.model (model fields), or "
                          "give a tenant a run directory")
    return runs[0]


# ---------------------------------------------------------------- start-up check without torch


def _adapter_meta(path: Path, tenant: str) -> dict:
    cfg = path / "adapter_config.json"
    if not cfg.is_file() and (path / "manifest.json").is_file():  # an exported bundle (base.backend: onnx)
        from mmft.bundle.manifest import read_manifest

        bundle = read_manifest(path, verify=False)
        return {"base_model": bundle["base_model"], "digest": bundle.get("adapter_sha256")}
    if not cfg.is_file():
        raise ConfigError(f"tenant '{tenant}': no adapter in '{path}' (adapter_config.json is missing); "
                          "point run at a finished training run or adapter at an adapter folder")
    return json.loads(cfg.read_text())


def check_config(cfg: ServeConfig) -> None:
    """Refuse a config whose indexes were not built by their tenant's adapter, before any model loads.

    Compares each index manifest with the adapter's recorded digest and base identity (and the baseline
    index with the shared base), raising StaleIndexError with load_index's sentence.
    """
    from mmft.index.manifest import check_fingerprint, read_manifest
    from mmft.model.identity import same_base

    if cfg.base.backend != "torch":  # other backends' adapters are their own folders: checked at load
        return
    base_ident = None
    for name, t in cfg.tenants.items():
        adapter = tenant_adapter(t)
        meta = _adapter_meta(adapter, name) if adapter is not None else None
        if meta is not None:
            if base_ident is not None and not same_base(meta.get("base_model"), base_ident):
                raise ConfigError(f"tenant '{name}' was trained on another base model than the tenants "
                                  "before it: one service shares one base; serve it from a second service")
            base_ident = meta.get("base_model")
        scaled = meta is not None and t.lora_scale != 0.0
        for where in filter(None, (t.index, t.text_index)):
            manifest = read_manifest(Path(where))
            current = {"model": meta.get("base_model") if meta else manifest.get("model"),
                       "adapter_sha256": meta.get("digest") if scaled else None,
                       "lora_scale": float(t.lora_scale) if scaled else None}
            check_fingerprint(manifest, current, where)
    if cfg.baseline.enabled:
        for where in filter(None, (cfg.baseline.index, cfg.baseline.text_index)):
            manifest = read_manifest(Path(where))
            current = {"model": base_ident or manifest.get("model"), "adapter_sha256": None,
                       "lora_scale": None}
            check_fingerprint(manifest, current, where)
