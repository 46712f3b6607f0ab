import copy

import pytest
import torch
from conftest import tiny_timm_hf_config
from torch import nn

from mmft.config import LoraConfig, LoraTowerConfig, ModelConfig
from mmft.model.factory import create_model
from mmft.model.lora import (
    LoRAConv2d,
    LoRALinear,
    LoRAMultiheadAttention,
    apply_lora,
    get_lora_scale,
    has_adapter,
    lora_scale,
    lora_state,
    merge_lora,
    set_lora_scale,
    tower_bodies,
    train_mode,
)


def _build(kind, tiny_hf_dir):
    if kind == "open_clip_vit":
        from conftest import TINY_VIT

        return create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT)), 32
    if kind == "timm_vit_hf_bert":
        return create_model(ModelConfig(name="tiny-timm-hf", model_cfg=tiny_timm_hf_config(tiny_hf_dir))), 224
    return create_model(ModelConfig(image_size=64)), 64  # mmft-mini: EfficientNet 1x1 convs + MiniLM


TOWERS = ["open_clip_vit", "timm_vit_hf_bert", "mmft_mini_cnn"]


def _forward(model, size, tok):
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    t = tok(["a red square", "two dogs on a mat"])
    with torch.no_grad():
        return model(x, t)


def _randomise_b(model):
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            nn.init.normal_(p, std=0.05)


@pytest.mark.parametrize("kind", TOWERS)
def test_fresh_adapter_is_identity_and_covers_both_towers(kind, tiny_hf_dir):
    (model, _, _, tok), size = _build(kind, tiny_hf_dir)
    model.eval()
    ref = _forward(model, size, tok)
    summary = apply_lora(model, LoraConfig())
    model.eval()
    out = _forward(model, size, tok)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5)
    adapted = lora_state(model).adapted
    assert adapted["image"] and adapted["text"], adapted
    assert 0 < summary.share < 0.2 and summary.lora > 0


@pytest.mark.parametrize("kind", TOWERS)
def test_merge_equals_unmerged_and_scale_zero_is_base(kind, tiny_hf_dir):
    (model, _, _, tok), size = _build(kind, tiny_hf_dir)
    model.eval()
    base = _forward(model, size, tok)
    apply_lora(model, LoraConfig())
    _randomise_b(model)
    with torch.no_grad():
        model.logit_scale.add_(0.5)
        for n, p in model.named_parameters():
            if n in lora_state(model).full and p.ndim == 2:
                p.add_(0.01 * torch.randn_like(p))
    model.eval()
    tuned = _forward(model, size, tok)
    assert (tuned["image_features"] - base["image_features"]).abs().max() > 1e-3
    assert (tuned["text_features"] - base["text_features"]).abs().max() > 1e-3
    merged = merge_lora(copy.deepcopy(model)).eval()
    assert not any(isinstance(m, (LoRALinear, LoRAConv2d, LoRAMultiheadAttention)) for m in merged.modules())
    assert set(merged.state_dict()) == set(create_model_keys(kind, tiny_hf_dir))
    out = _forward(merged, size, tok)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key], tuned[key], atol=2e-5, rtol=1e-4)
    set_lora_scale(model, 0.0)
    zero = _forward(model, size, tok)
    for key in ("image_features", "text_features", "logit_scale"):
        torch.testing.assert_close(zero[key], base[key], atol=1e-5, rtol=1e-5)
    set_lora_scale(model, 1.0)
    back = _forward(model, size, tok)
    torch.testing.assert_close(back["image_features"], tuned["image_features"])


def create_model_keys(kind, tiny_hf_dir):
    (model, *_), _ = _build(kind, tiny_hf_dir)
    return model.state_dict().keys()


def test_only_adapters_and_unfrozen_get_gradients(tiny_vit_cfg):
    model, _, _, tok = create_model(tiny_vit_cfg)
    apply_lora(model, LoraConfig())
    _randomise_b(model)
    train_mode(model)
    out = model(torch.randn(4, 3, 32, 32), tok(["a", "b", "c", "d"]))
    loss = (out["image_features"] @ out["text_features"].T).sum() * out["logit_scale"]
    loss.backward()
    for name, p in model.named_parameters():
        is_lora = ".lora_" in name
        is_full = name in lora_state(model).full
        if is_lora or is_full:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert set(lora_state(model).full) == {"logit_scale", "visual.proj", "text_projection"}


