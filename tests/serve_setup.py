"""A tiny deployment for the mmft serve tests: one base, two adapters, shards, three indexes with thumbnails.

`deployment` (session fixture) builds it once: tiny random open_clip towers (conftest.TINY_VIT), 24
coloured-shape images with captions written as real shards, and indexes built through the library
(`build_index_from_run` / `build_index_from_model`), so the served answers can be compared with
`Index.search_text` on the same models.
"""
from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import adapted_run_dir, make_pairs

TOKENS = {"tuned": "tok-tuned-1", "other": "tok-other-2", "admin": "tok-admin-3"}


@dataclass
class Deployment:
    root: Path
    run: Path  # run directory of tenant "tuned"
    other_adapter: Path  # adapter folder of tenant "other" (same base)
    shards: list[str]
    indexes: dict[str, Path]  # tenant -> image index folder
    captions: dict[str, list[str]]  # image key -> captions

    def config(self, tokens: bool = True, **sections) -> dict:
        """A serve config dict over this deployment; `sections` replace whole top-level sections."""
        cfg = {
            "base": {"run": str(self.run), "process": False},  # the encoder in-process (one test isolates it)
            "tenants": {
                "tuned": {"run": str(self.run), "index": str(self.indexes["tuned"])},
                "other": {"adapter": str(self.other_adapter), "index": str(self.indexes["other"])},
            },
            "baseline": {"index": str(self.indexes["baseline"])},
            "batching": {"max_batch": 16, "max_wait_ms": 2.0},
            "limits": {"max_k": 20, "max_query_chars": 64, "max_body_bytes": 200_000,
                       "max_image_pixels": 1_000_000, "request_timeout_s": 20.0},
            "feedback": {"path": str(self.root / "feedback.jsonl")},
            "server": {"reload_poll_s": 0.2},
        }
        if tokens:
            cfg["tenants"]["tuned"]["token"] = TOKENS["tuned"]
            cfg["tenants"]["other"]["token"] = TOKENS["other"]
            cfg["auth"] = {"admin_token": TOKENS["admin"]}
        cfg.update(sections)
        return cfg


def write_shards(root: Path, n: int = 24) -> list[str]:
    """n captioned coloured-shape images written as real shards (10 per shard); returns the shard paths."""
    from mmft.data.shard_writer import make_shards

    src = root / "src"
    src.mkdir(parents=True)
    for i, (image, caption, _) in enumerate(make_pairs(n, size=48, seed=1)):
        image.save(src / f"im{i:03d}.png")
        (src / f"im{i:03d}.txt").write_text(f"{caption}\n{caption} number {i}\n")
    make_shards(src, root / "shards", samples_per_shard=10, progress=False)
    return [str(p) for p in sorted((root / "shards").glob("*.tar"))]


def build_deployment(root: Path) -> Deployment:
    from mmft.config import DataConfig, IndexConfig
    from mmft.index.core import build_index_from_model, build_index_from_run
    from mmft.index.thumbnails import open_thumbnails
    from mmft.model.adapter import load_model, save_adapter

    run, _, _, _ = adapted_run_dir(root, seed=11)
    shards = write_shards(root)
    data_cfg = DataConfig(num_workers=0)
    cfg = IndexConfig(factory="Flat", use_gpu="never", thumbnails=48)
    indexes = {"tuned": root / "idx-tuned", "baseline": root / "idx-baseline", "other": root / "idx-other"}
    build_index_from_run(run, shards, indexes["tuned"], cfg, data_cfg=data_cfg, progress=False)
    build_index_from_run(run, shards, indexes["baseline"], dataclasses.replace(cfg, lora_scale=0.0),
                         data_cfg=data_cfg, progress=False)
    other, preprocess, tok = load_model(run)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for n, p in other.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(other, root / "other-adapter")
    build_index_from_model(other, shards, indexes["other"], tokenizer=tok, preprocess=preprocess,
                           index_cfg=cfg, data_cfg=data_cfg, progress=False)
    thumbs = open_thumbnails(indexes["tuned"])
    captions = {k: thumbs.captions(k) for k in thumbs.items}
    return Deployment(root, run, root / "other-adapter", shards, indexes, captions)


@pytest.fixture(scope="session")
def deployment(tmp_path_factory) -> Deployment:
    return build_deployment(tmp_path_factory.mktemp("serve"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout_s: float = 60.0):
    """Run `app` under uvicorn on 127.0.0.1 in a thread; yields the base URL; stops it at the end."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                          access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)


@contextlib.asynccontextmanager
async def asgi_client(app):
    """An httpx client calling `app` in-process (no socket), with the app's start-up and shut-down run."""
    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve.test", timeout=60) as client:
            yield client
