"""Benchmark mmft's contrastive losses against open_clip's ClipLoss / SigLipLoss and the reference.

Each configuration runs in its own subprocess, so one run's allocations cannot hide another's peak.
Measured: forward + backward wall time, the CPU time of all threads (steadier than wall time on a
shared machine), and the extra peak memory over what the inputs already hold
(CPU: peak RSS from /proc/self/status after resetting it through /proc/self/clear_refs; CUDA:
torch.cuda.max_memory_allocated minus the baseline). Prints a Markdown table.

  python tools/bench_loss.py                      # CPU B in 4096..32768 (D=512 fp32) and CUDA if present
  python tools/bench_loss.py --quick              # one small size per device
  python tools/bench_loss.py --device cpu --batch-sizes 4096,16384 --skip-peers-above 16384
  python tools/bench_loss.py --device cpu --batch-sizes 4096 --negatives 4 --impls open_clip,reference,chunked
  python tools/bench_loss.py --device cuda --dtypes bfloat16,float16 --one-process --json loss.jsonl

--one-process runs configurations one after another in one child process per device (on CUDA one per
implementation); CUDA peaks are reset before each run and stay exact, but on the CPU memory kept from an
earlier run hides part of a later peak (use one process per configuration for CPU memory figures);
Triton compiles and autotunes once per process;
--budget stops starting configurations after that many seconds (tools/gpu_check.sh fits its 8 minutes).
--negatives K adds rows with K extra negative images and texts per sample (mined hard negatives:
M = B*K on each side, gradients into the extras too). open_clip takes no extra negatives: those rows
run mmft's paths only (the reference holds B x (B + M) logits) and their ratio is against open_clip
without negatives at the same B.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_SIZES, CUDA_SIZES = (4096, 8192, 16384, 32768), (16384, 65536, 262144)
PEER = {"infonce": "open_clip.ClipLoss", "sigmoid": "open_clip.SigLipLoss"}
# Extra CPU bytes per logit (B^2) of the losses that materialise B x B, measured at B = 16384 fp32;
# used to skip a configuration that would not fit in the memory available now (not to OOM the box).
BYTES_PER_LOGIT = {("infonce", "open_clip"): 16.3, ("sigmoid", "open_clip"): 20.2,
                   ("infonce", "reference"): 24.1, ("sigmoid", "reference"): 28.1}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _loss_fn(kind: str, impl: str, extras=()):
    import torch  # noqa: F401

    if impl == "open_clip":
        from open_clip.loss import ClipLoss, SigLipLoss

        if kind == "infonce":
            return lambda x, y, s, b: ClipLoss()(x, y, s)
        return lambda x, y, s, b: SigLipLoss(rank=0, world_size=1)(x, y, s, b)
    from mmft.loss.contrastive import contrastive_loss, sigmoid_loss

    fn = contrastive_loss if kind == "infonce" else sigmoid_loss
    kw = dict(zip(("extra_image_features", "extra_text_features"), extras))
    return lambda x, y, s, b: fn(x, y, s, b, impl=impl, **kw)


def child(cfg: dict) -> dict:
    """Run one configuration in this process and return its measurements."""
    import torch

    dev, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(cfg["B"], cfg["D"], device=dev), dim=-1)
    y = torch.nn.functional.normalize(x + torch.randn_like(x), dim=-1)
    x, y = x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()
    s = torch.tensor(14.3, device=dev, requires_grad=True)
    b = torch.tensor(-10.0, device=dev, requires_grad=True)
    m = cfg["B"] * cfg.get("K", 0)  # extra negatives near random batch items, as mined ones are
    extras = [torch.nn.functional.normalize(t.detach()[torch.randint(0, cfg["B"], (m,), device=dev)].float()
                                            + 0.5 * torch.randn(m, cfg["D"], device=dev), dim=-1)
              .to(dtype).requires_grad_() for t in (x, y)] if m else []
    fn = _loss_fn(cfg["kind"], cfg["impl"], extras)
    cuda = dev == "cuda"

    def once():
        x.grad = y.grad = s.grad = b.grad = None
        for t in extras:
            t.grad = None
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn(x, y, s, b).backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    # Library start-up (BLAS buffers, thread pools; Triton compile and autotune) is a one-time cost
    # of the process, not of the loss: run once at a small batch before measuring.
    small = [t[:256].detach().requires_grad_() for t in (x, y)]
    fn(*small, s, b).backward()
    if cuda:
        once()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        exact = _reset_peak_rss()
        base = _status_kb("VmRSS") * 1024
    times = [once() for _ in range(cfg["repeat"])]
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:  # the first run's peak: later runs may reuse memory the allocator kept
        peak = _status_kb("VmHWM") * 1024 - base if exact else float("nan")
    wall, cpu = min(times)
    return {"time_s": wall, "cpu_s": cpu, "peak_mb": peak / 2**20, "threads": torch.get_num_threads()}


def child_many(cfgs: list[dict]) -> None:
    """Run configurations one after another in this process, printing one JSON line each as it ends."""
    import torch

    for cfg in cfgs:
        try:
            res = child(cfg)
        except torch.OutOfMemoryError:
            res = {"error": "OOM"}
        except RuntimeError as e:  # a kernel or CUDA failure: recorded, and the next one is tried
            res = {"error": (str(e).strip().splitlines() or ["RuntimeError"])[0][:60]}
        if cfg["device"] == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({"cfg": cfg, "res": res}), flush=True)


def run_group(cfgs: list[dict], timeout: float) -> list[dict]:
    """Results of `cfgs` run by one child process; those it did not reach in `timeout` say so."""
    cmd = [sys.executable, __file__, "--children", json.dumps(cfgs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
        why = f"child exited {proc.returncode}: {(err.strip().splitlines() or [''])[-1][:50]}"
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        why = "not run: time budget"
    done = [json.loads(line) for line in out.splitlines() if line.startswith('{"cfg"')]
    results = [d["res"] for d in done]
    return results + [{"error": why}] * (len(cfgs) - len(results))


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def run_config(cfg: dict, timeout: float) -> dict:
    per_logit = BYTES_PER_LOGIT.get((cfg["kind"], cfg["impl"])) if cfg["device"] == "cpu" else None
    if per_logit:
        logits = cfg["B"] ** 2 * (1 + 2 * cfg.get("K", 0))  # the batch block and two blocks of extras
        need, free = per_logit * logits / 2**30, _available_gb()
        if need > 0.85 * free:
            return {"error": f"skipped: needs ~{need:.0f} GB, {free:.0f} GB free"}
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout:.0f}s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": "OOM" if "out of memory" in tail.lower() or proc.returncode == -9 else tail[:60]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def configs(args) -> list[dict]:
    import torch

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
    out = []
    for dev in devices:
        default = CPU_SIZES if dev == "cpu" else CUDA_SIZES
        sizes = args.batch_sizes or (default[:1] if args.quick else default)
        dims = args.dims or ((512,) if dev == "cpu" or args.quick else (512, 768))
        impls = ["open_clip", "reference", "chunked"] + (["triton"] if dev == "cuda" else [])
        impls = [i for i in (args.impls or impls) if i in impls]  # in the order asked for
        dtypes = args.dtypes or ["float32" if dev == "cpu" else "bfloat16"]
        for kind in args.losses:
            for d in dims:
                for n in sizes:
                    for impl in impls:
                        peer = impl in ("open_clip", "reference")
                        if peer and args.skip_peers_above and n > args.skip_peers_above:
                            continue
                        out += [{"device": dev, "dtype": dt, "kind": kind, "impl": impl, "B": n, "D": d,
                                 "repeat": args.repeat} for dt in dtypes]
                        if impl != "open_clip":  # open_clip takes no extra negatives
                            out += [{**c, "K": k} for k in args.negatives for c in out[-len(dtypes):]]
    return out


def table(rows: list[tuple[dict, dict]]) -> str:
    peers = {(c["device"], c["dtype"], c["kind"], c["B"], c["D"]): r
             for c, r in rows if c["impl"] == "open_clip"}
    header = ("| loss | device | dtype | B | D | impl | fwd+bwd (s) | CPU time (s) | extra peak (MB) "
              "| time vs peer |")
    lines = [header, "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for c, r in rows:
        name = PEER[c["kind"]] if c["impl"] == "open_clip" else c["impl"]
        name += f" + K={c['K']} negatives per sample" if c.get("K") else ""
        if "error" in r:
            lines.append(f"| {c['kind']} | {c['device']} | {c['dtype']} | {c['B']} | {c['D']} | {name} | "
                         f"{r['error']} | | | |")
            continue
        peer = peers.get((c["device"], c["dtype"], c["kind"], c["B"], c["D"]), {})
        ratio = f"{r['time_s'] / peer['time_s']:.2f}x" if "time_s" in peer else ""
        lines.append(f"| {c['kind']} | {c['device']} | {c['dtype']} | {c['B']} | {c['D']} | {name} | "
                     f"{r['time_s']:.2f} | {r['cpu_s']:.1f} | {r['peak_mb']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--losses", type=lambda s: s.split(","), default=["infonce", "sigmoid"])
    p.add_argument("--batch-sizes", type=lambda s: tuple(int(v) for v in s.split(",")))
    p.add_argument("--dims", type=lambda s: tuple(int(v) for v in s.split(",")))
    p.add_argument("--impls", type=lambda s: s.split(","),
                   help="subset of open_clip,reference,chunked,triton (default: all that apply)")
    p.add_argument("--quick", action="store_true", help="one small batch size per device")
    p.add_argument("--skip-peers-above", type=int, default=0,
                   help="skip open_clip and the reference above this batch size (they hold B x B)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per configuration (min is kept)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument("--negatives", type=lambda s: [int(v) for v in s.split(",")], default=[],
                   help="also rows with K extra negatives per sample, e.g. 4 (mmft paths only)")
    p.add_argument("--dtypes", type=lambda s: s.split(","),
                   help="e.g. bfloat16,float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--one-process", action="store_true", help="one child process per implementation")
    p.add_argument("--budget", type=float, default=0, help="seconds for the whole run (0 = no limit)")
    p.add_argument("--json", help="also write every (configuration, result) as JSON lines to this file")
    p.add_argument("--children", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.children:
        child_many(json.loads(args.children))
        return
    rows = run_all(configs(args), args)
    if args.json:
        Path(args.json).write_text("".join(json.dumps({"cfg": c, "res": r}) + "\n" for c, r in rows))
    print(table(rows))


def run_all(cfgs: list[dict], args) -> list[tuple[dict, dict]]:
    """(configuration, result) pairs, one process per configuration or per implementation."""
    deadline = time.monotonic() + (args.budget or float("inf"))
    if not args.one_process:
        rows = []
        for cfg in cfgs:
            left = deadline - time.monotonic()
            res = run_config(cfg, min(args.timeout, left)) if left > 0 else {"error": "not run: time budget"}
            rows.append((cfg, res))
            print(json.dumps({**cfg, **res}), file=sys.stderr, flush=True)
        return rows
    groups: dict[tuple, list[dict]] = {}
    for cfg in cfgs:  # CUDA: a process per implementation, so a kernel failure cannot spoil the others
        groups.setdefault((cfg["device"], cfg["impl"] if cfg["device"] == "cuda" else ""), []).append(cfg)
    results: dict[int, dict] = {}
    for n, group in enumerate(groups.values()):  # the budget left is shared by the groups still to run
        left = (deadline - time.monotonic()) / (len(groups) - n)
        for cfg, res in zip(group, run_group(group, min(left, args.timeout * len(group)))):
            results[id(cfg)] = res
            print(json.dumps({**cfg, **res}), file=sys.stderr, flush=True)
    return [(cfg, results[id(cfg)]) for cfg in cfgs]


if __name__ == "__main__":
    main()
