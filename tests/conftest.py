"""Shared fixtures: tiny random dual encoders of each tower type and tiny generated image-text pairs."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30),
          "purple": (140, 40, 170), "orange": (240, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245)}
SHAPES = ("square", "circle")


@pytest.fixture
def tiny_vit_cfg():
    from mmft.config import ModelConfig

    return ModelConfig(name="tiny-vit", model_cfg=TINY_VIT)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random BERT saved as a local Hugging Face folder, with the MiniLM tokenizer files."""
    import shutil

    from transformers import BertConfig, BertModel

    from mmft.model.factory import packaged_tower_paths

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(out)
    _, minilm = packaged_tower_paths()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, out / name)
    return out


def tiny_timm_hf_config(hf_dir) -> dict:
    """timm ViT image tower + Hugging Face BERT text tower, both tiny and random."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": str(hf_dir), "hf_tokenizer_name": str(hf_dir),
                     "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 16},
    }


def move_packaged_text_tower(tmp_path, monkeypatch):
    """From now on the factory finds mmft-mini's packaged MiniLM folder elsewhere (a symlink under
    tmp_path), as in a virtual environment at another path; returns that folder."""
    from mmft.model import factory

    eff, text = factory.packaged_tower_paths()
    moved = tmp_path / "elsewhere" / "site-packages" / "model"
    moved.parent.mkdir(parents=True)
    moved.symlink_to(text, target_is_directory=True)
    monkeypatch.setattr(factory, "packaged_tower_paths", lambda: (eff, moved))
    return moved


def make_pairs(n: int, size: int = 32, seed: int = 0):
    """n (PIL image, caption, group) triples: a coloured shape on a grey ground, captioned by colour and
    shape."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    names = list(COLORS)
    for i in range(n):
        color, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
        img = Image.new("RGB", (size, size), (128, 128, 128))
        d = ImageDraw.Draw(img)
        off = rng.randint(0, size // 4)
        box = (off, off, off + size // 2, off + size // 2)
        (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
        out.append((img, f"a {color} {shape}", f"{color}-{shape}"))
    return out


def pair_batches(model_preprocess, tokenizer, pairs, batch_size: int, with_groups: bool = False):
    """Training batches {"image", "text"[, "group"]} from make_pairs output."""
    batches = []
    for s in range(0, len(pairs) - batch_size + 1, batch_size):
        chunk = pairs[s:s + batch_size]
        b = {"image": torch.stack([model_preprocess(p[0]) for p in chunk]),
             "text": tokenizer([p[1] for p in chunk])}
        if with_groups:
            codes = {g: i for i, g in enumerate(sorted({p[2] for p in pairs}))}
            b["group"] = torch.tensor([codes[p[2]] for p in chunk])
        batches.append(b)
    return batches


def eval_batches(preprocess, pairs, batch_size: int = 16):
    """Eval batches {"image", "captions", "key"} from make_pairs output."""
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        out.append({"image": torch.stack([preprocess(p[0]) for p in chunk]),
                    "captions": [[p[1]] for p in chunk], "key": [str(s + i) for i in range(len(chunk))],
                    "group": [p[2] for p in chunk]})
    return out


def adapted_run_dir(tmp_path, seed: int):
    """A run directory (config.yaml + adapter-last) holding a tiny tuned model, without training.

    The base is saved to a checkpoint file so that load_model rebuilds the same base. Returns
    (run_dir, model, preprocess_val, tokenizer).
    """
    from mmft.config import Config, LoraConfig, ModelConfig
    from mmft.model.adapter import save_adapter
    from mmft.model.factory import create_model
    from mmft.model.lora import apply_lora
    from mmft.rundir import RunDir

    torch.manual_seed(seed)
    base = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))[0]
    torch.save(base.state_dict(), tmp_path / "base.pt")
    mcfg = ModelConfig(name="tiny-vit", model_cfg=TINY_VIT, pretrained=str(tmp_path / "base.pt"))
    model, _, preprocess, tok = create_model(mcfg)
    apply_lora(model, LoraConfig())
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    run = RunDir(tmp_path / "run")
    run.write_config(Config(model=mcfg))
    save_adapter(model, run.adapter("last"))
    return run.path, model, preprocess, tok


class Stop(Exception):
    """What stop_after_checkpoint raises: a kill right after a checkpoint was written."""


def stop_after_checkpoint(step: int):
    """A replacement for Checkpointer.save that raises Stop right after writing checkpoint `step`."""
    from mmft.training.state import Checkpointer

    orig = Checkpointer.save

    def save(self, state, at):
        path = orig(self, state, at)
        if at == step:
            raise Stop
        return path

    return save
