#!/usr/bin/env python
"""mmft's LoRA trainer against open_clip's own trainer (open_clip_train.main), same data, same machine.

    python tools/bench_train.py                                   # demo DOMAIN train/test split, CPU
    python tools/bench_train.py --shards 'data/x/train-*.tar' --eval-shards 'data/x/test-*.tar' --samples 3072
    python tools/bench_train.py --quick                           # a tiny run (batch 16, one epoch)
    python tools/bench_train.py --mmft-set 'lora.image.layers=blocks\\.[3-6]\\.'  # another LoRA recipe
    python tools/bench_train.py --threads 1                       # on a machine other jobs are using

Both start from the same mmft-mini weights (EfficientNet-Lite0 + MiniLM-L6, fresh projections, exported
once to base.pt) at the same input size, batch size, DataLoader workers, fp32, and take the same number
of optimizer steps. open_clip trains every parameter (its default: full fine-tuning) on a TSV made from
the shards (images extracted, first caption per image); mmft trains its default LoRA on both towers plus
projections and temperature, straight from the shards. Each trainer runs alone in its own process.

Measured the same way for both:
- samples/s: a post-hook on every optimizer step (torch's global hook) stamps the time; steady state is
  the wall time from step `--skip-steps` to the last step (model build, data start-up and the first
  steps left out; epoch restarts of the DataLoader left in, both tools have them).
- CPU s/sample over the same window: the process tree's utime+stime (+ reaped workers), from /proc.
  Less sensitive than samples/s to other jobs on a shared machine.
- peak memory: the process tree (trainer + DataLoader workers) polled every 0.2 s from /proc: the peak
  of the summed VmRSS (double-counts pages the forked workers share with the trainer), the peak of the
  summed PSS (shared pages split between processes, polled every 1 s), and the trainer's own VmHWM.
- domain recall after training: text->image and image->text R@1/R@5 on the eval shards with
  mmft.training.validate.retrieval_recall, for the untrained base, open_clip's final checkpoint and mmft's
  adapter.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = "data/demo/openclipart/domain"
# mmft / open_clip: at least 1.5x the samples/s, at most 0.6x the memory
TARGET_SPEED, TARGET_MEMORY = 1.5, 0.6
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- child processes (one trainer each)


class StepClock:
    """Stamps time.monotonic() after every optimizer step of any torch optimizer in this process."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times: list[float] = []
        self.params: dict[str, int] = {}
        register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        self.times.append(time.monotonic())
        if len(self.times) == 1:  # what this trainer actually trains: parameters that received a gradient
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.params = {"in_optimizer": sum(p.numel() for p in params),
                           "trained": sum(p.numel() for p in params if p.grad is not None)}


def child_open_clip(spec: dict) -> dict:
    from mmft.model.factory import mini_model_config, register_model_config

    clock = StepClock()
    # open_clip resolves --model through its registry, so mmft-mini's config must be in it first.
    register_model_config("mmft-mini", mini_model_config(image_size=spec["image_size"]))
    from open_clip_train.main import main as open_clip_main

    rc = open_clip_main(spec["argv"])
    if rc not in (None, 0):
        raise RuntimeError(f"open_clip_train.main returned {rc}; see {spec['logs']}")
    return {"step_times": clock.times, "params": clock.params}


def child_mmft(spec: dict) -> dict:
    clock = StepClock()
    from mmft.config import ModelConfig, load_config
    from mmft.rundir import RunDir
    from mmft.training.trainer import train

    cfg = load_config(None, spec.get("mmft_set", []))  # the defaults, or a recipe variant to compare
    cfg.model = ModelConfig(name="mmft-mini", image_size=spec["image_size"], pretrained=spec["base"])
    cfg.data.train, cfg.data.batch_size = spec["shards"], spec["batch_size"]
    cfg.data.num_workers = spec["workers"]
    t = cfg.train
    t.output_dir, t.steps, t.precision, t.device = spec["run_dir"], spec["steps"], "fp32", "cpu"
    t.lr, t.warmup_steps, t.log_every, t.resume, t.seed = spec["lr"], spec["warmup"], 1, False, 0
    run_dir = train(cfg)
    summary = RunDir(run_dir).summary()
    return {"step_times": clock.times, "params": clock.params, "self_reported_sps": summary["samples_per_s"],
            "trainable_parameters": summary["trainable_parameters"]}


