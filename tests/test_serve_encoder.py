"""TorchEncoder: adapters swapped by reference on one base, answers equal to the library's loaded models."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import adapted_run_dir
from serve_setup import deployment  # noqa: F401  (deployment is a fixture)

from mmft.embeddings import encode_images, encode_texts, model_fingerprint

TEXTS = ["a red square", "a blue circle number 7", "yellow"]


@pytest.fixture(scope="module")
def encoder(deployment):  # noqa: F811
    from mmft.serve.config import serve_config_from_dict
    from mmft.serve.torch_encoder import TorchEncoder

    enc = TorchEncoder.from_config(serve_config_from_dict(deployment.config()))
    enc.load_tenant("tuned@1", str(deployment.run / "adapter-last"), 1.0)
    enc.load_tenant("half@1", str(deployment.run / "adapter-last"), 0.5)
    enc.load_tenant("other@1", str(deployment.other_adapter), 1.0)
    enc.load_tenant("baseline@1", None, 0.0)
    return enc


@pytest.mark.parametrize("slot,adapter,scale", [("tuned@1", None, 1.0), ("half@1", None, 0.5),
                                                ("other@1", "other", 1.0), ("baseline@1", None, 0.0)])
def test_slots_embed_exactly_like_the_loaded_model(deployment, encoder, slot, adapter, scale):  # noqa: F811
    from PIL import Image

    from mmft.model.adapter import load_model
    from mmft.model.lora import set_lora_scale

    ref = load_model(deployment.run, adapter=str(deployment.other_adapter) if adapter else "best")
    set_lora_scale(ref.model, scale)
    images = [Image.open(deployment.root / "src" / f"im{i:03d}.png").convert("RGB") for i in (1, 2)]
    for _ in range(2):  # switching back and forth between slots changes nothing
        for other in ("baseline@1", "other@1", slot):
            encoder.encode_text(["warm up"], other)
        np.testing.assert_array_equal(encoder.encode_text(TEXTS, slot),
                                      encode_texts(ref.model, ref.tokenizer, TEXTS))
        np.testing.assert_array_equal(encoder.encode_image(images, slot),
                                      encode_images(ref.model, images, preprocess=ref.preprocess))
    assert encoder.fingerprint(slot) == model_fingerprint(ref.model)


def test_digest_matches_adapter_digest(deployment):  # noqa: F811
    from safetensors.torch import load_file

    from mmft.model.adapter import ADAPTER_WEIGHTS, adapter_digest, load_model
    from mmft.serve.torch_encoder import tensors_digest

    tensors = load_file(str(deployment.other_adapter / ADAPTER_WEIGHTS))
    loaded = load_model(deployment.run, adapter=str(deployment.other_adapter)).model
    assert tensors_digest(tensors) == adapter_digest(loaded)


def test_switching_copies_no_weight(encoder):
    from mmft.model.lora import LORA_LAYERS

    base_ptrs = {n: p.data_ptr() for n, p in encoder.model.named_parameters() if ".lora_" not in n}
    layers = [(n, m) for n, m in encoder.model.named_modules()
              if isinstance(m, LORA_LAYERS) and m.lora_A is not None]
    for slot_name in ("tuned@1", "other@1", "tuned@1"):
        encoder.encode_text(["x"], slot_name)
        slot = encoder._slots[slot_name]
        for name, layer in layers:  # the layer holds the slot's own tensors: assigned, not copied
            assert layer.lora_A is slot.lora[name][0] and layer.lora_B is slot.lora[name][1]
        for pname, tensor in slot.full.items():
            owner, leaf = encoder._owners[pname]
            assert getattr(owner, leaf) is tensor
    encoder.encode_text(["x"], "baseline@1")
    assert all(m.scale == 0.0 for _, m in layers)
    for n, p in encoder.model.named_parameters():  # the base's own weights never moved
        if n in base_ptrs and n not in encoder._owners:
            assert p.data_ptr() == base_ptrs[n]
    assert 0 < encoder.adapter_bytes() < sum(p.numel() * 4 for p in encoder.model.parameters())


def test_adapter_of_another_base_is_refused(encoder, tmp_path):
    from mmft.model.adapter import AdapterMismatchError

    run, *_ = adapted_run_dir(tmp_path, seed=5)  # another random base
    with pytest.raises(AdapterMismatchError, match="trained on base .* load it onto the base it was"):
        encoder.load_tenant("alien@1", str(run / "adapter-last"), 1.0)
    assert "alien@1" not in encoder.tenants
    with pytest.raises(KeyError, match="no adapter slot 'alien@1' is loaded"):
        encoder.encode_text(["x"], "alien@1")


def test_encoder_interface_and_import_without_torch(encoder):
    from mmft.serve.encoders import Encoder

    assert isinstance(encoder, Encoder) and encoder.dim == 32
    assert set(encoder.tenants) >= {"tuned@1", "baseline@1"}
    code = ("import sys; import mmft.serve, mmft.serve.app, mmft.serve.config, mmft.serve.encoders, "
            "mmft.serve.tenants, mmft.serve.state, mmft.index, mmft.index.thumbnails; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert torch.is_tensor(torch.zeros(1))
