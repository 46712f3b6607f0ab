#!/usr/bin/env python
"""Benchmark `mmft serve` on loopback: text-query throughput and latency against two references, memory of
one base + N tenants against N merged models, and a reload under load.

    python tools/bench_serve.py                        # demo index (if runs/demo exists) + 100k synthetic
    python tools/bench_serve.py --galleries synthetic --clients 1 8 32 --seconds 5

Per gallery and client count C: C concurrent clients (one asyncio process, a keep-alive connection
each) send text queries in a loop, bounded by --seconds and --max-requests, against a `mmft serve`
subprocess on 127.0.0.1 (1 worker, the encoder in its child process). References measured in the same
run: the offline limit (the same queries through the same encoder, in this process, in batches of
batching.max_batch, then one FAISS search per batch, no HTTP) and the same service with batching off
(every query encoded alone). Memory, in fresh processes: tensor bytes held and resident memory added by
loading the base alone, the base + N tenant adapters (one TorchEncoder), N separately loaded merged
models. Reload: 32 clients while POST /admin/reload swaps every tenant; p99 and failed requests.
The query encoder is mmft-mini (packaged towers); the synthetic gallery is random unit vectors.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ["red", "small", "old", "striped", "green", "wooden", "flying", "sleeping", "blue", "tall"]
THINGS = ["fox", "apple", "tree", "bird", "flower", "cat", "house", "fish", "mushroom", "horse", "leaf",
          "cup"]
ADMIN = "bench-admin-token"


def synthetic_queries(n: int) -> list[str]:
    return [f"a {WORDS[i % 10]} {WORDS[(i // 10) % 10]} {THINGS[i % 12]}" for i in range(n)]


# ---------------------------------------------------------------- set-up (a temp folder)


def build_synthetic(root: Path, n: int, tenants: int) -> dict:
    """mmft-mini base; `tenants` random LoRA adapters (t0 owns the n-vector random gallery, the others 1,000
    vectors); the baseline a 1,000-vector gallery. Returns the serve config's base/tenants/baseline."""
    import torch

    from mmft.config import IndexConfig, LoraConfig, LoraTowerConfig, ModelConfig
    from mmft.index import build_index
    from mmft.model.adapter import save_adapter
    from mmft.model.factory import create_model
    from mmft.model.lora import apply_lora

    model = create_model(ModelConfig(name="mmft-mini"))[0].eval()
    rng = np.random.default_rng(0)
    flat = IndexConfig(factory="Flat", use_gpu="never")
    build_index(rng.standard_normal((1000, 256)).astype(np.float32), root / "index-baseline", model=model,
                index_cfg=flat)
    apply_lora(model, LoraConfig(image=LoraTowerConfig(layers=r"blocks\.[4-6]\.|conv_head")))
    tenant_cfg = {}
    for t in range(tenants):
        torch.manual_seed(t)
        with torch.no_grad():  # stand-in for training: every tenant a different non-zero delta
            for name, p in model.named_parameters():
                if "lora_B" in name or name.startswith(("visual.head", "text.proj")):
                    p.add_(torch.randn_like(p) * 0.01)
        save_adapter(model, root / f"adapter-{t}")
        size = n if t == 0 else 1000
        build_index(rng.standard_normal((size, 256)).astype(np.float32), root / f"index-{t}", model=model,
                    ids=[f"g{i:07d}" for i in range(size)], index_cfg=flat)
        tenant_cfg[f"t{t}"] = {"adapter": str(root / f"adapter-{t}"), "index": str(root / f"index-{t}")}
    return {"base": {"model": {"name": "mmft-mini"}}, "tenants": tenant_cfg,
            "baseline": {"index": str(root / "index-baseline")}}


THREADS = [1]  # torch threads of the encoder (service and offline limit alike); set by --threads


def serve_config(base: dict, port: int, batching: bool) -> dict:
    return {**base, "base": {**base["base"], "threads": THREADS[0]},
            "batching": {"enabled": batching, "max_batch": 64, "max_wait_ms": 2.0},
            "limits": {"request_timeout_s": 60.0}, "auth": {"admin_token": ADMIN}, "feedback": {"path": ""},
            "server": {"host": "127.0.0.1", "port": port, "workers": 1, "reload_poll_s": 1.0}}


