"""Training state and checkpoints: exact resume over the real data stream, safe loading, write failures."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT, make_pairs

from mmft.config import Config, ModelConfig, TrainConfig
from mmft.rundir import RunDir
from mmft.training import state as state_mod
from mmft.training.trainer import train


def _write_shards(folder: Path, n: int = 48, shards: int = 2) -> str:
    """`shards` tar shards of make_pairs samples (png + txt); returns their brace spec."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(n)
    for s in range(shards):
        with tarfile.open(folder / f"train-{s}.tar", "w") as tar:
            for i in range(s, n, shards):
                buf = io.BytesIO()
                pairs[i][0].save(buf, format="PNG")
                for name, data in ((f"{i:05d}.png", buf.getvalue()), (f"{i:05d}.txt", pairs[i][1].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"train-{{0..{shards - 1}}}.tar")


def _stream_cfg(out: Path, shards: str, workers: int, **train_kw) -> Config:
    """The tiny model on the real data stream, with augmentation and LoRA dropout: every draw of the run
    comes from an RNG that a resume must restore."""
    kw = {"output_dir": str(out), "steps": 8, "checkpoint_every": 2, "keep_checkpoints": 10, "lr": 2e-3,
          "warmup_steps": 2, "seed": 0, "loss_impl": "reference"}
    kw.update(train_kw)
    cfg = Config(model=ModelConfig(name="tiny-vit", model_cfg=TINY_VIT), train=TrainConfig(**kw))
    cfg.lora.image.dropout = cfg.lora.text.dropout = 0.2
    cfg.data.train, cfg.data.batch_size, cfg.data.num_workers = [shards], 8, workers
    cfg.data.shuffle_buffer, cfg.data.augment_scale, cfg.data.augment_hflip = 16, [0.5, 1.0], True
    return cfg


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(RunDir(run).adapter("last") / "adapter_model.safetensors"))


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_mid_epoch_over_the_data_stream_is_bit_identical(tmp_path, workers):
    """Stopped after the step-4 checkpoint (mid-epoch: 6 batches an epoch), resumed: the same adapter to
    the bit as an uninterrupted run. Starting the data workers once drew torch's global RNG (and with
    num_workers=0 augmentation drew it between steps), so the resumed run's dropout masks differed."""
    shards = _write_shards(tmp_path / "data")
    train(_stream_cfg(tmp_path / "full", shards, workers))
    cfg = _stream_cfg(tmp_path / "cut", shards, workers)

    class Stop(Exception):
        pass

    orig = state_mod.Checkpointer.save

    def save_then_stop(self, state, step):
        path = orig(self, state, step)
        if step == 4:
            raise Stop
        return path

    state_mod.Checkpointer.save = save_then_stop
    try:
        with pytest.raises(Stop):
            train(cfg)
    finally:
        state_mod.Checkpointer.save = orig
    train(cfg)
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    differ = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}"
