"""Training state and checkpoints: exact resume over the real data stream, safe loading, write failures."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT, Stop, make_pairs, stop_after_checkpoint

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


# ---------------------------------------------------------------- checkpoint files


def _tiny(out: Path, **train_kw):
    """A tiny run on in-memory batches (3 an epoch): (cfg, keyword arguments for train)."""
    from conftest import pair_batches

    from mmft.model.factory import create_model

    kw = {"output_dir": str(out), "steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3, "lr": 2e-3,
          "warmup_steps": 1, "seed": 0, "loss_impl": "reference"}
    kw.update(train_kw)
    cfg = Config(model=ModelConfig(name="tiny-vit", model_cfg=TINY_VIT), train=TrainConfig(**kw))
    torch.manual_seed(0)
    model, _, pv, tok = create_model(cfg.model)
    return cfg, {"train_data": pair_batches(pv, tok, make_pairs(48), 16), "model": model, "tokenizer": tok}


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return
    import zipfile

    with zipfile.ZipFile(path) as archive:  # flip one byte in the middle of the largest tensor's bytes
        info = max(archive.infolist(), key=lambda i: ("/data/" in i.filename, i.compress_size))
    header = 30 + len(info.filename.encode()) + int.from_bytes(data[info.header_offset + 28:][:2], "little")
    data[info.header_offset + header + info.compress_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("reference") / "run"
    cfg, kw = _tiny(out)
    train(cfg, **kw)
    return _adapter(out)


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, how, caplog, tiny_reference,
                                                                 monkeypatch):
    cfg, kw = _tiny(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(state_mod.Checkpointer, "save", stop_after_checkpoint(6))
        with pytest.raises(Stop):
            train(cfg, **kw)
    run = RunDir(cfg.train.output_dir)
    _damage(run.checkpoint(6), how)
    cfg, kw = _tiny(tmp_path / "run")
    with caplog.at_level("WARNING", logger="mmft.training.state"):
        train(cfg, **kw)
    assert any("step-00000006.pt is damaged" in r.getMessage() for r in caplog.records)
    resumes = run.summary()["resumes"]
    assert [(r["step"], r["from"]) for r in resumes] == [(4, "step-00000004.pt")]
    assert [s["checkpoint"] for s in resumes[0]["skipped"]] == ["step-00000006.pt"]
    assert (run.checkpoints / "step-00000006.pt.damaged").is_file()
    got = _adapter(run.path)
    assert all(torch.equal(got[k], t) for k, t in tiny_reference.items())


def test_a_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path):
    cfg, kw = _tiny(tmp_path / "run", steps=2)
    train(cfg, **kw)
    run = RunDir(cfg.train.output_dir)
    marker = tmp_path / "payload-ran"
    saved = state_mod.read_checkpoint(run.checkpoint(2))
    saved["trainable"] = _Payload(str(marker))  # unpickling it would create `marker`
    torch.save(saved, run.checkpoint(2))
    cfg, kw = _tiny(tmp_path / "run", steps=4)
    with pytest.raises(state_mod.CheckpointError) as e:
        train(cfg, **kw)
    message = str(e.value)
    assert "\n" not in message and str(run.checkpoint(2)) in message and "delete its checkpoints/" in message
    assert not marker.exists()


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------- write failures

_LIMITED = """
import resource, sys
from mmft import cli
from mmft.training import state

after = int(sys.argv[2])
orig = state.Checkpointer.save

def save(self, saved, step):  # past checkpoint `after`, no file may grow beyond 4 KiB (as if the disk filled)
    path = orig(self, saved, step)
    if step == after:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return path

state.Checkpointer.save = save
sys.exit(cli.main(["train", "--config", sys.argv[1]]))
"""


@pytest.mark.parametrize("after, victim", [(2, "checkpoints/step-00000004.pt"), (4, "adapter-last")])
def test_a_failed_write_stops_in_one_sentence_and_the_run_resumes(tmp_path, after, victim):
    import subprocess
    import sys

    import yaml

    from mmft.config import to_dict

    cfg = _stream_cfg(tmp_path / "run", _write_shards(tmp_path / "data"), workers=0, steps=4)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (tmp_path / "limited.py").write_text(_LIMITED)
    root = Path(__file__).resolve().parents[1]

    def run(limit_after: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(tmp_path / "limited.py"), str(tmp_path / "cfg.yaml"),
                               str(limit_after)], capture_output=True, text=True, cwd=root, timeout=600,
                              check=False)

    failed = run(after)
    last = failed.stderr.strip().splitlines()[-1]
    run_dir = RunDir(cfg.train.output_dir)
    assert failed.returncode == 2, failed.stderr[-2000:]
    want = f"mmft train: error: could not write {run_dir.path / victim}: File too large"
    assert last.startswith(want), last
    assert state_mod.read_checkpoint(run_dir.checkpoint(after))["step"] == after  # the previous one intact
    assert not list(run_dir.path.rglob("*.tmp")) and not run_dir.is_complete()
    again = run(-1)  # space is back
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["step"] for r in run_dir.summary()["resumes"]] == [after] and run_dir.summary()["steps"] == 4


def test_a_resume_rewinds_the_log_to_its_checkpoint(tmp_path, monkeypatch):
    """Killed after logging step 5 but before its checkpoint (checkpoints every 2): the resumed run
    starts at step 4 and logs 5 and 6 again, so the killed run's step-5 record (and a line the kill cut
    short) must go, and the resume is logged."""
    class Stop(Exception):
        pass

    orig = state_mod.Checkpointer.save

    def save(self, state, at):
        if at == 6:
            raise Stop  # dies before writing checkpoint 6: steps 5 and 6 are logged, the checkpoint is not
        return orig(self, state, at)

    cfg, kw = _tiny(tmp_path / "run", log_every=1)
    with monkeypatch.context() as m:
        m.setattr(state_mod.Checkpointer, "save", save)
        with pytest.raises(Stop):
            train(cfg, **kw)
    run = RunDir(cfg.train.output_dir)
    with open(run.log_path, "a") as f:
        f.write('{"event": "train", "st')  # the kill landed mid-write
    killed = [json.loads(x)["step"] for x in run.log_path.read_text().splitlines()[:-1]]
    assert killed == [1, 2, 3, 4, 5, 6] and [p.name for p in run.checkpoint_paths()][-1] == "step-00000004.pt"
    cfg, kw = _tiny(tmp_path / "run", log_every=1)
    train(cfg, **kw)
    records = [json.loads(x) for x in run.log_path.read_text().splitlines()]  # every line whole
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    resume = [r for r in records if r["event"] == "resume"]
    assert resume == [{"event": "resume", "step": 4, "from": "step-00000004.pt", "skipped": [],
                       "log_records_dropped": 3}]
    assert records.index(resume[0]) == 4  # right after the kept step-4 record


def test_a_rewound_log_hides_the_dropped_steps_from_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(tmp_path)
    killed = state_mod.RunLog(run, tensorboard=True)
    for step in (1, 2, 3):
        killed.write({"event": "train", "step": step, "loss": float(step)})
    killed.close()
    resumed = state_mod.RunLog(run, tensorboard=True)
    assert resumed.rewind(1) == 2
    resumed.write({"event": "train", "step": 2, "loss": 20.0})
    resumed.close()
    assert [json.loads(x)["loss"] for x in run.log_path.read_text().splitlines()] == [1.0, 20.0]
    acc = EventAccumulator(str(run.tensorboard))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 20.0)]
