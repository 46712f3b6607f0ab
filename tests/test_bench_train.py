"""tools/bench_train.py: the TSV handed to open_clip, the process-tree monitor, and (slow) one tiny full
run."""
from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "tools" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_shard(path: Path, n: int, size: int = 48, start: int = 0) -> Path:
    """img2dataset-style shard: <key>.png + <key>.txt (two caption lines, the first with quotes and a tab)."""
    from PIL import Image

    from mmft.data.shard_writer import write_tar

    members = []
    for i in range(start, start + n):
        img = Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        caption = f'a "shape"\tnumber {i}\nkeywords: {i % 3}\n'.encode()
        members += [(f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.txt", caption)]
    return Path(write_tar(path, members))


def test_tsv_reads_back_as_open_clip_reads_it(bench, tmp_path):
    import pandas as pd
    from PIL import Image

    shard = write_shard(tmp_path / "train-00000.tar", 5)
    with tarfile.open(shard, "a") as tar:  # a sample without a caption is left out, as mmft skips it
        info = tarfile.TarInfo("999999.png")
        data = (tmp_path / "x.png")
        Image.new("RGB", (8, 8)).save(data)
        info.size = data.stat().st_size
        tar.addfile(info, io.BytesIO(data.read_bytes()))
    tsv, rows = bench.write_tsv([str(shard)], tmp_path / "tsv")
    df = pd.read_csv(tsv, sep="\t")  # what open_clip's CsvDataset does
    assert rows == len(df) == 5
    assert df["title"].tolist() == [f'a "shape" number {i}' for i in range(5)]
    assert all(Image.open(p).size == (48, 48) for p in df["filepath"])


def test_tree_monitor_sees_a_child_allocation_and_cpu(bench):
    code = ("import time, subprocess, sys\n"
            "p = subprocess.Popen([sys.executable, '-c', 'b = bytearray(300 << 20); "
            "b[::4096] = b\"x\" * len(b[::4096]); "
            "import time; time.sleep(1.0)'])\n"
            "while time.process_time() < 0.6: pass\n"  # 0.6 s of CPU however loaded the machine is
            "p.wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    mon = bench.TreeMonitor(proc.pid, every=0.05, pss_every=2)
    mon.start()
    proc.wait()
    mon.done.set()
    mon.join()
    assert mon.peak_rss_kb > 300 * 1024  # the grandchild's 300 MB is counted in the tree
    assert 200 * 1024 < mon.peak_pss_kb <= mon.peak_rss_kb
    assert mon.peak_workers_pss_kb > 200 * 1024  # the grandchild is a worker, not the root
    t0, t1 = mon.series[0][0], mon.series[-1][0]
    assert mon.cpu_at(t1) - mon.cpu_at(t0) > 0.3  # the parent's busy loop
    assert mon.cpu_at(t0) <= mon.cpu_at((t0 + t1) / 2) <= mon.cpu_at(t1)


def test_steady_state_leaves_out_the_first_steps(bench):
    class FlatMonitor:
        def cpu_at(self, t):
            return 2.0 * t  # two busy cores

    res = {"start": 0.0, "end": 20.0, "step_times": [10.0, 11.0, 12.0, 12.5, 13.0]}
    out = bench.steady(res, FlatMonitor(), batch=8, skip=2)
    assert out["samples_per_s"] == pytest.approx(16 / 1.0)  # steps 3 and 4 in the second after step 2
    assert out["cpu_s_per_sample"] == pytest.approx(2.0 / 16)
    assert out["startup_s"] == 10.0 and out["steps"] == 5
    with pytest.raises(RuntimeError, match="skip-steps"):
        bench.steady(dict(res, step_times=[1.0, 2.0]), FlatMonitor(), batch=8, skip=1)


def test_missing_shards_end_with_one_sentence(bench, tmp_path):
    with pytest.raises(SystemExit, match="matches no shard file"):
        bench.main(["--shards", str(tmp_path / "nope-*.tar"), "--eval-shards", ""])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_run_of_both_trainers(bench, tmp_path, capsys, monkeypatch):
    write_shard(tmp_path / "train-00000.tar", 24)
    write_shard(tmp_path / "test-00000.tar", 10, start=100)
    # relative shard paths, as typed on a command line; the trainers run elsewhere
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    res = bench.main(["--quick", "--shards", "train-*.tar", "--eval-shards", "test-*.tar",
                      "--image-size", "64", "--batch-size", "8", "--samples", "48", "--skip-steps", "1",
                      "--workers", "1", "--threads", "1"])
    assert res["epochs"] == 2 and res["steps_per_epoch"] == 3 and res["samples"] == 48
    oc, mm = res["open_clip"], res["mmft"]
    assert oc["steps"] == mm["steps"] == 6
    assert oc["params"]["trained"] == res["total_params"]  # open_clip: full fine-tuning
    assert 0 < mm["params"]["trained"] == mm["trainable_parameters"] < res["total_params"] / 10
    for r in (oc, mm):
        assert r["samples_per_s"] > 0 and r["cpu_s_per_sample"] > 0
        assert r["peak_rss_kb"] >= r["vmhwm_kb"] > 100 * 1024
    for key in ("base", "open_clip", "mmft"):
        assert 0 <= res["eval"][key]["t2i_r1"] <= res["eval"][key]["t2i_r5"] <= 100
    assert res["eval"]["images"] == 10
    out = capsys.readouterr().out
    assert "| mmft, LoRA both towers |" in out and "speed mmft / open_clip" in out
    print(f"tiny run took {time.time() - t0:.0f} s")