def test_per_tower_targets_layers_and_disable(tiny_vit_cfg):
    model, *_ = create_model(tiny_vit_cfg)
    cfg = LoraConfig(image=LoraTowerConfig(targets=["c_fc"], layers=r"resblocks\.1\."),
                     text=LoraTowerConfig(enabled=False))
    apply_lora(model, cfg)
    assert lora_state(model).adapted == {"image": ["visual.transformer.resblocks.1.mlp.c_fc"], "text": []}


def test_targets_that_match_nothing_are_refused(tiny_vit_cfg):
    model, *_ = create_model(tiny_vit_cfg)
    with pytest.raises(ValueError, match="matched nothing in the image tower"):
        apply_lora(model, LoraConfig(image=LoraTowerConfig(targets=["nonexistent"])))


def test_cnn_pointwise_targets_skip_depthwise():
    model, *_ = create_model(ModelConfig(image_size=64))
    apply_lora(model, LoraConfig(image=LoraTowerConfig(layers=r"blocks\.[5-6]\.|conv_head")))
    _, trunk = tower_bodies(model)["image"]
    wrapped = [m for m in trunk.modules() if isinstance(m, LoRAConv2d)]
    assert wrapped and all(m.base.kernel_size == (1, 1) and m.base.groups == 1 for m in wrapped)
    names = lora_state(model).adapted["image"]
    assert all(("blocks.5." in n or "blocks.6." in n or n.endswith("conv_head")) for n in names)


def test_frozen_batchnorm_keeps_running_stats():
    model, *_ = create_model(ModelConfig(image_size=64))
    apply_lora(model, LoraConfig())
    train_mode(model)
    bn = model.visual.trunk.bn1
    before = bn.running_mean.clone()
    model.encode_image(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, bn.running_mean)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "float_causal", "bool_causal", "key_padding"])
def test_lora_mha_matches_torch_mha(batch_first, mask_kind):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    wrapped = LoRAMultiheadAttention(copy.deepcopy(mha), rank=2, alpha=4).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    kw = {}
    if mask_kind == "float_causal":
        kw["attn_mask"] = torch.full((5, 5), float("-inf")).triu(1)
    elif mask_kind == "bool_causal":
        kw["attn_mask"] = torch.ones(5, 5, dtype=torch.bool).triu(1)
    elif mask_kind == "key_padding":
        kw["key_padding_mask"] = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    ref = mha(x, x, x, need_weights=False, **kw)[0]
    torch.testing.assert_close(wrapped(x, x, x, need_weights=False, **kw)[0], ref, atol=1e-6, rtol=1e-5)
    # a trained delta equals running torch's MHA on the merged weights
    nn.init.normal_(wrapped.lora_B, std=0.1)
    nn.init.normal_(wrapped.out_lora.lora_B, std=0.1)
    out = wrapped(x, x, x, need_weights=False, **kw)[0]
    wrapped.merge()
    torch.testing.assert_close(mha_forward(wrapped.base, x, kw), out, atol=1e-5, rtol=1e-4)


def mha_forward(mha, x, kw):
    return mha(x, x, x, need_weights=False, **kw)[0]


def test_lora_linear_and_conv_math():
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(7, 5), rank=3, alpha=6)
    nn.init.normal_(lin.lora_B)
    x = torch.randn(4, 7)
    expected = lin.base(x) + 2.0 * x @ lin.lora_A.T @ lin.lora_B.T  # alpha / rank = 2
    torch.testing.assert_close(lin(x), expected)
    conv = LoRAConv2d(nn.Conv2d(6, 4, 1), rank=2, alpha=2)
    nn.init.normal_(conv.lora_B)
    y = torch.randn(2, 6, 5, 5)
    delta = torch.einsum("oi,bihw->bohw", conv.lora_B @ conv.lora_A, y)
    torch.testing.assert_close(conv(y), conv.base(y) + delta, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="1x1"):
        LoRAConv2d(nn.Conv2d(6, 4, 3), rank=2, alpha=2)


