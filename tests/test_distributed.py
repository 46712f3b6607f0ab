"""Training and index building across processes: 2 CPU ranks (gloo) against one process.

Ranks run as child processes with the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...),
so `mmft.distributed.init_from_env` starts them exactly as under `torchrun`; the end-to-end tests
launch `python -m torch.distributed.run` itself.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_VIT, make_pairs, pair_batches

from mmft.config import Config, ModelConfig, TrainConfig
from mmft.model.factory import create_model

WORLD, LOCAL_B, STEPS = 2, 8, 3
ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    """What torchrun sets for each process (single node)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}


def spawn_ranks(fn: str, tmp: Path, world: int = WORLD, timeout: float = 240,
                module: str = "test_distributed") -> None:
    """Run `fn(tmp)` of test module `module` in `world` processes that form one gloo group."""
    port = free_port()
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import {module} as t; t.{fn}(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp)], env=rank_env(r, world, port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)


def torchrun(args: list[str], nproc: int, **kw) -> subprocess.Popen:
    """`python -m torch.distributed.run --nproc_per_node N <args>` on a free port, in its own session."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, start_new_session=True, text=True, **kw)


def save_base(path: Path) -> str:
    """Tiny base weights in a file, so that every process starts from the same model."""
    torch.manual_seed(0)
    base, *_ = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))
    torch.save(base.state_dict(), path)
    return str(path)


def train_cfg(out: Path, base: str, batch_size: int, **train_kw) -> Config:
    kw = {"output_dir": str(out), "steps": STEPS, "lr": 2e-3, "warmup_steps": 1, "log_every": 1,
          "device": "cpu"}
    kw.update(train_kw)
    cfg = Config(model=ModelConfig(name="tiny-vit", model_cfg=TINY_VIT, pretrained=base),
                 train=TrainConfig(**kw))
    cfg.data.batch_size = batch_size
    return cfg


def record_grads(train_mod, grads: list) -> None:
    """Keep the (DDP-averaged) gradients of every optimizer step, taken before clipping."""
    step = train_mod.optimizer_step

    def recording(model, *args):
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(model, *args)

    recording.__wrapped__ = step
    train_mod.optimizer_step = recording


class KeyRecorder:
    """A training stream that notes the sample keys of every batch it yields."""

    def __init__(self, stream, keys: list):
        self.stream, self.keys = stream, keys

    def __len__(self):
        return len(self.stream)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __iter__(self):
        for batch in self.stream:
            self.keys.extend(batch["key"])
            yield batch


# ---------------------------------------------------------------- rank programs (child processes)


def train_rank(tmp: str) -> None:
    """One rank: the global-batch run on its slice of each batch, then one epoch over the shards."""
    from mmft import distributed as du
    from mmft.data import stream as data_mod
    train_mod = importlib.import_module("mmft.training.trainer")

    torch.set_num_threads(1)
    assert du.init_from_env()
    rank = du.rank_world()[0]
    tmp = Path(tmp)
    inputs = torch.load(tmp / "inputs.pt")
    local = [{k: v[rank * LOCAL_B:(rank + 1) * LOCAL_B] for k, v in b.items()} for b in inputs["batches"]]
    grads: list = []
    record_grads(train_mod, grads)
    cfg = train_cfg(tmp / "ddp", inputs["base"], LOCAL_B)
    model = create_model(cfg.model)[0]
    train_mod.train(cfg, train_data=local, model=model)
    # one step accumulated over the same micro-batches: DDP must skip the all-reduce on all but the last
    from torch.nn.parallel import DistributedDataParallel

    no_sync, entered = DistributedDataParallel.no_sync, []

    def counting(self):
        entered.append(1)
        return no_sync(self)

    DistributedDataParallel.no_sync = counting
    accum_grads: list = []
    train_mod.optimizer_step = train_mod.optimizer_step.__wrapped__
    record_grads(train_mod, accum_grads)
    cfg = train_cfg(tmp / "ddp-accum", inputs["base"], LOCAL_B, steps=1, accum_steps=STEPS)
    train_mod.train(cfg, train_data=local, model=create_model(cfg.model)[0])
    DistributedDataParallel.no_sync = no_sync
    train_mod.optimizer_step = train_mod.optimizer_step.__wrapped__

    keys: list = []
    loader = data_mod.train_loader
    data_mod.train_loader = lambda *a, **kw: KeyRecorder(loader(*a, **kw), keys)
    cfg = train_cfg(tmp / "shards-run", inputs["base"], 4, steps=0, epochs=1, checkpoint_every=2)
    cfg.data.train, cfg.data.num_workers = [inputs["shards"]], 2
    train_mod.train(cfg)
    torch.save({"grads": grads, "params": train_mod.trainable_state(model), "keys": keys,
                "accum_grads": accum_grads, "no_sync_entered": len(entered)}, tmp / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread in this process too: the ranks already take the cores (two spinning OpenMP
    threads on a busy 2-core machine can be 50x slower than one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """Base weights in a file, 4 shards of 10 random images (2 captions each), a short tuned run."""
    from test_data import write_dataset

    tmp = tmp_path_factory.mktemp("dist")
    base = save_base(tmp / "base.pt")
    paths = write_dataset(tmp / "shards", shards=4, per_shard=10)
    cfg = train_cfg(tmp / "run", base, 8, steps=2)
    model, _, preprocess, tok = create_model(cfg.model)
    trainer = importlib.import_module("mmft.training.trainer")
    trainer.train(cfg, train_data=pair_batches(preprocess, tok, make_pairs(16), 8), model=model)
    return {"base": base, "paths": paths, "shards": str(tmp / "shards" / "s-{00000..00003}.tar"),
            "run": tmp / "run", "preprocess": preprocess, "tok": tok}


def test_two_ranks_train_like_one_process_on_the_global_batch(setup, tmp_path):
    """Same gradients and parameters as one process on the concatenated batches; an epoch over shards
    gives every sample to exactly one rank."""
    train_mod = importlib.import_module("mmft.training.trainer")
    base, paths = setup["base"], setup["paths"]
    pairs = make_pairs(WORLD * LOCAL_B * STEPS, seed=3)
    batches = pair_batches(setup["preprocess"], setup["tok"], pairs, WORLD * LOCAL_B, with_groups=True)
    torch.save({"batches": batches, "base": base, "shards": setup["shards"]}, tmp_path / "inputs.pt")
    spawn_ranks("train_rank", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    grads: list = []
    step = train_mod.optimizer_step
    try:
        record_grads(train_mod, grads)
        cfg = train_cfg(tmp_path / "single", base, WORLD * LOCAL_B)
        model = create_model(cfg.model)[0]
        train_mod.train(cfg, train_data=batches, model=model)
    finally:
        train_mod.optimizer_step = step
    params = train_mod.trainable_state(model)
    accum_grads: list = []
    try:
        record_grads(train_mod, accum_grads)
        cfg = train_cfg(tmp_path / "single-accum", base, WORLD * LOCAL_B, steps=1, accum_steps=STEPS)
        train_mod.train(cfg, train_data=batches, model=create_model(cfg.model)[0])
    finally:
        train_mod.optimizer_step = step
    for r in ranks:  # gradient accumulation: micro-steps without all-reduce, the same accumulated gradient
        assert r["no_sync_entered"] == STEPS - 1 and len(r["accum_grads"]) == 1
        for name, g in accum_grads[0].items():
            torch.testing.assert_close(r["accum_grads"][0][name], g, rtol=1e-4, atol=1e-6,
                                       msg=f"accumulated d {name}")

    assert len(grads) == len(ranks[0]["grads"]) == STEPS
    for s in range(STEPS):
        assert grads[s].keys() == ranks[0]["grads"][s].keys()
        for name, g in grads[s].items():
            for r in ranks:
                torch.testing.assert_close(r["grads"][s][name], g, rtol=1e-4, atol=1e-6,
                                           msg=f"step {s} d {name}")
    # AdamW normalises each element's step, so reduction-order noise in near-zero gradients shows up
    # as ~1e-6 in the parameters (the steps themselves are lr = 2e-3).
    for name, p in params.items():
        torch.testing.assert_close(ranks[1]["params"][name], ranks[0]["params"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["params"][name], p, rtol=1e-4, atol=2e-5, msg=name)
    assert all(p.abs().max() > 1e-3 for n, p in params.items() if n.endswith("lora_B"))  # B starts at 0
    logged = [[json.loads(x)["loss"] for x in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("ddp", "single")]
    np.testing.assert_allclose(logged[0], logged[1], rtol=1e-5)  # rank 0 logs the global-batch loss

    keys = [r["keys"] for r in ranks]
    everything = {k for path in paths for k in _keys_in(path)}
    assert len(keys[0]) == len(keys[1]) and len(keys[0]) % 4 == 0
    assert not set(keys[0]) & set(keys[1]) and all(len(set(k)) == len(k) for k in keys)
    assert set(keys[0]) | set(keys[1]) == everything  # 40 samples = 2 ranks x 5 batches x 4: none left out
    run = tmp_path / "shards-run"
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = len(keys[0]) // 4
    assert [x["step"] for x in log] == list(range(1, steps + 1))  # one line per step: rank 0 alone writes
    assert json.loads((run / "summary.json").read_text())["world_size"] == WORLD


def _keys_in(path: str) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})


def _search(index, queries: np.ndarray, k: int = 10):
    scores, ids = index.search(queries, k)
    return scores, ids.tolist()


def test_two_rank_embed_and_merge_give_the_single_process_index(setup, tmp_path):
    """`mmft embed` on 2 ranks + merge: the same ids, rows and neighbours as `build_index_from_run`."""
    from mmft.cli import main
    from mmft.config import DataConfig, IndexConfig
    from mmft.index.core import build_index_from_run, load_index
    from mmft.index.distributed import build_index_distributed, merge_index_parts
    from mmft.model.adapter import load_model

    run, shards, parts = setup["run"], setup["shards"], tmp_path / "parts"
    # "--" keeps torchrun from reading --run as an abbreviation of its own --run-path
    proc = torchrun(["-m", "mmft", "--", "embed", "--run", str(run), "--shards", shards, "--out", str(parts)],
                    WORLD, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = proc.communicate(timeout=240)[1]
    assert proc.returncode == 0, err[-3000:]
    manifest = json.loads((parts / "parts.json").read_text())
    assert manifest["world_size"] == WORLD and len(manifest["parts"]) == WORLD
    sizes = [json.loads((parts / p / "part.json").read_text())["images"] for p in manifest["parts"]]
    assert sizes == [20, 20]  # shards 0, 2 and 1, 3

    model = load_model(run).model
    queries = np.random.default_rng(0).standard_normal((25, 32)).astype(np.float32)  # (Q, D)
    one_reader = DataConfig(num_workers=0)  # rows in shard order, the order the merge restores
    for name, factory, kw in [("flat", "Flat", {}), ("ivf", "IVF4,Flat", {}),
                              ("ondisk", "IVF4,Flat", {"ondisk": True, "budget": 1 << 10})]:
        cfg = IndexConfig(factory=factory, train_sample=24)
        merge_index_parts(parts, tmp_path / name, cfg, **kw)
        single = build_index_from_run(run, shards, tmp_path / f"single-{name}", cfg, data_cfg=one_reader,
                                      progress=False)
        loaded = load_index(tmp_path / name, model=model)  # the manifest pins the run's model
        assert loaded.ids.tolist() == single.ids.tolist() and loaded.ntotal == 40
        s_single, i_single = _search(single, queries)
        s_merged, i_merged = _search(loaded, queries)
        assert i_merged == i_single, name
        np.testing.assert_array_equal(s_merged, s_single)
        ref = json.loads((tmp_path / f"single-{name}" / "manifest.json").read_text())
        got = json.loads((tmp_path / name / "manifest.json").read_text())
        pinned = ("model", "adapter_sha256", "lora_scale", "factory", "nprobe", "count", "dim", "source")
        for key in pinned:
            assert got[key] == ref[key], key
        assert set(got) - {"merged_from", "ondisk"} == set(ref), name  # one manifest for both builders
    assert (tmp_path / "ondisk" / "index.ivfdata").is_file() and "ondisk" in got
    # embed + merge in one call (what `mmft index build` runs under torchrun); here one process, 2 workers
    built = build_index_distributed(run, shards, tmp_path / "built",
                                    IndexConfig(factory="IVF4,Flat", train_sample=24),
                                    data_cfg=DataConfig(num_workers=2))
    assert not (built / "embeddings").exists()
    assert _search(load_index(built), queries)[1] == _search(load_index(tmp_path / "ivf"), queries)[1]

    # exact search does not depend on the row order: a build with two loader workers agrees too
    workers = build_index_from_run(run, shards, tmp_path / "single-2w", IndexConfig(factory="Flat"),
                                   data_cfg=DataConfig(num_workers=2), progress=False)
    assert _search(workers, queries)[1] == _search(load_index(tmp_path / "flat"), queries)[1]
    text = merge_index_parts(parts, tmp_path / "text", IndexConfig(factory="Flat"), modality="text")
    single = build_index_from_run(run, shards, tmp_path / "single-text", IndexConfig(factory="Flat"),
                                  data_cfg=one_reader, modality="text", progress=False)
    assert text.ids.tolist() == single.ids.tolist()
    assert _search(text, queries)[1] == _search(single, queries)[1]
    # rank 0 missing
    assert main(["index", "merge", str(parts / "part-00001"), "--out", str(tmp_path / "bad")]) == 2
    assert main(["index", "merge", str(parts), "--out", str(tmp_path / "cli")]) == 0
    assert load_index(tmp_path / "cli").ids.tolist() == load_index(tmp_path / "flat").ids.tolist()


def _write_config(path: Path, setup, out: Path) -> Path:
    cfg = {"model": {"name": "tiny-vit", "model_cfg": TINY_VIT, "pretrained": setup["base"]},
           "data": {"train": [setup["shards"]], "batch_size": 4, "num_workers": 1},
           "train": {"output_dir": str(out), "lr": 2e-3, "warmup_steps": 1, "log_every": 1, "device": "cpu",
                     "checkpoint_every": 2, "keep_checkpoints": 2}}
    command = "# torchrun --nproc_per_node 2 -m mmft train --config " + path.name
    path.write_text(command + "\n" + yaml.safe_dump(cfg))
    return path


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.slow
def test_killed_two_rank_run_resumes_from_its_checkpoint(setup, tmp_path):
    """SIGKILL both ranks of a torchrun job mid-run; the job run again continues from the newest
    checkpoint, and a later run on one process keeps the global batch (with a warning)."""
    out = tmp_path / "run"
    config = _write_config(tmp_path / "ddp.yaml", setup, out)
    proc = torchrun(["-m", "mmft", "train", "--config", str(config), "train.steps=400"], WORLD,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(ckpts.glob("step-*.pt"))) < 2:
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert len(workers) == WORLD and ckpts.is_dir(), "the job wrote no checkpoints"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    saved = sorted(ckpts.glob("step-*.pt"))
    state = torch.load(saved[-1], weights_only=True)
    killed_at = state["step"]
    assert 0 < killed_at < 400 and state["world_size"] == WORLD and len(state["rng"]) == WORLD

    proc = torchrun(["-m", "mmft", "train", "--config", str(config), f"train.steps={killed_at + 4}"], WORLD,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.communicate(timeout=240)[1]
    assert proc.returncode == 0, err[-3000:]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in log]
    assert steps[-4:] == list(range(killed_at + 1, killed_at + 5)), steps  # continued, not restarted
    assert json.loads((out / "summary.json").read_text())["world_size"] == WORLD

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "mmft", "train", "--config", str(config),
                          f"train.steps={killed_at + 6}"], env=env,
                         capture_output=True, text=True, timeout=240, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resuming a 2-process run on 1 processes: train.accum_steps 1 -> 2" in one.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == killed_at + 6 and summary["world_size"] == 1


@pytest.mark.parametrize("shards,world,workers", [(1, 2, 2), (2, 3, 1), (5, 2, 2), (4, 2, 3), (3, 1, 2)])
def test_rank_and_worker_plans_read_every_sample_once(shards, world, workers):
    """Whole shards per reader when there are enough, else every n-th sample: nothing twice, nothing lost."""
    from mmft.index.distributed import _split

    sizes = [7 + 3 * i for i in range(shards)]
    seen = []
    for rank in range(world):
        plan = _split(list(range(shards)), 1, 0, world, rank)
        for w in range(workers):
            mine, every, offset = _split(*plan, workers, w)
            seen += [(i, pos) for i in mine for pos in range(sizes[i]) if pos % every == offset]
    assert sorted(seen) == [(i, pos) for i in range(shards) for pos in range(sizes[i])]
