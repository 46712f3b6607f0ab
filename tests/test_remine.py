"""Training with mined hard negatives (mmft.training.forward, mmft.training.remine) on tiny shards: the
loss sees every sample's K negatives with their group ids, the run trains, negatives are re-mined with
the model being trained every data.remine_every epochs, and a resumed run reuses the re-mined file."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VIT, make_pairs
from test_mining import write_pairs

from mmft.config import Config, DataConfig, ModelConfig, TrainConfig
from mmft.mining.core import mine
from mmft.mining.format import read_mined
from mmft.rundir import RunDir
from mmft.training import trainer as train_mod
from mmft.training.remine import remine_epoch

K = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("negs")
    pairs = make_pairs(24, seed=3)
    paths = [write_pairs(tmp / "train-0.tar", pairs[:12]), write_pairs(tmp / "train-1.tar", pairs[12:], 12)]
    torch.manual_seed(0)
    mined = mine(None, paths, tmp / "mined.jsonl", k=3,
                 model_cfg=ModelConfig(name="tiny-vit", model_cfg=TINY_VIT),
                 data_cfg=DataConfig(group_field="group", num_workers=0), progress=False)
    return paths, mined


def _cfg(tmp_path, shards, **data_kw) -> Config:
    paths, mined = shards
    data = DataConfig(train=paths, batch_size=8, num_workers=0, shuffle_buffer=8, group_field="group",
                      hard_negatives=str(mined), negatives_per_sample=K, **data_kw)
    train = TrainConfig(output_dir=str(tmp_path / "run"), epochs=2, lr=2e-3, warmup_steps=1, log_every=1,
                        device="cpu", loss_impl="reference")
    return Config(model=ModelConfig(name="tiny-vit", model_cfg=TINY_VIT), data=data, train=train)


def _recording_loss(monkeypatch, seen: list):
    pick = train_mod.pick_loss

    def picking(model, cfg):
        kind, fn = pick(model, cfg)

        def recording(out, **groups):
            seen.append({k: tuple(v.shape) for k, v in {**out, **groups}.items() if torch.is_tensor(v)})
            return fn(out, **groups)

        return kind, recording

    monkeypatch.setattr(train_mod, "pick_loss", picking)


def test_training_with_mined_negatives_passes_them_to_the_loss(tmp_path, shards, monkeypatch):
    seen: list = []
    _recording_loss(monkeypatch, seen)
    torch.manual_seed(0)
    run = train_mod.train(_cfg(tmp_path, shards))
    assert len(seen) == 6  # 2 epochs of 3 batches of 8
    for shapes in seen:
        assert shapes["extra_image_features"] == shapes["extra_text_features"] == (8 * K, 32)
        assert shapes["extra_image_group_ids"] == shapes["extra_text_group_ids"] == (8 * K,)
        assert shapes["group_ids"] == (8,)
    losses = [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert not RunDir(run).mined(1).exists()  # no re-mining unless asked


def test_remining_every_epoch_uses_the_current_model(tmp_path, shards, monkeypatch):
    reloads: list = []
    from mmft.data.stream import TrainStream

    reload = TrainStream.reload_negatives

    def recording(self, path=None):
        reloads.append(str(path))
        return reload(self, path)

    monkeypatch.setattr(TrainStream, "reload_negatives", recording)
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, shards, remine_every=1)
    run = RunDir(train_mod.train(cfg))
    assert reloads == [str(run.mined(1))]  # before epoch 1; epoch 0 trains on the configured file
    again = read_mined(run.mined(1))
    first = read_mined(shards[1])
    assert again.header["source"] == {"remined_before_epoch": 1} and again.header["k"] == first.header["k"]
    assert again.header["model"]["adapter_sha256"]  # mined with the adapter being trained, not the base
    assert again.records.keys() == first.records.keys()
    # a resumed run (here: a longer one in the same folder) reuses the file instead of mining again
    stamp = run.mined(1).stat().st_mtime_ns
    reloads.clear()
    cfg.train.epochs = 3
    train_mod.train(cfg)
    assert reloads == [str(run.mined(1)), str(run.mined(2))] and run.mined(1).stat().st_mtime_ns == stamp


def test_remine_epoch_and_its_errors(tmp_path, shards):
    assert [remine_epoch(2, e) for e in range(5)] == [0, 0, 2, 2, 4] and remine_epoch(0, 7) == 0
    cfg = _cfg(tmp_path, shards)
    cfg.train.cache_features = True
    cfg.lora.image.enabled = cfg.lora.text.enabled = False
    with pytest.raises(ValueError, match="hard_negatives"):
        train_mod.train(cfg)
