import json

import pytest
import torch
from conftest import TINY_VIT
from torch import nn

from mmft.config import LoraConfig, ModelConfig
from mmft.model.adapter import (
    AdapterMismatchError,
    adapter_digest,
    export,
    load_adapter,
    load_model,
    save_adapter,
)
from mmft.model.factory import create_model
from mmft.model.lora import apply_lora, has_adapter, set_lora_scale


def _tuned(cfg: ModelConfig, seed=0):
    torch.manual_seed(seed)
    model, _, _, tok = create_model(cfg)
    apply_lora(model, LoraConfig())
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                nn.init.normal_(p, std=0.05)
        model.logit_scale.add_(0.3)
        model.text_projection.add_(0.01 * torch.randn_like(model.text_projection))
    return model.eval(), tok


def _embed(model, tok):
    torch.manual_seed(5)
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32), tok(["a cat", "a red square", "two dogs"]))
    return out["image_features"], out["text_features"]


def test_save_load_round_trip_gives_identical_embeddings(tmp_path, tiny_vit_cfg):
    model, tok = _tuned(tiny_vit_cfg)
    save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["base_model"]["name"] == "tiny-vit" and meta["digest"] == adapter_digest(model)
    torch.manual_seed(0)
    fresh, _, _, _ = create_model(tiny_vit_cfg)  # same base (same seed), no adapter yet
    load_adapter(fresh, tmp_path / "ad")
    fresh.eval()
    for a, b in zip(_embed(model, tok), _embed(fresh, tok)):
        assert torch.equal(a, b)
    assert adapter_digest(fresh) == adapter_digest(model)


def test_adapter_on_wrong_base_is_refused(tmp_path, tiny_vit_cfg):
    model, _ = _tuned(tiny_vit_cfg)
    save_adapter(model, tmp_path / "ad")
    other = dict(TINY_VIT, embed_dim=16)
    wrong, *_ = create_model(ModelConfig(name="tiny-vit-16", model_cfg=other))
    with pytest.raises(AdapterMismatchError,
                       match="was trained on base tiny-vit.*but the model is tiny-vit-16"):
        load_adapter(wrong, tmp_path / "ad")
    # same architecture, different weights file: refused by sha256
    torch.save(create_model(tiny_vit_cfg)[0].state_dict(), tmp_path / "other.pt")
    other_weights, *_ = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT,
                                                 pretrained=str(tmp_path / "other.pt")))
    with pytest.raises(AdapterMismatchError, match="pretrained, sha256 differ"):
        load_adapter(other_weights, tmp_path / "ad")


def test_adapter_layout_mismatch_is_refused(tmp_path, tiny_vit_cfg):
    model, _ = _tuned(tiny_vit_cfg)
    save_adapter(model, tmp_path / "ad")
    torch.manual_seed(0)
    target, *_ = create_model(tiny_vit_cfg)
    cfg = LoraConfig()
    cfg.text.enabled = False
    apply_lora(target, cfg)
    with pytest.raises(AdapterMismatchError, match="does not fit this model's LoRA layout"):
        load_adapter(target, tmp_path / "ad")


def test_export_round_trip_through_open_clip(tmp_path, tiny_vit_cfg):
    import open_clip

    model, tok = _tuned(tiny_vit_cfg)
    path = export(model, tmp_path / "tiny-export.pt")
    open_clip.add_model_config(tmp_path / "tiny-export.json")
    plain = open_clip.create_model("tiny-export", pretrained=str(path)).eval()
    torch.manual_seed(5)
    x, t = torch.randn(3, 3, 32, 32), tok(["a cat", "a red square", "two dogs"])
    with torch.no_grad():
        img, txt = plain.encode_image(x, normalize=True), plain.encode_text(t, normalize=True)
    ref_img, ref_txt = _embed(model, tok)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-4)
    # the model given to export keeps its adapter
    assert has_adapter(model)


