"""The training step's inputs (mmft.training.forward): uint8 images shipped by the data workers and
normalised on the device train exactly as float images normalised in the workers; errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, make_pairs
from test_mining import write_pairs

from mmft.config import Config, DataConfig, ModelConfig, TrainConfig
from mmft.data.augment import TrainTransform
from mmft.training.forward import step_inputs


def test_uint8_collate_then_normalize_equals_the_float_collate():
    kw = {"image_size": 8, "mean": (0.48, 0.46, 0.41), "std": (0.27, 0.26, 0.28)}
    pixels = [np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8) for i in range(5)]
    flt, u8 = TrainTransform(**kw), TrainTransform(**kw, uint8=True)
    packed = u8.collate(pixels)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, 8, 8)
    torch.testing.assert_close(u8.normalize(packed), flt.collate(pixels), rtol=0, atol=1e-6)
    batch = {"image": packed, "text": torch.zeros(5, 4, dtype=torch.long),
             "extra_image": packed[:, None].expand(5, 2, 3, 8, 8), "group": torch.arange(5)}
    inputs, _ = step_inputs(batch, torch.device("cpu"), True, u8.normalize)
    assert inputs["images"].dtype == inputs["extra_images"].dtype == torch.float32
    with pytest.raises(ValueError, match="uint8_images"):
        step_inputs(batch, torch.device("cpu"), True, None)


def test_training_on_uint8_batches_reaches_the_same_parameters(tmp_path):
    pairs = make_pairs(24, seed=5)
    shards = [write_pairs(tmp_path / "train-0.tar", pairs)]
    params = []
    for u8 in (False, True):
        data = DataConfig(train=shards, batch_size=8, num_workers=1, shuffle_buffer=8, uint8_images=u8)
        train = TrainConfig(output_dir=str(tmp_path / f"run{u8}"), steps=3, lr=2e-3, warmup_steps=1,
                            device="cpu", loss_impl="reference")
        cfg = Config(model=ModelConfig(name="tiny-vit", model_cfg=TINY_VIT), data=data, train=train)
        torch.manual_seed(0)
        from mmft.training import trainer

        seen = []
        step_inputs_ = trainer.step_inputs

        def spy(batch, *a, _real=step_inputs_, _seen=seen):
            _seen.append(batch["image"].dtype)
            return _real(batch, *a)

        trainer.step_inputs = spy
        try:
            trainer.train(cfg)
        finally:
            trainer.step_inputs = step_inputs_
        assert seen == [torch.uint8 if u8 else torch.float32] * 3
        from mmft.model.adapter import load_model

        loaded = load_model(cfg.train.output_dir)[0]
        params.append({n: p.detach().clone() for n, p in loaded.named_parameters()})
    for n, p in params[0].items():
        torch.testing.assert_close(params[1][n], p, rtol=1e-5, atol=1e-6)
