"""Hot reload: a tenant swapped under concurrent load with no failed request; a stale version is refused."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
import yaml
from serve_setup import TOKENS, asgi_client, deployment, running_server  # noqa: F401  (deployment: a fixture)

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
ADMIN = {"Authorization": f"Bearer {TOKENS['admin']}"}
QUERY = {"tenant": "tuned", "text": "a red square", "k": 5}


def _write(path, cfg) -> None:
    path.write_text(yaml.safe_dump(cfg))


def _config(deployment, state_dir=None):  # noqa: F811
    cfg = deployment.config(tokens=False, auth={"admin_token": TOKENS["admin"]})
    if state_dir is not None:
        cfg["server"] = {**cfg["server"], "state_dir": str(state_dir)}
    return cfg


async def _load(base: str, clients: int, per_client: int, seconds: float, reload_after: int, reload):
    """`clients` loops of at most `per_client` queries (and `seconds`); `reload()` runs once midway."""
    outcomes, sent = [], [0]
    deadline = time.monotonic() + seconds

    async def client_loop(client):
        for _ in range(per_client):
            if time.monotonic() > deadline:
                return
            sent[0] += 1
            if sent[0] == reload_after:
                asyncio.ensure_future(reload(client))
            try:
                r = await client.post(f"{base}/search/text", json=QUERY)
                outcomes.append((r.status_code, r.json()))
            except httpx.HTTPError as e:
                outcomes.append((0, {"error": repr(e)}))

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return outcomes


def test_reload_under_load_fails_no_request(deployment, tmp_path):  # noqa: F811
    from mmft.serve import create_app

    cfg = _config(deployment)
    path = tmp_path / "serve.yaml"
    _write(path, cfg)
    app = create_app(str(path))
    swapped = json.loads(json.dumps(cfg))  # tenant "tuned" now serves the other adapter and its index
    swapped["tenants"]["tuned"] = {"adapter": str(deployment.other_adapter),
                                   "index": str(deployment.indexes["other"])}
    answers = {}

    async def reload(client):
        _write(path, swapped)
        r = await client.post(f"{base}/admin/reload", headers=ADMIN, json={"tenants": ["tuned"]})
        answers["reload"] = (r.status_code, r.json())

    with running_server(app) as base:
        before = httpx.post(f"{base}/search/text", json=QUERY).json()
        outcomes = asyncio.run(_load(base, clients=8, per_client=25, seconds=60, reload_after=40,
                                     reload=reload))
        after = httpx.post(f"{base}/search/text", json=QUERY).json()
        expected = httpx.post(f"{base}/search/text", json={**QUERY, "tenant": "other"}).json()
        ready = httpx.get(f"{base}/readyz").json()
    assert answers["reload"][0] == 200, answers["reload"]
    failed = [o for o in outcomes if o[0] != 200]
    assert len(outcomes) >= 100 and failed == []  # zero failed requests across the swap
    versions = {o[1]["version"] for o in outcomes}
    assert versions == {before["version"], after["version"]} and after["version"] > before["version"]
    assert [h["key"] for h in after["results"]] == [h["key"] for h in expected["results"]]
    assert [h["key"] for h in before["results"]] != [h["key"] for h in after["results"]]
    assert ready["tenants"]["tuned"] == after["version"]
    old_results = [o[1]["results"] for o in outcomes if o[1]["version"] == before["version"]]
    assert all(r == before["results"] for r in old_results)  # requests on the old version: old answers


def test_stale_reload_is_refused_and_the_old_version_keeps_serving(deployment, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    from mmft.serve import create_app

    cfg = _config(deployment)
    path = tmp_path / "serve.yaml"
    _write(path, cfg)
    with TestClient(create_app(str(path))) as client:
        before = client.post("/search/text", json=QUERY).json()
        stale = json.loads(json.dumps(cfg))
        stale["tenants"]["tuned"].update(adapter=str(deployment.other_adapter), run="")
        _write(path, stale)  # the other adapter with the tuned index: its manifest does not match
        r = client.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 409
        assert r.json()["error"].startswith("reload refused, the current versions keep serving: index in ")
        assert "the adapter differs" in r.json()["error"]
        after = client.post("/search/text", json=QUERY).json()
        assert after == {**before, "took_ms": after["took_ms"]}
        metrics = client.get("/metrics").text
        assert 'mmft_reloads_total{outcome="failed"} 1.0' in metrics


def test_workers_follow_a_reload_and_old_slots_are_dropped(deployment, tmp_path):  # noqa: F811
    """Two apps sharing server.state_dir stand for two workers: a reload in one reaches the other."""
    from mmft.serve import create_app

    state = tmp_path / "state"
    state.mkdir()
    path = tmp_path / "serve.yaml"
    _write(path, _config(deployment, state))
    first, second = create_app(str(path)), create_app(str(path))

    async def run():
        async with asgi_client(first) as a, asgi_client(second) as b:
            v0 = (await b.get("/readyz")).json()["tenants"]
            assert (await a.post("/admin/reload", headers=ADMIN)).status_code == 200
            for _ in range(100):  # bounded: 100 x 0.05 s
                v1 = (await b.get("/readyz")).json()["tenants"]
                if v1["tuned"] != v0["tuned"]:
                    break
                await asyncio.sleep(0.05)
            assert all(v1[n] > v0[n] for n in v0), (v0, v1)
            assert (await b.post("/search/text", json=QUERY)).status_code == 200
            reg = second.state.mmft.registry
            old_slot = f"tuned@{v0['tuned']}"
            assert old_slot in reg.encoder.tenants  # kept through the grace period ...
            reg.retire(now=time.monotonic() + 3600)
            assert old_slot not in reg.encoder.tenants  # ... then dropped
            assert f"tuned@{v1['tuned']}" in reg.encoder.tenants
            os.kill(os.getpid(), signal.SIGUSR1)  # the signal reloads too (and the other app follows)
            for _ in range(100):
                v2 = (await a.get("/readyz")).json()["tenants"]
                if v2["tuned"] > v1["tuned"]:
                    break
                await asyncio.sleep(0.05)
            assert v2["tuned"] > v1["tuned"]

    asyncio.run(run())