def test_scale_round_trip_is_bit_exact(tiny_vit_cfg):
    model, *_ = create_model(tiny_vit_cfg)
    apply_lora(model, LoraConfig())
    with torch.no_grad():
        model.text_projection.add_(0.123456789 * torch.randn_like(model.text_projection))
    tuned = model.text_projection.detach().clone()
    for scale in (1.0, 0.37, 0.0, 1.0):
        set_lora_scale(model, scale)
    assert torch.equal(model.text_projection, tuned)


def test_lora_scale_context_restores_the_scale_even_on_errors(tiny_vit_cfg):
    model, *_ = create_model(tiny_vit_cfg)
    assert not has_adapter(model)
    with lora_scale(model, None):  # None: nothing to scale, nothing refused
        pass
    with pytest.raises(ValueError, match="no LoRA adapters"), lora_scale(model, 0.5):
        pass
    apply_lora(model, LoraConfig())
    assert has_adapter(model) and lora_state(model).scale == 1.0
    with torch.no_grad():
        model.text_projection.add_(0.1 * torch.randn_like(model.text_projection))
    tuned, base = model.text_projection.detach().clone(), lora_state(model).full_base["text_projection"]
    set_lora_scale(model, 0.25)
    with lora_scale(model, 0.0):
        assert get_lora_scale(model) == 0.0 and torch.equal(model.text_projection, base)
    assert get_lora_scale(model) == 0.25
    with pytest.raises(RuntimeError, match="inside"), lora_scale(model, 1.0):
        assert torch.equal(model.text_projection, tuned)
        raise RuntimeError("inside")
    assert get_lora_scale(model) == 0.25
    torch.testing.assert_close(model.text_projection, base + 0.25 * (tuned - base))


def test_cnn_default_adapts_the_later_half():
    model, *_ = create_model(ModelConfig(image_size=64))
    _, trunk = tower_bodies(model)["image"]
    pointwise = [n for n, m in trunk.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                 and m.groups == 1]
    apply_lora(model, LoraConfig())
    names = lora_state(model).adapted["image"]
    assert names == [f"visual.trunk.{n}" for n in pointwise[len(pointwise) // 2:]]
    assert not any(".blocks.0." in n or ".blocks.1." in n for n in names)


@pytest.mark.parametrize("kind", TOWERS)
def test_activation_checkpointing_gives_the_same_adapter_gradients_from_fewer_saved_tensors(
        kind, tiny_hf_dir):
    # Reference: plain backward. Memory path: checkpointed towers. Same LoRA gradients, less kept for
    # backward.
    from mmft.model.factory import enable_activation_checkpointing
    from mmft.model.lora import train_mode

    (model, _, _, tok), size = _build(kind, tiny_hf_dir)
    apply_lora(model, LoraConfig())
    _randomise_b(model)
    torch.manual_seed(1)
    x, t = torch.randn(4, 3, size, size), tok(["a red square", "two dogs on a mat", "a cat", "green leaves"])

    def grads_and_saved(m):
        saved = {}

        def pack(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        train_mode(m)
        m.zero_grad()
        torch.manual_seed(3)  # the same dropout masks in both runs (the recompute replays the RNG state)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = m(x, t)
            loss = (out["image_features"] @ out["text_features"].T).logsumexp(-1).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if "lora_" in n}, sum(saved.values())

    ref, ref_bytes = grads_and_saved(model)
    ckpt_model = copy.deepcopy(model)
    enable_activation_checkpointing(ckpt_model)
    got, got_bytes = grads_and_saved(ckpt_model)
    assert ref and set(got) == set(ref)
    assert any(n.startswith("visual.") for n in ref) and any(not n.startswith("visual.") for n in ref)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-6), n
        assert ref[n].abs().sum() > 0, n
    assert got_bytes < 0.7 * ref_bytes
