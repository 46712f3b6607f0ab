"""`mmft serve --config serve.yaml`: check the config, then run uvicorn with server.workers processes.

Each worker builds its own state from environment variables (MMFT_SERVE_CONFIG, MMFT_SERVE_OVERRIDES,
MMFT_SERVE_STATE_DIR) through `mmft.serve.app:app_from_env`, loads the base model once, and opens
every index memory-mapped, so N workers share one copy of each index in the page cache. The state
folder holds the reload generation the workers follow and, with several workers, the Prometheus
multiprocess files that /metrics sums.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mmft.serve.config import check_config, load_serve_config


def _require_serve_extra() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "multipart") if not _importable(m)]
    if missing:
        raise RuntimeError(f"mmft serve needs {', '.join(missing)}: `pip install 'mmft[serve]'`")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def serve(config_path: str | None, overrides: list[str] | None = None) -> int:
    """Run the service until interrupted; refuses a bad config (or a stale index) before starting."""
    _require_serve_extra()
    import uvicorn

    cfg = load_serve_config(config_path, overrides)
    check_config(cfg)
    state_dir = Path(cfg.server.state_dir or tempfile.mkdtemp(prefix="mmft-serve-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    os.environ["MMFT_SERVE_CONFIG"] = str(Path(config_path).resolve()) if config_path else ""
    os.environ["MMFT_SERVE_OVERRIDES"] = json.dumps(list(overrides or []))
    os.environ["MMFT_SERVE_STATE_DIR"] = str(state_dir)
    if cfg.server.workers > 1:
        metrics_dir = state_dir / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    names = (["baseline"] if cfg.baseline.enabled else []) + list(cfg.tenants)
    print(f"mmft serve: http://{cfg.server.host}:{cfg.server.port}/ (tenants: {', '.join(names)}; "
          f"{cfg.server.workers} worker(s); API docs at /docs)", flush=True)
    uvicorn.run("mmft.serve.app:app_from_env", factory=True, host=cfg.server.host, port=cfg.server.port,
                workers=cfg.server.workers, access_log=False, log_level="info",
                timeout_graceful_shutdown=int(cfg.limits.request_timeout_s) + 1)
    return 0


def export_feedback(config_path: str | None, overrides: list[str] | None, out_dir: str | Path) -> dict:
    """Turn the config's feedback file into a `mmft shards` table (pairs.jsonl + images/) in out_dir."""
    from mmft.index.manifest import read_manifest
    from mmft.serve.feedback import feedback_pairs
    from mmft.serve.tenants import tenant_specs

    cfg = load_serve_config(config_path, overrides)
    if not cfg.feedback.path or not Path(cfg.feedback.path).is_file():
        raise FileNotFoundError(f"no feedback file at '{cfg.feedback.path}': POST /feedback writes it while "
                                "the service runs (feedback.path)")
    shards = {}
    for name, spec in tenant_specs(cfg).items():
        if spec.index:
            source = (read_manifest(Path(spec.index)).get("source") or {}).get("shards")
            if isinstance(source, list):
                shards[name] = source
    return feedback_pairs(cfg.feedback.path, out_dir, shards)