def test_export_at_lora_scale_and_as_next_base(tmp_path, tiny_vit_cfg):
    model, tok = _tuned(tiny_vit_cfg)
    path = export(model, tmp_path / "half.pt", lora_scale=0.5)
    set_lora_scale(model, 0.5)
    ref = _embed(model, tok)
    base, *_ = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT, pretrained=str(path)))
    base.eval()
    for a, b in zip(ref, _embed(base, tok)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    meta = json.loads((tmp_path / "half.mmft.json").read_text())
    assert meta["lora_scale"] == 0.5 and meta["adapter_digest"] == adapter_digest(model)


def test_export_mmft_mini_round_trip(tmp_path):
    model, _, _, tok = create_model(ModelConfig(image_size=64))
    apply_lora(model, LoraConfig())
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                nn.init.normal_(p, std=0.02)
    model.eval()
    path = export(model, tmp_path / "mini.pt")
    loaded, *_ = create_model(ModelConfig(image_size=64, pretrained=str(path)))
    loaded.eval()
    x = torch.randn(2, 3, 64, 64)
    t = tok(["a red apple", "a bicycle"])
    with torch.no_grad():
        a, b = model(x, t), loaded(x, t)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_load_model_from_run_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an mmft run directory"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))[0], tmp_path)


def _damage_adapter(folder, kind: str) -> None:
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    meta = json.loads(config.read_text())
    if kind == "truncated tensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "flipped byte":
        raw = bytearray(weights.read_bytes())
        raw[-7] ^= 0xFF
        weights.write_bytes(bytes(raw))
    elif kind == "missing tensors":
        weights.unlink()
    elif kind == "rank edited":
        meta["lora"]["image"]["rank"] = 4
    elif kind == "field of wrong type":
        meta["full"] = "text_projection"
    elif kind == "missing field":
        del meta["base_model"]
    elif kind == "broken json":
        config.write_text('{"format": "mmft-lora-1", ')
        return
    config.write_text(json.dumps(meta))


@pytest.mark.parametrize("kind", ["truncated tensors", "flipped byte", "missing tensors", "rank edited",
                                  "field of wrong type", "missing field", "broken json"])
def test_damaged_adapter_is_refused_in_one_sentence_naming_the_file(tmp_path, tiny_vit_cfg, kind):
    from mmft.model.adapter import AdapterLoadError

    model, _ = _tuned(tiny_vit_cfg)
    save_adapter(model, tmp_path / "ad")
    _damage_adapter(tmp_path / "ad", kind)
    torch.manual_seed(0)
    fresh, *_ = create_model(tiny_vit_cfg)
    with pytest.raises(AdapterLoadError) as exn:
        load_adapter(fresh, tmp_path / "ad")
    message = str(exn.value)
    assert str(tmp_path / "ad") in message and "\n" not in message


def test_base_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    from mmft.model.factory import ModelLoadError

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):  # unpickling would call open(marker, "w"), creating the file
            return (open, (str(marker), "w"))

    state = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))[0].state_dict()
    torch.save({**state, "extra": Payload()}, tmp_path / "base.pt")
    cfg = ModelConfig(name="tiny-vit", model_cfg=TINY_VIT, pretrained=str(tmp_path / "base.pt"))
    with pytest.raises(ModelLoadError,
                       match=r"base\.pt holds pickled Python objects .*weights_only=True") as exn:
        create_model(cfg)
    assert not marker.exists() and "\n" not in str(exn.value)
    torch.save(state, tmp_path / "base.pt")  # the same tensors as a plain state dict load
    assert create_model(cfg)[0].mmft_identity["sha256"]


def test_mmft_mini_adapter_moves_between_environments_and_old_adapters_load_where_made(tmp_path, monkeypatch):
    from conftest import move_packaged_text_tower

    from mmft.model.adapter import check_identity
    from mmft.model.factory import base_identity, mini_model_config

    model, *_ = create_model(ModelConfig(image_size=64))
    apply_lora(model, LoraConfig())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.02)
    save_adapter(model, tmp_path / "new")
    # an adapter saved before the digest left the install path out: its arch is this machine's old digest
    meta = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    old = {k: v for k, v in meta["base_model"].items() if k != "arch_legacy"}
    old["arch"] = meta["base_model"]["arch_legacy"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "new" / "adapter_model.safetensors").read_bytes())
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps({**meta, "base_model": old}))
    load_adapter(model, tmp_path / "old")
    # a base of another architecture is refused, under the new digest and under the old one alike
    for embed_dim, image_size in ((128, 64), (256, 96)):
        other = base_identity(ModelConfig(image_size=image_size, embed_dim=embed_dim),
                              mini_model_config(image_size, embed_dim))
        for arch in (other["arch"], other["arch_legacy"]):
            with pytest.raises(AdapterMismatchError, match=r"\(arch differ\)"):
                check_identity({**other, "arch": arch}, model, "the adapter")
    move_packaged_text_tower(tmp_path, monkeypatch)  # the same base in a virtual environment elsewhere
    there, *_ = create_model(ModelConfig(image_size=64))
    load_adapter(there, tmp_path / "new")
    assert adapter_digest(there) == adapter_digest(model)
    with pytest.raises(AdapterMismatchError, match=r"\(arch differ\)"):  # the old digest names the old path
        load_adapter(there, tmp_path / "old")
