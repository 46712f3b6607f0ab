"""Service faults: a burst of bad requests mixed with good ones against `mmft serve` on 127.0.0.1.

A tiny deployment (a tiny ViT base, one tenant's adapter, an index of 24 images) is served by a real
`mmft serve` subprocess. 32 concurrent clients send a fixed mix, every request bounded in time: each
bad request must get a 4xx with a one-sentence JSON error, each good one a 200 with results; the
process must stay alive and its resident memory come back to the level it had after a warm-up round
of the same mix (allocator pools filled), within max(5 %, 16 MiB).
"""
from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from faults.common import ROOT, TINY_VIT, Outcome

CLIENTS, ROUNDS = 32, 2  # each client sends the whole mix ROUNDS times
START_LIMIT_S, BURST_LIMIT_S = 180, 240


def _png(size, mode="RGB", color=(200, 40, 40)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def _deployment(work: Path) -> Path:
    """Base checkpoint, a run directory with an adapter, shards, an index; returns the serve config path."""
    import torch

    from mmft.config import Config, DataConfig, IndexConfig, LoraConfig, ModelConfig
    from mmft.data.shard_writer import make_shards
    from mmft.index.core import build_index_from_run
    from mmft.model.adapter import save_adapter
    from mmft.model.factory import create_model
    from mmft.model.lora import apply_lora
    from mmft.rundir import RunDir

    torch.manual_seed(0)
    torch.save(create_model(ModelConfig(name="tiny-vit-faults", model_cfg=TINY_VIT))[0].state_dict(),
               work / "base.pt")
    mcfg = ModelConfig(name="tiny-vit-faults", model_cfg=TINY_VIT, pretrained=str(work / "base.pt"))
    model = create_model(mcfg)[0]
    apply_lora(model, LoraConfig())
    run = RunDir(work / "run")
    run.write_config(Config(model=mcfg))
    save_adapter(model, run.adapter("last"))
    src = work / "src"
    src.mkdir()
    colors = [(220, 30, 30), (30, 180, 40), (30, 60, 220), (230, 220, 30)]
    for i in range(24):
        (src / f"im{i:03d}.png").write_bytes(_png((40, 40), color=colors[i % 4]))
        (src / f"im{i:03d}.txt").write_text(f"a picture number {i}\n")
    make_shards(src, work / "shards", samples_per_shard=12, progress=False)
    shards = [str(p) for p in sorted((work / "shards").glob("*.tar"))]
    index_cfg = IndexConfig(factory="Flat", use_gpu="never", thumbnails=32)
    build_index_from_run(run.path, shards, work / "index", index_cfg, data_cfg=DataConfig(num_workers=0),
                         progress=False)
    cfg = {"base": {"run": str(run.path), "threads": 1},
           "tenants": {"t": {"run": str(run.path), "index": str(work / "index")}},
           "baseline": {"enabled": False}, "feedback": {"path": ""},
           "limits": {"max_k": 20, "max_query_chars": 64, "max_body_bytes": 200_000,
                      "max_image_pixels": 1_000_000, "request_timeout_s": 60.0},
           "server": {"host": "127.0.0.1", "port": _free_port(), "workers": 1}}
    path = work / "serve.yaml"
    path.write_text(json.dumps(cfg))  # YAML reads JSON
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mix() -> list[tuple[str, str, dict]]:
    """(kind, path, httpx keyword arguments): the requests every client sends, good and bad interleaved."""
    text, image = "/search/text", "/search/image"
    query_image = {"image": ("q.png", _png((40, 40)), "image/png")}
    good = [("good", text, {"json": {"tenant": "t", "text": "a red picture", "k": 5}}),
            ("good", image, {"data": {"tenant": "t"}, "files": query_image}),
            ("good", text, {"json": {"tenant": "t", "text": "number 3", "k": 20}})]
    as_json = {"Content-Type": "application/json"}
    bomb = {"image": ("b.png", _png((3000, 3000), "1"), "image/png")}  # 9 Mpx decoded, a few KB sent
    bad = [("bad", text, {"json": {"tenant": "t", "text": "   "}}),
           ("bad", text, {"json": {"tenant": "t", "text": "x" * 65}}),
           ("bad", text, {"json": {"tenant": "t", "text": "a", "k": 0}}),
           ("bad", text, {"json": {"tenant": "nobody", "text": "a"}}),
           ("bad", text, {"content": b'{"tenant": "t", "text": ', "headers": as_json}),
           ("bad", text, {"content": b"a red fox", "headers": {"Content-Type": "text/plain"}}),
           ("bad", text, {"content": b"{" + b" " * 200_001 + b"}", "headers": as_json}),
           ("bad", image, {"data": {"tenant": "t"}, "files": {"image": ("x.png", b"no image", "image/png")}}),
           ("bad", image, {"data": {"tenant": "t"}, "files": bomb}),
           ("bad", image, {"json": {"tenant": "t", "image_b64": "%%%not base64%%%"}}),
           ("bad", "/nowhere", {"json": {}})]
    return [r for pair in zip(bad, good * 4) for r in pair]  # 11 bad, 11 good


async def _burst(url: str, rounds: int) -> list[tuple[str, int, str]]:
    """(kind, status or 0 for no answer, error sentence) of every request of every client."""
    import httpx

    mix, results = _mix(), []

    async def client_loop(client, c):
        for r in range(rounds):
            for i in range(len(mix)):
                kind, path, kw = mix[(i + c + r) % len(mix)]
                try:
                    resp = await client.post(url + path, **kw)
                    is_json = resp.headers.get("content-type", "").startswith("application/json")
                    body = resp.json() if is_json else {}
                    ok_good = kind == "good" and resp.status_code == 200 and bool(body.get("results"))
                    results.append((kind, resp.status_code if kind == "bad" or ok_good else -resp.status_code,
                                    str(body.get("error", ""))))
                except httpx.HTTPError as e:
                    results.append((kind, 0, f"{type(e).__name__}: {e}"))

    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        loops = asyncio.gather(*(client_loop(client, c) for c in range(CLIENTS)))
        await asyncio.wait_for(loops, BURST_LIMIT_S)
    return results


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> str | None:
    import httpx

    deadline = time.monotonic() + START_LIMIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"the server exited ({proc.returncode}): {log.read_text()[-300:]}"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return f"the server was not ready within {START_LIMIT_S} s"


def bad_request_burst(work: Path) -> Outcome:
    import httpx  # the serve extra: a missing one is reported as the case's crash

    config = _deployment(work)
    port = json.loads(config.read_text())["server"]["port"]
    url, log = f"http://127.0.0.1:{port}", work / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mmft", "serve", "--config", str(config)], cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        problem = _wait_ready(proc, url, log)
        if problem:
            return Outcome(injected=1, crashes=1, notes=[problem])
        asyncio.run(_burst(url, 1))  # warm-up: the same mix once per client
        time.sleep(1.0)
        before = _rss_mib(proc.pid)
        start = time.perf_counter()
        results = asyncio.run(_burst(url, ROUNDS))
        seconds = time.perf_counter() - start
        time.sleep(1.0)
        alive = proc.poll() is None and httpx.get(url + "/readyz", timeout=10).status_code == 200
        after = _rss_mib(proc.pid) if alive else float("nan")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return _judge(results, alive, before, after, seconds)


def _judge(results, alive: bool, before: float, after: float, seconds: float) -> Outcome:
    bad = [(s, e) for k, s, e in results if k == "bad"]
    good = [s for k, s, _ in results if k == "good"]
    refused = [s for s, e in bad if 400 <= s < 500 and e and "\n" not in e]
    answered = [s for s in good if s == 200]
    memory_ok = after <= before + max(0.05 * before, 16.0)
    out = Outcome(injected=len(bad), survived=len(refused) if alive and memory_ok else 0,
                  data_lost=len(good) - len(answered),
                  crashes=sum(1 for s, _ in bad if s >= 500 or s == 0) + (0 if alive else 1))
    statuses = sorted({s for s, _ in bad})
    out.notes.append(f"{CLIENTS} clients, {len(results)} requests in {seconds:.1f} s: {len(bad)} bad ones "
                     f"answered {statuses}, {len(refused)} with a one-sentence 4xx; "
                     f"{len(answered)}/{len(good)} good ones answered; server "
                     f"{'alive' if alive else 'DEAD'}; resident memory "
                     f"{before:.0f} MiB after warm-up, {after:.0f} MiB after the burst")
    odd = [(s, e) for s, e in bad if not (400 <= s < 500)][:3]
    out.notes += [f"bad request answered {s}: {e[:200]}" for s, e in odd]
    return out