def child_main(role: str, spec_path: str) -> None:
    import resource

    spec = json.loads(Path(spec_path).read_text())
    out = {"start": time.monotonic()}
    if spec["threads"]:
        import torch

        torch.set_num_threads(spec["threads"])
    out.update((child_open_clip if role == "open_clip" else child_mmft)(spec))
    out["end"] = time.monotonic()
    out["vmhwm_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the trainer's own peak RSS
    Path(spec["result"]).write_text(json.dumps(out))


# ---------------------------------------------------------------- the process-tree monitor


def _tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    return pids


def _proc_numbers(pid: int, pss: bool) -> tuple[int, float, int]:
    """(VmRSS kB, CPU s incl. reaped children, Pss kB or 0) of one process; zeros once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = sum(int(x) for x in stat[11:15]) / CLK_TCK  # utime stime cutime cstime
        rss = next((int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS:")), 0)
        pss_kb = 0
        if pss:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            pss_kb = next((int(line.split()[1]) for line in rollup if line.startswith("Pss:")), 0)
        return rss, cpu, pss_kb
    except (OSError, IndexError, ValueError):
        return 0, 0.0, 0


class TreeMonitor(threading.Thread):
    """Polls a process tree: series of (time, CPU s) and the peaks of summed RSS and PSS."""

    def __init__(self, pid: int, every: float = 0.2, pss_every: int = 5):
        super().__init__(daemon=True)
        self.pid, self.every, self.pss_every = pid, every, pss_every
        self.series: list[tuple[float, float]] = []
        self.peak_rss_kb = self.peak_pss_kb = self.peak_workers_pss_kb = 0
        self.done = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self.done.is_set():
            pss = tick % self.pss_every == 0
            nums = [_proc_numbers(p, pss) for p in _tree(self.pid)]
            self.series.append((time.monotonic(), sum(n[1] for n in nums)))
            self.peak_rss_kb = max(self.peak_rss_kb, sum(n[0] for n in nums))
            if pss:
                self.peak_pss_kb = max(self.peak_pss_kb, sum(n[2] for n in nums))
                self.peak_workers_pss_kb = max(self.peak_workers_pss_kb, sum(n[2] for n in nums[1:]))
            tick += 1
            self.done.wait(self.every)

    def cpu_at(self, t: float) -> float:
        """Tree CPU seconds at time t, linearly interpolated between polls."""
        s = self.series
        for (t0, c0), (t1, c1) in itertools.pairwise(s):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)
        return s[-1][1] if s and t > s[-1][0] else (s[0][1] if s else 0.0)


def run_child(role: str, spec: dict, work: Path) -> dict:
    """Run one trainer in its own process under the monitor; return its measurements."""
    spec = dict(spec, result=str(work / f"{role}-result.json"))
    spec_path = work / f"{role}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    load = os.getloadavg()[0]
    with open(work / f"{role}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", role, str(spec_path)], cwd=work,
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        mon = TreeMonitor(proc.pid)
        mon.start()
        rc = proc.wait()
        mon.done.set()
        mon.join()
    if rc != 0:
        tail = (work / f"{role}.log").read_text()[-3000:]
        raise RuntimeError(f"the {role} trainer failed (exit {rc}); last lines of "
                           f"{work / (role + '.log')}:\n{tail}")
    res = json.loads(Path(spec["result"]).read_text())
    res.update(peak_rss_kb=mon.peak_rss_kb, peak_pss_kb=mon.peak_pss_kb,
               peak_workers_pss_kb=mon.peak_workers_pss_kb, load_before=load)
    return steady(res, mon, spec["batch_size"], spec["skip_steps"])


def steady(res: dict, mon: TreeMonitor, batch: int, skip: int) -> dict:
    """samples/s and CPU s/sample from step `skip` to the last step."""
    times = res["step_times"]
    if len(times) < skip + 2:
        raise RuntimeError(f"only {len(times)} optimizer steps ran; need more than --skip-steps {skip} + 1")
    n = (len(times) - 1 - skip) * batch
    cpu = mon.cpu_at(times[-1]) - mon.cpu_at(times[skip])
    res.update(steps=len(times), samples_per_s=n / (times[-1] - times[skip]), cpu_s_per_sample=cpu / n,
               startup_s=times[0] - res["start"], total_s=res["end"] - res["start"])
    return res


# ---------------------------------------------------------------- preparation and evaluation (this process)


def write_tsv(shards: list[str], out_dir: Path) -> tuple[Path, int]:
    """Extract the shards' images and write open_clip's TSV (filepath, title = first caption).
    -> (tsv, rows)."""
    from mmft.data import stages as st

    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    stats, rows = st.SkipStats(), []
    for sample in st.read_shards(shards, stats):
        try:
            caption = st.parse_captions(sample)[0]
            st.decode_image(sample)  # what mmft would skip, open_clip must not see either
        except st.SkipSample:
            continue
        ext = next(e for e in st.IMAGE_EXTS if e in sample)
        path = img_dir / f"{len(rows):08d}.{ext}"
        path.write_bytes(sample[ext])
        rows.append((str(path), " ".join(caption.split())))  # no tabs or newlines inside a field
    tsv = out_dir / "train.tsv"
    with open(tsv, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    return tsv, len(rows)


def export_base(image_size: int, path: Path) -> int:
    """Save a fresh mmft-mini (packaged towers, seeded projections) as a plain state dict.
    -> parameter count."""
    import torch

    from mmft.config import ModelConfig
    from mmft.model.factory import create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(name="mmft-mini", image_size=image_size))[0]
    torch.save(model.state_dict(), path)
    return sum(p.numel() for p in model.parameters())


def open_clip_argv(a, tsv: Path, base: Path, epochs: int, logs: Path) -> list[str]:
    """open_clip_train.main arguments matching mmft's run: full fine-tuning, fp32, CPU, same optimizer
    knobs."""
    return ["--model", "mmft-mini", "--pretrained", str(base), "--train-data", str(tsv),
            "--dataset-type", "csv", "--csv-separator", "\t", "--csv-img-key", "filepath",
            "--csv-caption-key", "title",
            "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--epochs", str(epochs),
            "--lr", str(a.oc_lr), "--warmup", str(a.warmup), "--wd", "0.1", "--beta1", "0.9",
            "--beta2", "0.98",
            "--eps", "1e-6", "--grad-clip-norm", "1.0", "--precision", "fp32", "--device", "cpu",
            "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.5", "0.5", "0.5",
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0",
            "--log-every-n-steps", "1",
            "--logs", str(logs), "--name", "bench", "--report-to", "", "--seed", "0"]


def evaluate(a, base: Path, oc_ckpt: Path, run_dir: Path) -> dict:
    """Recall on the eval shards of the untrained base, open_clip's final checkpoint and mmft's adapter."""
    import torch

    from mmft.config import DataConfig, ModelConfig
    from mmft.data.stream import eval_loader
    from mmft.model.adapter import load_model
    from mmft.model.factory import create_model
    from mmft.training.validate import retrieval_recall

    model, _, preprocess, tokenizer = create_model(ModelConfig(name="mmft-mini", image_size=a.image_size,
                                                               pretrained=str(base)))
    batches = list(eval_loader(a.eval_shards, DataConfig(num_workers=a.workers), preprocess))
    out = {"base": retrieval_recall(model, batches, tokenizer, "cpu"),
           "images": sum(len(b["key"]) for b in batches)}
    # open_clip's checkpoint holds only tensors, numbers and strings, so it loads without running code
    state = torch.load(oc_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    out["open_clip"] = retrieval_recall(model, batches, tokenizer, "cpu")
    loaded = load_model(run_dir)
    out["mmft"] = retrieval_recall(loaded.model, batches, loaded.tokenizer, "cpu")
    return out


# ---------------------------------------------------------------- report


def _recall(m: dict | None, way: str) -> str:
    return f"{m[way + '_r1']:.1f} / {m[way + '_r5']:.1f}" if m else "-"


def _gb(kb: float) -> str:
    return f"{kb / 2**20:.2f}"


def _header(res: dict) -> str:
    ev = res.get("eval", {})
    return (f"mmft-mini towers, batch {res['batch_size']}, {res['image_size']} px, fp32, "
            f"CPU ({os.cpu_count()} cores, {res['threads'] or 'default'} torch threads), "
            f"{res['samples']} samples ({res['epochs']} epochs x "
            f"{res['steps_per_epoch']} steps); steady state from step {res['skip_steps']}; load average "
            f"{res['load_start']:.2f} at start, {res['load_end']:.2f} at end. "
            f"Recall on {ev.get('images', '?')} eval images, text->image and image->text R@1 / R@5 (%)."
            + (f" mmft config overrides: {' '.join(res['mmft_set'])}." if res.get("mmft_set") else ""))


def _ratios(oc: dict, mm: dict) -> list[str]:
    speed, cpu = mm["samples_per_s"] / oc["samples_per_s"], oc["cpu_s_per_sample"] / mm["cpu_s_per_sample"]
    mem, pss = mm["peak_rss_kb"] / oc["peak_rss_kb"], mm["peak_pss_kb"] / max(oc["peak_pss_kb"], 1)
    verdict = {True: "meets", False: "misses"}
    return [
        (f"- speed mmft / open_clip: {speed:.2f}x samples/s ({verdict[speed >= TARGET_SPEED]} the "
         f">= {TARGET_SPEED}x target); open_clip uses {cpu:.2f}x the CPU seconds per sample"),
        (f"- memory mmft / open_clip: {mem:.2f}x peak RSS of the tree ({verdict[mem <= TARGET_MEMORY]} the "
         f"<= {TARGET_MEMORY}x target); {pss:.2f}x peak PSS; "
         f"{mm['vmhwm_kb'] / oc['vmhwm_kb']:.2f}x the trainer's VmHWM; "
         f"DataLoader workers' peak PSS: open_clip {_gb(oc['peak_workers_pss_kb'])} GB, "
         f"mmft {_gb(mm['peak_workers_pss_kb'])} GB"),
        (f"- start-up to the first step: open_clip {oc['startup_s']:.1f} s, mmft {mm['startup_s']:.1f} s; "
         f"each tool's own speed report: open_clip {oc['self_reported_sps']:.1f} samples/s "
         "(median per step), "
         f"mmft {mm['self_reported_sps']:.1f} samples/s (whole run)"),
    ]


def table(res: dict) -> str:
    """The Markdown report: one row per trainer, the base's recall, and the ratios against the targets."""
    ev = res.get("eval", {})
    lines = [_header(res), "",
             ("| trainer | trained params | samples/s | CPU s/sample | peak RSS tree (GB) "
              "| peak PSS tree (GB) | trainer VmHWM (GB) | t2i R@1/R@5 | i2t R@1/R@5 |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             (f"| base (untrained) | - | - | - | - | - | - | {_recall(ev.get('base'), 't2i')} | "
              f"{_recall(ev.get('base'), 'i2t')} |")]
    for key, label in (("open_clip", "open_clip_train, full fine-tuning"),
                       ("mmft", "mmft, LoRA both towers")):
        r = res[key]
        lines.append(f"| {label} | {r['params']['trained'] / 1e6:.2f} M | {r['samples_per_s']:.1f} | "
                     f"{r['cpu_s_per_sample']:.3f} | {_gb(r['peak_rss_kb'])} | {_gb(r['peak_pss_kb'])} | "
                     f"{_gb(r['vmhwm_kb'])} | {_recall(ev.get(key), 't2i')} | "
                     f"{_recall(ev.get(key), 'i2t')} |")
    return "\n".join(lines + [""] + _ratios(res["open_clip"], res["mmft"]))


def open_clip_reported_sps(log: Path, skip: int) -> float:
    """Median of open_clip's own per-step 'Batch (t): ..., N/s' over the steady steps of its out.log."""
    import re
    import statistics

    vals = [float(m.group(1)) for m in re.finditer(r"Batch \(t\): [\d.]+, ([\d.]+)/s", log.read_text())]
    return statistics.median(vals[skip:] or vals) if vals else float("nan")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default=f"{DEMO}/train-*.tar", help="training shards (img2dataset layout)")
    p.add_argument("--eval-shards", default=f"{DEMO}/test-*.tar",
                   help="domain test shards for recall ('' = none)")
    p.add_argument("--samples", type=int, help="samples to train on, rounded to whole epochs (default 1536)")
    p.add_argument("--batch-size", type=int, help="default 64")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of each trainer")
    p.add_argument("--lr", type=float, default=5e-4, help="mmft's learning rate (its default)")
    p.add_argument("--oc-lr", type=float, default=1e-4, help="open_clip's learning rate (full fine-tuning)")
    p.add_argument("--warmup", type=int, default=10, help="warmup steps of both")
    p.add_argument("--mmft-set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of mmft's config, e.g. 'lora.image.layers=blocks\\.[3-6]\\.' "
                        "(repeatable); the data, model, steps, lr, warmup, precision and device stay as set "
                        "here")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of each trainer (0 = torch's default, one per core); 1 avoids the "
                        "OpenMP spin-waits that inflate both tools' times when other jobs share the cores")
    p.add_argument("--skip-steps", type=int, help="first optimizer steps left out of the speed (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="tiny run: defaults 128 samples, batch 16, skip 2 steps")
    p.add_argument("--work-dir", default="", help="keep the runs here (default: a temporary folder, removed)")
    p.add_argument("--json", default="", help="also write every measurement to this JSON file")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    defaults = {"samples": 128, "batch_size": 16, "skip_steps": 2} if a.quick else \
        {"samples": 1536, "batch_size": 64, "skip_steps": 3}
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


def expand_or_exit(a) -> list[str]:
    """The training shard paths; a missing shard or eval shard ends the script with one sentence."""
    from mmft.data.stages import DataError
    from mmft.data.stream import expand_specs

    try:
        # the trainers run in the work folder: local paths must not depend on this process's cwd
        shards = [s if "://" in s or s.startswith("pipe:") else os.path.abspath(s)
                  for s in expand_specs(a.shards)]
        if a.eval_shards:
            expand_specs(a.eval_shards)
    except DataError as e:
        hint = " (make the demo data first: `make demo`)" if DEMO in a.shards + a.eval_shards else ""
        raise SystemExit(f"bench_train: {e}{hint}") from None
    return shards


def run(a, work: Path) -> dict:
    shards = expand_or_exit(a)
    res = {"mmft_set": a.mmft_set, "batch_size": a.batch_size, "image_size": a.image_size,
           "skip_steps": a.skip_steps, "threads": a.threads, "load_start": os.getloadavg()[0]}
    base = work / "base.pt"
    res["total_params"] = export_base(a.image_size, base)
    tsv, rows = write_tsv(shards, work / "tsv")
    per_epoch = rows // a.batch_size  # open_clip drops the last partial batch of each epoch
    if per_epoch == 0:
        raise SystemExit(f"bench_train: {rows} usable samples in {a.shards} make no batch of {a.batch_size}")
    epochs = max(1, round(a.samples / (per_epoch * a.batch_size)))
    res.update(rows=rows, steps_per_epoch=per_epoch, epochs=epochs, samples=epochs * per_epoch * a.batch_size)
    common = {"image_size": a.image_size, "batch_size": a.batch_size, "skip_steps": a.skip_steps,
              "threads": a.threads}
    argv = open_clip_argv(a, tsv, base, epochs, work / "open_clip")
    res["open_clip_argv"] = argv
    print(f"bench_train: {rows} samples, {epochs} epochs x {per_epoch} steps of {a.batch_size}; "
          "open_clip ...", file=sys.stderr, flush=True)
    res["open_clip"] = run_child("open_clip", dict(common, argv=argv, logs=str(work / "open_clip")), work)
    res["open_clip"]["self_reported_sps"] = open_clip_reported_sps(work / "open_clip/bench/out.log",
                                                                   a.skip_steps)
    print("bench_train: mmft ...", file=sys.stderr, flush=True)
    res["mmft"] = run_child("mmft", dict(common, base=str(base), shards=shards, workers=a.workers,
                                         run_dir=str(work / "mmft"), steps=epochs * per_epoch, lr=a.lr,
                                         warmup=a.warmup, mmft_set=a.mmft_set), work)
    res["load_end"] = os.getloadavg()[0]
    if a.eval_shards:
        print("bench_train: recall ...", file=sys.stderr, flush=True)
        res["eval"] = evaluate(a, base, work / f"open_clip/bench/checkpoints/epoch_{epochs}.pt",
                               work / "mmft")
    return res


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.child:
        child_main(*a.child)
        return {}
    if a.work_dir:
        work = Path(a.work_dir).resolve()
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"bench_train: --work-dir {work} is not empty; give a new or empty folder")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="mmft-bench-train-"))
    try:
        res = run(a, work)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    print(table(res))
    return res


if __name__ == "__main__":
    main()
