"""mmft serve endpoints: answers equal Index.search_* on the same model; batching, thumbnails, feedback."""
from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from serve_setup import TOKENS, asgi_client, deployment  # noqa: F401  (deployment is a fixture)

pytest.importorskip("fastapi")

QUERIES = ["a red square", "a blue circle", "a green square number 3", "yellow", "a white circle",
           "purple thing", "an orange circle", "a black square"]


def _models(d):
    """tenant -> (model, preprocess, tokenizer) loaded by the library, as Index.search_* would use them."""
    from mmft.model.adapter import load_model
    from mmft.model.lora import set_lora_scale

    tuned = load_model(d.run)
    base = load_model(d.run)
    set_lora_scale(base.model, 0.0)
    other = load_model(d.run, adapter=str(d.other_adapter))
    return {"tuned": tuned, "baseline": base, "other": other}


def _auth(tenant):
    return {"Authorization": f"Bearer {TOKENS[tenant]}"} if tenant in TOKENS else {}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(deployment):  # noqa: F811
    """Every tenant's text and image answers, all requests sent at once (so they are batched)."""
    from PIL import Image

    from mmft.serve import create_app

    app = create_app(deployment.config())
    images = [Image.open(deployment.root / "src" / f"im{i:03d}.png").convert("RGB") for i in (0, 5, 9)]

    async def run():
        async with asgi_client(app) as client:
            texts = [client.post("/search/text", json={"tenant": t, "text": q, "k": 5}, headers=_auth(t))
                     for t in ("tuned", "baseline", "other") for q in QUERIES]
            pics = [client.post("/search/image", headers=_auth(t), data={"tenant": t, "k": "4"},
                                files={"image": ("q.png", _png(im), "image/png")})
                    for t in ("tuned", "baseline") for im in images]
            replies = await asyncio.gather(*texts, *pics)
            metrics = (await client.get("/metrics")).text
        return replies, metrics

    replies, metrics = asyncio.run(run())
    assert all(r.status_code == 200 for r in replies), [r.json() for r in replies if r.status_code != 200]
    text = {(t, q): replies[i * len(QUERIES) + j].json() for i, t in enumerate(("tuned", "baseline", "other"))
            for j, q in enumerate(QUERIES)}
    image = {(t, j): replies[3 * len(QUERIES) + i * 3 + j].json() for i, t in enumerate(("tuned", "baseline"))
             for j in range(3)}
    return {"text": text, "image": image, "images": images, "metrics": metrics}


def test_text_answers_equal_index_search_text_for_every_tenant(deployment, served):  # noqa: F811
    from mmft.index import load_index

    models = _models(deployment)
    for tenant, (model, _, tok) in models.items():
        index = load_index(deployment.indexes[tenant], model=model)
        scores, ids = index.search_text(QUERIES, model, tok, k=5)  # the library's answer
        for q, row_s, row_i in zip(QUERIES, scores, ids):
            got = served["text"][(tenant, q)]
            assert got["tenant"] == tenant and got["k"] == 5
            assert [h["key"] for h in got["results"]] == list(row_i)
            np.testing.assert_allclose([h["score"] for h in got["results"]], row_s, atol=1e-5)
            assert [h["rank"] for h in got["results"]] == [1, 2, 3, 4, 5]
            assert all(h["caption"] == deployment.captions[h["key"]][0] for h in got["results"])
    # the tenants really differ: the adapters change the ranking
    first = {t: served["text"][(t, QUERIES[0])]["results"] for t in ("tuned", "baseline")}
    assert first["tuned"] != first["baseline"]


def test_image_answers_equal_index_search_image(deployment, served):  # noqa: F811
    from mmft.index import load_index

    models = _models(deployment)
    for tenant in ("tuned", "baseline"):
        model, preprocess, _ = models[tenant]
        index = load_index(deployment.indexes[tenant], model=model)
        scores, ids = index.search_image(served["images"], model, preprocess, k=4)
        for j in range(3):
            got = served["image"][(tenant, j)]["results"]
            assert [h["key"] for h in got] == list(ids[j])
            np.testing.assert_allclose([h["score"] for h in got], scores[j], atol=1e-5)


def test_concurrent_queries_were_batched(served):
    """Requests sent together were encoded in batches of more than one (the batch-size histogram says so)."""
    counts = {}
    for line in served["metrics"].splitlines():
        if line.startswith("mmft_batch_size_bucket"):
            le = line.split('le="')[1].split('"')[0]
            counts[le] = float(line.rsplit(" ", 1)[1])
    total = counts["+Inf"]
    assert total >= 1 and counts["1.0"] < total  # some batch held 2+ queries
    assert 'mmft_request_seconds_count{endpoint="/search/text",tenant="tuned"} 8.0' in served["metrics"]
    assert 'mmft_index_vectors{gallery="images",tenant="tuned"} 24.0' in served["metrics"]


