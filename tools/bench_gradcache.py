#!/usr/bin/env python
"""Gradient caching against the plain step: peak memory and samples/s against batch size, one run.

    python tools/bench_gradcache.py                                   # mmft-mini, 64 px, B 256..2048, CPU
    python tools/bench_gradcache.py --batches 256 1024 4096 8192 --image-size 160 --micro 128

Each (batch size, mode) runs in a child process of its own, so its peak RSS is its own: mmft-mini with
the default LoRA on both towers, one synthetic batch (random pixels, --text-len random token ids), the
chunked InfoNCE loss, one warm-up step at the micro-batch size, then `--steps` timed forward+backward steps of
the whole batch (plain: one forward with autograd; grad cache: train.grad_cache with
train.micro_batch_size = --micro). Reported: samples/s over the timed steps and the process's CPU time
per sample (user + system: steadier than samples/s on a machine other jobs share); the step's peak RSS above
the RSS before it (the activations and gradients the step adds; VmHWM reset through
/proc/self/clear_refs), and the process's whole peak RSS. The input batch itself (B x 3 x S x S floats)
is allocated before the step, so it is in the whole peak but not in the step's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from mmft.config import LoraConfig, ModelConfig
    from mmft.loss.contrastive import contrastive_loss
    from mmft.model.factory import create_model
    from mmft.model.lora import apply_lora, train_mode
    from mmft.training.forward import PairEncoder, plain_backward
    from mmft.training.grad_cache import grad_cache_backward

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, *_ = create_model(ModelConfig(name="mmft-mini", image_size=args.image_size))
    apply_lora(model, LoraConfig())
    train_mode(model)
    enc = PairEncoder(model)
    b = args.batch

    def loss_fn(out, **groups):
        return contrastive_loss(**out, **groups, impl="chunked")

    def step(inputs):
        if args.mode == "plain":
            return plain_backward(enc, loss_fn, inputs, {}, contextlib.nullcontext, lambda x: x)
        return grad_cache_backward(enc, loss_fn, inputs, {}, args.micro, autocast=contextlib.nullcontext,
                                   scale_loss=lambda x: x, sync=lambda last: contextlib.nullcontext(),
                                   device=torch.device("cpu"))

    def batch(n):
        return {"images": torch.randn(n, 3, args.image_size, args.image_size),  # (n, 3, S, S)
                "texts": torch.randint(1, 30000, (n, args.text_len))}  # (n, L)

    step(batch(min(args.micro, b)))  # warm-up: allocator, thread pools, lazy inits
    model.zero_grad(set_to_none=True)
    inputs = batch(b)
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0, cpu0 = time.perf_counter(), sum(os.times()[:2])
    for _ in range(args.steps):
        step(inputs)
        model.zero_grad(set_to_none=True)
    seconds, cpu = time.perf_counter() - t0, sum(os.times()[:2]) - cpu0
    peak = _status_kb("VmHWM")
    return {"batch": b, "mode": args.mode, "samples_per_s": b * args.steps / seconds,
            "cpu_ms_per_sample": 1e3 * cpu / (b * args.steps),
            "step_peak_mb": (peak - before) / 1024, "process_peak_mb": peak / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--micro", type=int, default=128, help="train.micro_batch_size for the grad-cache rows")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--text-len", type=int, default=32, help="tokens per caption (the demo's captions fit 32)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["plain", "grad_cache"])
    p.add_argument("--json", default="", help="also write the rows to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    print(f"mmft-mini, LoRA both towers, {args.image_size} px, {args.text_len} tokens, chunked InfoNCE, "
          f"micro-batch {args.micro}, {args.threads} threads, {args.steps} timed step(s)")
    print(f"{'batch':>6} {'mode':>10} {'samples/s':>10} {'CPU ms/sample':>14} {'step peak MB':>13} "
          f"{'process peak MB':>16}")
    for b in args.batches:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", "--batch", str(b), "--mode", mode, "--micro",
                   str(args.micro), "--image-size", str(args.image_size), "--text-len", str(args.text_len),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"{b:>6} {mode:>10} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{b:>6} {mode:>10} {r['samples_per_s']:>10.1f} {r['cpu_ms_per_sample']:>14.1f} "
                  f"{r['step_peak_mb']:>13.0f} "
                  f"{r['process_peak_mb']:>16.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