# ---------------------------------------------------------------- the server subprocess


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mmft serve` in a subprocess on 127.0.0.1; waits (bounded) until /readyz answers, stops on exit."""

    def __init__(self, cfg: dict, folder: Path, name: str, timeout_s: float = 600):
        self.port = free_port()
        cfg = {**cfg, "server": {**cfg["server"], "port": self.port}}
        self.path = folder / f"{name}.yaml"
        self.path.write_text(json.dumps(cfg))  # YAML reads JSON
        self.log = folder / f"{name}.log"
        self.url, self.timeout_s, self.proc = f"http://127.0.0.1:{self.port}", timeout_s, None

    def __enter__(self):
        import httpx

        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mmft", "serve", "--config", str(self.path)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: see {self.log}:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"the server was not ready within {self.timeout_s:.0f} s ({self.log})")

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- load generation


class Connection:
    """One keep-alive HTTP/1.1 connection on loopback, a few lines of asyncio streams.

    The load generator: httpx's connection pool itself capped at ~80 requests/s with 32 concurrent
    clients on this machine (against ~250/s with one), so it would have measured the client.
    """

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port, self.reader, self.writer = host, int(port), None, None

    async def post(self, path: str, payload: dict, headers: str = "") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n{headers}"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            self.writer.write(head + body)
            status = int((await self.reader.readline()).split()[1])
            length = 0
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            return status, await self.reader.readexactly(length)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _clients(url: str, tenant: str, queries: list[str], clients: int, seconds: float, max_requests: int,
                   during=None) -> dict:
    """`clients` loops sending text queries until `seconds` pass or `max_requests` are sent (both bounds)."""
    latencies, failures, sent = [], {}, [0]
    deadline = time.monotonic() + seconds

    async def loop(c):
        conn, i = Connection(url), c
        while time.monotonic() < deadline and sent[0] < max_requests:
            sent[0] += 1
            t0 = time.perf_counter()
            try:
                query = {"tenant": tenant, "text": queries[i % len(queries)], "k": 10}
                status, _ = await conn.post("/search/text", query)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
                status = type(e).__name__
            latencies.append((time.perf_counter() - t0, t0, status == 200))
            if status != 200:
                failures[str(status)] = failures.get(str(status), 0) + 1
            i += clients
        conn.close()

    start = time.perf_counter()
    extra = [during(url)] if during is not None else []
    await asyncio.gather(*(loop(c) for c in range(clients)), *extra)
    wall = time.perf_counter() - start
    lat = np.array([x[0] for x in latencies]) * 1000
    pct = {f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)}
    return {"clients": clients, "requests": len(lat), "errors": sum(failures.values()), "failures": failures,
            "qps": len(lat) / wall, **pct, "raw": latencies}


def load(url, tenant, queries, clients, seconds, max_requests, during=None) -> dict:
    asyncio.run(_clients(url, tenant, queries, 2, 1.0, 20))  # warm-up
    return asyncio.run(_clients(url, tenant, queries, clients, seconds, max_requests, during))


def offline_limit(cfg: dict, tenant: str, queries: list[str], seconds: float, batch: int = 64) -> dict:
    """Queries/s of the same encoder + FAISS search in batches, no HTTP: the ceiling for the service."""
    from mmft.serve.config import serve_config_from_dict
    from mmft.serve.state import ServeState

    cfg = {**cfg, "base": {**cfg["base"], "process": False}}  # the encoder itself, in this process
    st = ServeState(serve_config_from_dict(cfg))
    st.start()
    t = st.registry.tenants[tenant]
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 2 * batch:
        chunk = [queries[(done + j) % len(queries)] for j in range(batch)]
        t.images.search_rows(st.encoder.encode_text(chunk, t.slot), 10)  # (batch, 10)
        done += batch
    return {"qps": done / (time.perf_counter() - start), "batch": batch}


# ---------------------------------------------------------------- memory (fresh processes)


def memory_probe(mode: str, cfg_path: str) -> dict:
    """Resident memory (MiB) before and after loading `mode` in this process: base | tenants | merged."""
    import gc

    import faiss  # noqa: F401  (every import the serving path needs, before the first reading)
    import open_clip  # noqa: F401
    import torch

    from mmft.config import ModelConfig
    from mmft.model.adapter import load_adapter
    from mmft.model.factory import create_model
    from mmft.model.lora import merge_lora
    from mmft.serve.config import serve_config_from_dict
    from mmft.serve.torch_encoder import TorchEncoder

    def tensor_mib(objects) -> float:
        """MiB of the distinct tensor storages (parameters, buffers, adapter slots) the objects hold."""
        seen = {}
        for obj in objects:
            model = obj.model if isinstance(obj, TorchEncoder) else obj
            tensors = list(model.parameters()) + list(model.buffers())
            if isinstance(obj, TorchEncoder):
                tensors += list(obj._base.values())
                for s in obj._slots.values():
                    tensors += list(s.full.values())
                    tensors += [x for a, b, _ in s.lora.values() for x in (a, b) if x is not None]
            for t in tensors:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values()) / 2**20

    def rss() -> float:
        gc.collect()
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024

    cfg = serve_config_from_dict(json.loads(Path(cfg_path).read_text()))
    before = rss()
    keep = []
    if mode == "merged":  # N separately loaded models, each with its adapter merged in
        for t in cfg.tenants.values():
            m = create_model(ModelConfig(name="mmft-mini"))[0].eval()
            load_adapter(m, t.adapter)
            keep.append(merge_lora(m))
            with torch.inference_mode():
                m.encode_text(torch.zeros(1, 8, dtype=torch.long))
    else:
        if mode == "base":
            cfg.tenants = {}
        enc = TorchEncoder.from_config(cfg)
        enc.load_tenant("baseline", None, 0.0)
        for name, t in cfg.tenants.items():
            enc.load_tenant(name, t.adapter, 1.0)
        for slot in enc.tenants:
            enc.encode_text(["warm up"], slot)
        keep.append(enc)
    out = {"mode": mode, "models": len(keep) if mode == "merged" else 1, "before_mib": before,
           "after_mib": rss(), "tensor_mib": tensor_mib(keep)}
    if mode == "tenants":  # what the slots hold: LoRA factors vs fully trained parameters (projections)
        slots = keep[0]._slots.values()
        out["slot_lora_mib"] = sum(x.nbytes for s in slots for a, b, _ in s.lora.values()
                                   for x in (a, b) if x is not None) / 2**20
        out["slot_full_mib"] = sum(t.nbytes for s in slots for t in s.full.values()) / 2**20
    return out


def measure_memory(cfg: dict, folder: Path) -> dict:
    path = folder / "memory.json"
    path.write_text(json.dumps(cfg))
    out = {}
    for mode in ("base", "tenants", "merged"):
        done = subprocess.run([sys.executable, __file__, "--memory-probe", mode, str(path)],
                              capture_output=True, text=True, timeout=1200, check=True)
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        out[mode]["added_mib"] = out[mode]["after_mib"] - out[mode]["before_mib"]
    return out


# ---------------------------------------------------------------- reload under load


def reload_under_load(cfg: dict, folder: Path, tenant: str, queries: list[str], seconds: float) -> dict:
    window = {}

    async def reload_midway(url):
        await asyncio.sleep(seconds / 3)
        window["start"] = time.perf_counter()
        status, _ = await Connection(url).post("/admin/reload", {}, f"Authorization: Bearer {ADMIN}\r\n")
        window["end"], window["status"] = time.perf_counter(), status

    with Server(serve_config(cfg, 0, True), folder, "reload") as srv:
        res = load(srv.url, tenant, queries, 32, seconds, 1_000_000, during=reload_midway)
    during = [lat * 1000 for lat, t0, _ in res["raw"] if window["start"] <= t0 + lat and t0 <= window["end"]]
    return {"requests": res["requests"], "errors": res["errors"], "p99": res["p99"],
            "reload_status": window["status"], "reload_seconds": window["end"] - window["start"],
            "during_requests": len(during),
            "during_p99": float(np.percentile(during, 99)) if during else float("nan")}


# ---------------------------------------------------------------- main


def bench_gallery(name: str, cfg: dict, tenant: str, queries: list[str], args, folder: Path) -> list[dict]:
    offline = offline_limit(serve_config(cfg, 0, True), tenant, queries, args.seconds)
    print(f"{name}: offline limit {offline['qps']:.0f} queries/s (batches of {offline['batch']})", flush=True)
    rows = {c: {"gallery": name, "clients": c, "offline_qps": offline["qps"]} for c in args.clients}
    for batching in (True, False):
        label = f"{name}-{'batched' if batching else 'single'}"
        with Server(serve_config(cfg, 0, batching), folder, label) as srv:
            for c in args.clients:
                res = load(srv.url, tenant, queries, c, args.seconds, args.max_requests)
                key = "batched" if batching else "unbatched"
                rows[c][key] = {k: v for k, v in res.items() if k != "raw"}
                print(f"{name} {key:9s} {c:3d} clients: {res['qps']:7.1f} q/s  p50 {res['p50']:6.1f} "
                      f"p95 {res['p95']:6.1f} p99 {res['p99']:6.1f} ms  errors {res['errors']}", flush=True)
    return list(rows.values())


def table(rows: list[dict]) -> str:
    head = ("| gallery | clients | service q/s | p50 / p95 / p99 ms | unbatched q/s | unbatched p50 / p99 ms "
            "| offline limit q/s | service / offline | service / unbatched | errors |")
    lines = [head, "|---" * 10 + "|"]
    for r in rows:
        b, u = r["batched"], r["unbatched"]
        cells = [r["gallery"], r["clients"], f"{b['qps']:.0f}",
                 f"{b['p50']:.0f} / {b['p95']:.0f} / {b['p99']:.0f}", f"{u['qps']:.0f}",
                 f"{u['p50']:.0f} / {u['p99']:.0f}", f"{r['offline_qps']:.0f}",
                 f"{b['qps'] / r['offline_qps']:.2f}", f"{b['qps'] / u['qps']:.1f}x",
                 b["errors"] + u["errors"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--galleries", nargs="*", default=["demo", "synthetic"], choices=["demo", "synthetic"])
    p.add_argument("--demo-config", default="configs/serve.yaml")
    p.add_argument("--gallery-size", type=int, default=100_000)
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement (and --max-requests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the query encoder")
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--skip", nargs="*", default=[], choices=["memory", "reload"])
    p.add_argument("--out", help="write every figure as JSON here")
    p.add_argument("--memory-probe", nargs=2, metavar=("MODE", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    THREADS[0] = args.threads
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe)))
        return 0
    import yaml

    folder = Path(tempfile.mkdtemp(prefix="mmft-bench-serve-"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"work folder {folder}")
    synthetic = build_synthetic(folder, args.gallery_size, args.tenants)
    demo_words = []
    rows, report = [], {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "args": vars(args)}
    if "demo" in args.galleries and Path(args.demo_config).is_file():
        demo = {k: v for k, v in yaml.safe_load(Path(args.demo_config).read_text()).items()
                if k in ("base", "tenants", "baseline")}
        if Path(demo["tenants"]["tuned"]["index"]).is_dir():
            from mmft.index.thumbnails import open_thumbnails

            thumbs = open_thumbnails(demo["tenants"]["tuned"]["index"])
            demo_words = sorted({c for k in thumbs.items for c in thumbs.captions(k)}) if thumbs else []
            rows += bench_gallery("demo", demo, "tuned", demo_words or synthetic_queries(256), args, folder)
        else:
            print(f"no demo index at {demo['tenants']['tuned']['index']}: run `make demo` first; skipping it")
    if "synthetic" in args.galleries:
        queries = demo_words or synthetic_queries(256)
        rows += bench_gallery(f"synthetic {args.gallery_size:,}", synthetic, "t0", queries, args, folder)
    report["throughput"] = rows
    if rows:
        print("\n" + table(rows))
    if "memory" not in args.skip:
        report["memory"] = mem = measure_memory(synthetic, folder)
        one = mem["base"]["added_mib"]
        tens = {m: mem[m]["tensor_mib"] for m in mem}
        print(f"\nmodel tensors: base {tens['base']:.1f} MiB; base + {args.tenants} tenants "
              f"{tens['tenants']:.1f} MiB ({tens['tenants'] / tens['base']:.3f}x); "
              f"{args.tenants} merged models "
              f"{tens['merged']:.1f} MiB ({tens['merged'] / tens['base']:.2f}x)")
        print(f"  the {args.tenants} slots hold {mem['tenants']['slot_lora_mib']:.1f} MiB of LoRA factors "
              f"and {mem['tenants']['slot_full_mib']:.1f} MiB of fully trained parameters (projections)")
        print(f"resident memory added by loading: base {one:.0f} MiB; base + {args.tenants} tenants "
              f"{mem['tenants']['added_mib']:.0f} MiB ({mem['tenants']['added_mib'] / one:.2f}x); "
              f"{args.tenants} merged models {mem['merged']['added_mib']:.0f} MiB "
              f"({mem['merged']['added_mib'] / one:.2f}x)")
    if "reload" not in args.skip:
        queries = demo_words or synthetic_queries(256)
        report["reload"] = rel = reload_under_load(synthetic, folder, "t0", queries, max(args.seconds, 12.0))
        print(f"\nreload under load (32 clients): {rel['requests']} requests, {rel['errors']} failed; reload "
              f"took {rel['reload_seconds']:.1f} s (HTTP {rel['reload_status']}); p99 {rel['p99']:.0f} ms "
              f"overall, {rel['during_p99']:.0f} ms for the {rel['during_requests']} requests during it")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