def test_image_to_text_base64_and_thumbnails(deployment):  # noqa: F811
    from fastapi.testclient import TestClient

    from mmft.index.thumbnails import open_thumbnails
    from mmft.serve import create_app

    raw = (deployment.root / "src" / "im004.png").read_bytes()
    with TestClient(create_app(deployment.config(tokens=False))) as client:
        b64 = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        r = client.post("/search/image", json={"tenant": "tuned", "image_b64": b64, "k": 3, "target": "text",
                                               "thumbnails": True})
        assert r.status_code == 200, r.json()
        body = r.json()
        assert body["target"] == "text" and len(body["results"]) == 3
        for hit in body["results"]:  # caption ids "<key>/<j>" with that caption's text
            key, j = hit["id"].split("/")
            assert hit["key"] == key and hit["caption"] == deployment.captions[key][int(j)]
            assert hit["thumbnail"].startswith("data:image/jpeg;base64,")
        key = body["results"][0]["key"]
        r = client.get(f"/tenants/tuned/thumbnails/{key}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.content == open_thumbnails(deployment.indexes["tuned"]).jpeg(key)
        assert client.get("/tenants/tuned/thumbnails/nope").status_code == 404


def test_health_ready_tenants_docs_and_page(deployment):  # noqa: F811
    from fastapi.testclient import TestClient

    from mmft.serve import create_app

    with TestClient(create_app(deployment.config())) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and set(ready["tenants"]) == {"baseline", "tuned", "other"}
        open_ = client.get("/tenants").json()["tenants"]
        assert [t["name"] for t in open_] == ["baseline"]  # the others need their tokens
        mine = client.get("/tenants", headers=_auth("tuned")).json()["tenants"]
        assert {t["name"] for t in mine} == {"baseline", "tuned"}
        info = next(t for t in mine if t["name"] == "tuned")
        assert info["images"]["vectors"] == 24 and info["thumbnails"] and info["protected"]
        assert info["lora_scale"] == 1.0 and len(info["adapter_sha256"]) == 64
        admin = client.get("/tenants", headers=_auth("admin")).json()["tenants"]
        assert {t["name"] for t in admin} == {"baseline", "tuned", "other"}
        spec = client.get("/openapi.json").json()
        paths = {"/search/text", "/search/image", "/feedback", "/admin/reload", "/tenants"}
        assert paths <= set(spec["paths"])
        body = spec["paths"]["/search/text"]["post"]["requestBody"]
        example = body["content"]["application/json"]["example"]
        assert example["text"]
        assert client.get("/docs").status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and 'id="query"' in page.text and "/static/app.js" in page.text
        assert client.get("/static/app.js").status_code == 200


def test_feedback_to_jsonl_to_shards(deployment, tmp_path):  # noqa: F811
    """POST /feedback -> JSONL -> feedback_pairs table -> `mmft shards` -> shards the trainer reads."""
    from fastapi.testclient import TestClient

    from mmft.data.shard_writer import make_shards
    from mmft.serve import create_app
    from mmft.serve.server import export_feedback

    cfg = deployment.config(tokens=False, feedback={"path": str(tmp_path / "fb.jsonl")})
    with TestClient(create_app(cfg)) as client:
        hits = client.post("/search/text", json={"tenant": "tuned", "text": "a red square", "k": 3}).json()
        keys = [h["key"] for h in hits["results"]]
        for key, relevant in zip(keys, (True, True, False)):
            r = client.post("/feedback", json={"tenant": "tuned", "query": "a red square", "key": key,
                                               "relevant": relevant, "rank": keys.index(key) + 1})
            assert r.status_code == 202 and r.json() == {"recorded": True}
        client.post("/feedback", json={"tenant": "tuned", "query": "crimson box", "key": keys[0],
                                       "relevant": True})
    lines = [json.loads(x) for x in (tmp_path / "fb.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and lines[0]["tenant"] == "tuned" and lines[0]["key"] == keys[0]
    assert lines[2]["relevant"] is False and lines[0]["version"] >= 1
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))  # YAML reads JSON
    stats = export_feedback(str(path), [], tmp_path / "table")
    assert stats["pairs"] == 3 and stats["images"] == 2 and stats["skipped"]["not_relevant"] == 1
    made = make_shards(tmp_path / "table" / "pairs.jsonl", tmp_path / "shards", group_col="group",
                       progress=False)
    assert made["written"] == 2
    from mmft.data.epochs import expand_specs
    from mmft.data.stages import SkipStats, parse_captions, read_shards

    samples = list(read_shards(expand_specs([str(tmp_path / "shards")]), SkipStats()))
    captions = sorted(c for s in samples for c in parse_captions(s))
    assert captions == ["a red square", "a red square", "crimson box"]


def test_encoder_in_a_child_process_answers_the_same(deployment, served, tmp_path):  # noqa: F811
    """base.process=true (the `mmft serve` default): the model runs in a child process, same answers."""
    from conftest import adapted_run_dir
    from fastapi.testclient import TestClient

    from mmft.model.adapter import AdapterMismatchError
    from mmft.serve import create_app

    cfg = deployment.config(tokens=False)
    cfg["base"]["process"] = True
    app = create_app(cfg)
    with TestClient(app) as client:
        encoder = app.state.mmft.encoder
        assert type(encoder).__name__ == "ProcessEncoder" and encoder.dim == 32
        for q in QUERIES[:3]:
            got = client.post("/search/text", json={"tenant": "tuned", "text": q, "k": 5}).json()["results"]
            want = served["text"][("tuned", q)]["results"]
            assert [h["key"] for h in got] == [h["key"] for h in want]
            np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-5)
        alien, *_ = adapted_run_dir(tmp_path, seed=5)  # an adapter of another base: refused across the pipe
        with pytest.raises(AdapterMismatchError, match="load it onto the base it was trained on"):
            encoder.load_tenant("alien@1", str(alien / "adapter-last"), 1.0)
        assert app.state.mmft.reload(["tuned"])[0].version > 1  # reload goes through the child too
        assert client.post("/search/text", json={"tenant": "tuned", "text": "a", "k": 2}).status_code == 200
    assert not encoder._proc.is_alive()  # stopped with the app
