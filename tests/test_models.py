import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_timm_hf_config

from mmft.config import ModelConfig
from mmft.model.factory import ModelLoadError, create_model, model_identity, packaged_tower_paths


def test_mmft_mini_loads_packaged_image_weights():
    model, _, _, _ = create_model(ModelConfig())
    eff_path, _ = packaged_tower_paths()
    src = torch.load(eff_path, map_location="cpu", weights_only=True)
    trunk = model.visual.trunk.state_dict()
    # every trunk tensor equals the packaged file's tensor at the same position
    for (name, t), (src_name, s) in zip(trunk.items(), list(src.items())[: len(trunk)]):
        assert torch.equal(t, s), (name, src_name)
    assert model.visual.preprocess_cfg["mean"] == (0.5, 0.5, 0.5)


def test_mmft_mini_imagenet_head_recognises_a_synthetic_class():
    """The packaged file's classifier, loaded into timm's model, is a working ImageNet head."""
    import timm

    from mmft.model.factory import load_packaged_efficientnet

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    n = load_packaged_efficientnet(net, packaged_tower_paths()[0])
    assert n == len(net.state_dict())
    x = torch.zeros(2, 3, 224, 224)
    x[1].uniform_(-1, 1)
    with torch.no_grad():
        probs = net(x).softmax(-1)
    # a trained head is confident on some class; a random head spreads ~1/1000 everywhere
    assert probs.max().item() > 0.05


def test_mmft_mini_text_tower_is_pretrained_minilm():
    from transformers import AutoModel

    model, *_ = create_model(ModelConfig())
    _, text_dir = packaged_tower_paths()
    ref = AutoModel.from_pretrained(str(text_dir))
    ours = model.text.transformer.state_dict()
    for name, t in ref.state_dict().items():
        if name in ours:
            assert torch.equal(ours[name], t), name


def test_mmft_mini_embeds_offline():
    from PIL import Image

    model, _, preprocess_val, tokenizer = create_model(ModelConfig())
    model.eval()
    img = preprocess_val(Image.new("RGB", (200, 150), (200, 30, 30)))[None]
    with torch.no_grad():
        out = model(img, tokenizer(["a red square", "a cat"]))
    assert out["image_features"].shape == (1, 256) and out["text_features"].shape == (2, 256)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(1), atol=1e-5)


def test_identity_records_weights(tmp_path, tiny_vit_cfg):
    model, *_ = create_model(tiny_vit_cfg)
    ident = model_identity(model)
    assert ident["name"] == "tiny-vit" and ident["arch"]
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    loaded, *_ = create_model(ModelConfig(name="tiny-vit", model_cfg=tiny_vit_cfg.model_cfg,
                                          pretrained=str(path)))
    assert model_identity(loaded)["sha256"] and model_identity(loaded)["pretrained"] == "w.pt"
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_local_checkpoint_for_builtin_name(tmp_path):
    import open_clip

    ref = open_clip.create_model("RN50")
    path = tmp_path / "rn50.pt"
    torch.save(ref.state_dict(), path)
    model, *_ = create_model(ModelConfig(name="RN50", pretrained=str(path)))
    assert torch.equal(model.visual.conv1.weight, ref.visual.conv1.weight)


def test_timm_and_hf_towers_from_model_config(tiny_hf_dir):
    model, _, _, tok = create_model(ModelConfig(name="tiny-timm-hf",
                                                model_cfg=tiny_timm_hf_config(tiny_hf_dir)))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224), tok(["a", "b c"]))
    assert out["image_features"].shape == (2, 32)


def test_offline_pretrained_tag_fails_fast_with_one_sentence():
    import time

    t = time.perf_counter()
    with pytest.raises(ModelLoadError, match="no network.*local checkpoint file"):
        create_model(ModelConfig(name="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    assert time.perf_counter() - t < 30


def test_bad_names_are_refused():
    with pytest.raises(ModelLoadError, match="unknown model 'ViT-Z-99'"):
        create_model(ModelConfig(name="ViT-Z-99"))
    with pytest.raises(ModelLoadError, match="neither a file nor a known tag"):
        create_model(ModelConfig(name="ViT-B-32", pretrained="/no/such/file.pt"))


def test_model_config_folder_is_removed_at_exit(tmp_path):
    # Registering a custom architecture writes a JSON config for open_clip; the folder must not outlive
    # the process (one leaked folder per training or eval run adds up).
    script = (
        "import sys, mmft.model.factory as m\n"
        "m.register_model_config('mmft-exit-check', {'embed_dim': 8})\n"
        "print(m._REGISTRY_DIR)\n"
        "assert (m._REGISTRY_DIR / 'mmft-exit-check.json').is_file()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    folder = Path(out.stdout.strip())
    assert folder.name.startswith("mmft-model-configs-")
    assert not folder.exists()


def test_trimmed_tokens_give_the_features_of_full_length_tokens():
    # Fast path (batches cut at their longest caption) against the reference (padded to the context
    # length), on mmft-mini's real MiniLM tower with mean pooling, also with LoRA on the text tower.
    from mmft.config import LoraConfig
    from mmft.model.factory import PaddingTrimTokenizer
    from mmft.model.lora import apply_lora

    model, _, _, tokenizer = create_model(ModelConfig())
    assert isinstance(tokenizer, PaddingTrimTokenizer)
    captions = ["a red square", "a very long caption about a small brown dog sitting on a green lawn", "cat"]
    short, full = tokenizer(captions), tokenizer.tokenizer(captions)
    assert full.shape[1] == tokenizer.context_length > short.shape[1] >= 15
    assert torch.equal(short, full[:, :short.shape[1]]) and not (full[:, short.shape[1]:] != 0).any()
    apply_lora(model, LoraConfig())
    with torch.no_grad():
        for p in model.text.parameters():  # non-zero adapters, so the LoRA path is exercised too
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_text(short), model.encode_text(full), atol=1e-5)


def test_open_clip_text_transformer_keeps_the_context_length(tiny_vit_cfg):
    _, _, _, tokenizer = create_model(tiny_vit_cfg)
    assert tokenizer(["a cat"]).shape[1] == tiny_vit_cfg.model_cfg["text_cfg"]["context_length"]


def test_mmft_mini_identity_does_not_depend_on_where_its_towers_are_installed(tmp_path, monkeypatch):
    from conftest import move_packaged_text_tower

    from mmft.model.factory import base_identity, mini_model_config
    from mmft.model.identity import same_base

    here = base_identity(ModelConfig(), mini_model_config())
    moved = move_packaged_text_tower(tmp_path, monkeypatch)
    arch = mini_model_config()
    assert arch["text_cfg"]["hf_model_name"] == str(moved)
    there = base_identity(ModelConfig(), arch)
    assert there["arch"] == here["arch"] and there["sha256"] == here["sha256"] and same_base(here, there)
    # the path-bearing digest recorded before is this machine's own, and differs between the two
    assert there["arch_legacy"] != here["arch_legacy"] != here["arch"]
    # a Hugging Face folder the user names stays part of the architecture (only the packaged path is a token)
    own = {**arch, "text_cfg": {**arch["text_cfg"], "hf_model_name": str(tmp_path / "my-minilm")}}
    assert base_identity(ModelConfig(), own)["arch"] != there["arch"]
