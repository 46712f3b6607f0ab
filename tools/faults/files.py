"""Damaged artifacts: each must be refused in one sentence naming it, never a traceback from a library.

Every case builds a good artifact once, copies it per variant, damages the copy the way a crash, a
full disk, a bad copy or a hand edit would, and loads it through mmft's public loader.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from faults.common import TINY_VIT, Outcome, PicklePayload, expect_refusal


def _variants(good: Path, work: Path, damage: dict[str, Callable[[Path], None]], load, error) -> Outcome:
    out = Outcome()
    for label, hurt in damage.items():
        copy = work / label.replace(" ", "-")
        shutil.copytree(good, copy)
        hurt(copy)
        out.add(expect_refusal(lambda c=copy: load(c), error, copy, label))
    return out


def _edit_json(name: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Damage by editing the parsed JSON in place (what `edit` returns is ignored)."""
    def hurt(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))
    return hurt


def _wrap_in_list(name: str) -> Callable[[Path], None]:
    def hurt(folder: Path) -> None:
        (folder / name).write_text(json.dumps([json.loads((folder / name).read_text())]))
    return hurt


def _truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def hurt(folder: Path) -> None:
        raw = (folder / name).read_bytes()
        (folder / name).write_bytes(raw[: int(len(raw) * keep)])
    return hurt


def _flip_byte(name: str, offset: int = -7) -> Callable[[Path], None]:
    def hurt(folder: Path) -> None:
        raw = bytearray((folder / name).read_bytes())
        raw[offset] ^= 0xFF
        (folder / name).write_bytes(bytes(raw))
    return hurt


# ---------------------------------------------------------------- index


def _good_index(work: Path) -> Path:
    import numpy as np

    from mmft.config import IndexConfig
    from mmft.index.core import build_index

    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    build_index(x, work / "good", index_cfg=IndexConfig(factory="Flat"))
    return work / "good"


def _load_index(path: Path):
    from mmft.index.core import load_index

    return load_index(path)


def _index_case(work: Path, damage: dict) -> Outcome:
    from mmft.index.core import IndexLoadError

    return _variants(_good_index(work), work, damage, _load_index, IndexLoadError)


def _truncated_to_match(folder: Path) -> None:
    """index.faiss cut short and its recorded size edited to match: only FAISS itself can tell."""
    _truncate("index.faiss", 0.3)(folder)
    size = (folder / "index.faiss").stat().st_size
    _edit_json("manifest.json", lambda m: m["files"].__setitem__("index.faiss", size))(folder)


def index_truncated(work: Path) -> Outcome:
    return _index_case(work, {"index.faiss cut in half": _truncate("index.faiss"),
                              "index.faiss cut, recorded size edited": _truncated_to_match})


def index_missing_ids(work: Path) -> Outcome:
    return _index_case(work, {"ids.json deleted": lambda f: (f / "ids.json").unlink()})


def index_edited_manifest(work: Path) -> Outcome:
    return _index_case(work, {
        "count lowered": _edit_json("manifest.json", lambda m: m.__setitem__("count", m["count"] - 1)),
        "nprobe a string": _edit_json("manifest.json", lambda m: m.__setitem__("nprobe", "all")),
        "format a string": _edit_json("manifest.json", lambda m: m.__setitem__("format", "1")),
        "dim removed": _edit_json("manifest.json", lambda m: m.pop("dim")),
        "files a list": _edit_json("manifest.json", lambda m: m.__setitem__("files", ["index.faiss"])),
        "manifest a list": _wrap_in_list("manifest.json"),
        "manifest not JSON": lambda f: (f / "manifest.json").write_text('{"format": 1, '),
    })


# ---------------------------------------------------------------- embeddings


def _tiny_model():
    import torch

    from mmft.config import ModelConfig
    from mmft.model.factory import create_model

    torch.manual_seed(0)
    model, _, _, tokenizer = create_model(ModelConfig(name="tiny-vit-faults", model_cfg=TINY_VIT))
    return model, tokenizer


def _interrupted(folder: Path) -> None:
    """What a kill during `embed(out_dir=...)` leaves: parts, no joined arrays' manifest."""
    (folder / "manifest.json").unlink()
    (folder / "parts").mkdir()
    (folder / "parts" / "part-00000.npz").write_bytes(b"PK\x03\x04 cut short")


def _pickled_array(folder: Path) -> None:
    import numpy as np

    np.save(folder / "caption_image.npy", np.array([{"payload": 1}], dtype=object), allow_pickle=True)


def embeddings_partial(work: Path) -> Outcome:
    import torch

    from mmft.embeddings import Embeddings, EmbeddingsError, embed

    model, tokenizer = _tiny_model()
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(6, 3, 32, 32, generator=g), "key": [f"k{b}{i}" for i in range(6)],
                "captions": [[f"caption {i}", f"other {i}"] for i in range(6)], "group": None}
               for b in range(3)]
    embed(model, batches, tokenizer=tokenizer, out_dir=work / "good", progress=False)
    return _variants(work / "good", work, {
        "interrupted (parts, no manifest)": _interrupted,
        "text.npy missing": lambda f: (f / "text.npy").unlink(),
        "image.npy cut in half": _truncate("image.npy"),
        "items.json short of a key": _edit_json("items.json", lambda d: d["keys"].pop()),
        "caption_image.npy holds pickles": _pickled_array,
    }, Embeddings.load, EmbeddingsError)


# ---------------------------------------------------------------- adapter and base checkpoint


def adapter_mismatch(work: Path) -> Outcome:
    from mmft.config import LoraConfig
    from mmft.model.adapter import AdapterLoadError, load_adapter, save_adapter
    from mmft.model.lora import apply_lora

    model, _ = _tiny_model()
    apply_lora(model, LoraConfig())
    save_adapter(model, work / "good")

    def load(folder: Path):
        return load_adapter(_tiny_model()[0], folder)

    config = "adapter_config.json"
    return _variants(work / "good", work, {
        "rank edited in the config": _edit_json(config, lambda m: m["lora"]["image"].update(rank=4)),
        "image LoRA switched off": _edit_json(config, lambda m: m["lora"]["image"].update(enabled=False)),
        "a tensor byte flipped": _flip_byte("adapter_model.safetensors"),
        "tensors cut in half": _truncate("adapter_model.safetensors"),
        "config field of wrong type": _edit_json(config, lambda m: m.__setitem__("full", "logit_scale")),
    }, load, AdapterLoadError)


def checkpoint_pickle(work: Path) -> Outcome:
    import torch

    from mmft.config import ModelConfig
    from mmft.model.factory import ModelLoadError, create_model

    model, _ = _tiny_model()
    marker = work / "payload-ran"
    (work / "base").mkdir()
    torch.save({**model.state_dict(), "extra": PicklePayload(marker)}, work / "base" / "model.pt")
    cfg = ModelConfig(name="tiny-vit-faults", model_cfg=TINY_VIT, pretrained=str(work / "base" / "model.pt"))
    out = expect_refusal(lambda: create_model(cfg), ModelLoadError, work / "base", "pickle payload")
    if marker.exists():
        out.survived = 0
        out.crashes += 1
        out.notes.append("the payload ran")
    return out
