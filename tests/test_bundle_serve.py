"""`mmft serve` on bundles with torch made unimportable answers like the torch service.

A subprocess (and the encoder process the service spawns from it) starts with an import hook that raises
on `torch` (and torchvision), then imports the serving path, starts the app with base.backend "onnx" over
bundles exported from the serve tests' deployment,
and answers text and image queries. The torch service answers the same queries in this process; the
query vectors must agree row by row (cosine >= 0.9999) and the top-10 keys must be the same.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serve_setup import deployment  # noqa: F401  (a fixture)

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parent.parent
QUERIES = ["a red square", "a blue circle", "a green square number 3", "yellow", "a white circle",
           "purple thing", "an orange circle", "a black square"]
TENANTS = ("tuned", "baseline", "other")
IMAGES = (0, 5, 9, 17)

# sitecustomize runs at the start of every Python process given this PYTHONPATH: the test process and the
# encoder process the service spawns
SITECUSTOMIZE = r"""
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name} imported on the torch-free serving path")
        return None
sys.meta_path.insert(0, NoTorch())
"""

NO_TORCH = r"""
import json, sys
import asyncio, base64, httpx
from mmft.serve import create_app
cfg, root, queries, tenants, images = json.loads(sys.argv[1])
app = create_app(cfg)

async def run():
    out = {"text": {}, "image": {}, "vectors": {}}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve.test", timeout=60) as c:
            for t in tenants:
                for q in queries:
                    r = await c.post("/search/text", json={"tenant": t, "text": q, "k": 10})
                    out["text"][f"{t}|{q}"] = r.json()
                for i in images:
                    raw = open(f"{root}/src/im{i:03d}.png", "rb").read()
                    b64 = base64.urlsafe_b64encode(raw).decode().rstrip("=")
                    r = await c.post("/search/image", json={"tenant": t, "image_b64": b64, "k": 10})
                    out["image"][f"{t}|{i}"] = r.json()
        st = app.state.mmft
        for t in tenants:
            slot = st.registry.tenants[t].slot
            out["vectors"][t] = st.encoder.encode_text(queries, slot).tolist()
    out["torch_loaded"] = any(m.split(".")[0] == "torch" for m in sys.modules)
    try:
        import torch  # noqa: F401
        out["hook_works"] = False
    except ImportError:
        out["hook_works"] = True
    return out

print(json.dumps(asyncio.run(run())))
"""


@pytest.fixture(scope="module")
def bundles(deployment):  # noqa: F811
    """Bundles of each tenant: tuned (scale 1), the frozen base (scale 0), the second adapter (scale 1)."""
    from mmft.bundle.writer import export_bundle

    root = deployment.root
    return {"tuned": export_bundle(deployment.run, root / "b-tuned", progress=False),
            "base": export_bundle(deployment.run, root / "b-base", lora_scale=0.0, progress=False),
            "other": export_bundle(deployment.run, root / "b-other", adapter=str(deployment.other_adapter),
                                   progress=False)}


def _onnx_config(deployment, bundles) -> dict:  # noqa: F811
    cfg = deployment.config(tokens=False)
    cfg["base"] = {"backend": "onnx", "bundle": str(bundles["base"])}
    cfg["tenants"]["tuned"] = {"adapter": str(bundles["tuned"]), "index": str(deployment.indexes["tuned"])}
    cfg["tenants"]["other"]["adapter"] = str(bundles["other"])
    cfg["feedback"] = {"path": ""}
    return cfg


def _torch_answers(deployment) -> dict:  # noqa: F811
    from fastapi.testclient import TestClient

    from mmft.serve import create_app

    out = {"text": {}, "image": {}, "vectors": {}}
    app = create_app(deployment.config(tokens=False))
    with TestClient(app) as client:
        for t in TENANTS:
            for q in QUERIES:
                r = client.post("/search/text", json={"tenant": t, "text": q, "k": 10})
                out["text"][f"{t}|{q}"] = r.json()
            for i in IMAGES:
                raw = (deployment.root / "src" / f"im{i:03d}.png").read_bytes()
                out["image"][f"{t}|{i}"] = client.post("/search/image", data={"tenant": t, "k": "10"},
                                                       files={"image": ("q.png", raw, "image/png")}).json()
        st = app.state.mmft
        for t in TENANTS:
            out["vectors"][t] = st.encoder.encode_text(QUERIES, st.registry.tenants[t].slot)
    return out


def test_torch_free_service_answers_like_the_torch_service(deployment, bundles, tmp_path):  # noqa: F811
    import os

    from mmft.serve.config import check_config, serve_config_from_dict

    cfg = _onnx_config(deployment, bundles)
    check_config(serve_config_from_dict(cfg))  # the start-up check of `mmft serve` accepts bundle tenants
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    arg = json.dumps([cfg, str(deployment.root), QUERIES, list(TENANTS), list(IMAGES)])
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, arg], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    onnx = json.loads(proc.stdout.strip().splitlines()[-1])
    assert onnx["torch_loaded"] is False and onnx["hook_works"] is True
    ref = _torch_answers(deployment)
    for t in TENANTS:
        cos = np.sum(np.asarray(onnx["vectors"][t]) * ref["vectors"][t], axis=1)
        assert cos.min() >= 0.9999, (t, cos)
    for kind in ("text", "image"):
        for key, want in ref[kind].items():
            got = onnx[kind][key]
            assert [h["key"] for h in got["results"]] == [h["key"] for h in want["results"]], (kind, key)
            np.testing.assert_allclose([h["score"] for h in got["results"]],
                                       [h["score"] for h in want["results"]], atol=1e-4)
    assert ref["text"][f"tuned|{QUERIES[0]}"]["results"] != ref["text"][f"baseline|{QUERIES[0]}"]["results"]


def test_bundle_tenant_at_another_scale_is_refused(deployment, bundles):  # noqa: F811
    from mmft.bundle.encoder import OnnxEncoder

    enc = OnnxEncoder(bundles["base"])
    enc.load_tenant("baseline@1", None, 0.0)
    with pytest.raises(ValueError, match="exported at LoRA scale 1 but the tenant asks for 0.5"):
        enc.load_tenant("tuned@2", str(bundles["tuned"]), 0.5)
    with pytest.raises(ValueError, match="carries an adapter"):
        OnnxEncoder(bundles["tuned"]).load_tenant("baseline@1", None, 0.0)
    enc.load_tenant("tuned@2", str(bundles["tuned"]), 1.0)
    assert enc.tenants == ["baseline@1", "tuned@2"] and enc.fingerprint("tuned@2")["lora_scale"] == 1.0
    enc.drop_tenant("tuned@2")
    assert enc.tenants == ["baseline@1"]
