"""Bad requests get a 4xx and one sentence, the server keeps serving; tenants are isolated by their tokens."""
from __future__ import annotations

import io
import json

import pytest
from serve_setup import TOKENS, deployment  # noqa: F401  (deployment is a fixture)

pytest.importorskip("fastapi")


def _auth(who):
    return {"Authorization": f"Bearer {TOKENS[who]}"}


@pytest.fixture(scope="module")
def client(deployment, tmp_path_factory):  # noqa: F811
    from fastapi.testclient import TestClient

    from mmft.serve import create_app

    log = tmp_path_factory.mktemp("access") / "access.jsonl"
    cfg = deployment.config(server={"access_log": str(log), "reload_poll_s": 0.2})
    with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
        c.access_log = log
        yield c


def _png(size, mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


TEXT = "/search/text"
BAD_REQUESTS = [  # (name, method, kwargs, status, kind, words of the sentence)
    ("empty text", TEXT, {"json": {"tenant": "baseline", "text": "   "}}, 422, "empty_query",
     "query text is empty: send 1 to 64 characters"),
    ("long text", TEXT, {"json": {"tenant": "baseline", "text": "x" * 65}}, 422, "long_query",
     "query text has 65 characters, over the limit of 64"),
    ("text not a string", TEXT, {"json": {"tenant": "baseline", "text": 5}}, 422, "bad_field",
     "field 'text' must be a string, got 5"),
    ("missing text", TEXT, {"json": {"tenant": "baseline"}}, 422, "missing_field", "field 'text' is missing"),
    ("missing tenant", TEXT, {"json": {"text": "a"}}, 422, "missing_field", "field 'tenant' is missing"),
    ("unknown tenant", TEXT, {"json": {"tenant": "nope", "text": "a"}}, 404, "unknown_tenant",
     "no tenant 'nope' here"),
    ("k zero", TEXT, {"json": {"tenant": "baseline", "text": "a", "k": 0}}, 422, "bad_k",
     "k=0 is out of range: ask for 1 to 20 results"),
    ("k negative", TEXT, {"json": {"tenant": "baseline", "text": "a", "k": -3}}, 422, "bad_k",
     "k=-3 is out of range"),
    ("k over limit", TEXT, {"json": {"tenant": "baseline", "text": "a", "k": 21}}, 422, "bad_k",
     "k=21 is out of range"),
    ("k not a number", TEXT, {"json": {"tenant": "baseline", "text": "a", "k": "many"}}, 422, "bad_k",
     "k='many' is not a whole number"),
    ("k boolean", TEXT, {"json": {"tenant": "baseline", "text": "a", "k": True}}, 422, "bad_k",
     "k=True is not a whole number"),
    ("wrong content type", TEXT, {"content": b"a red fox", "headers": {"Content-Type": "text/plain"}}, 415,
     "content_type", "content type 'text/plain' is not accepted here: send application/json"),
    ("no content type", TEXT, {"content": b"{}"}, 415, "content_type", "content type 'none' is not accepted"),
    ("malformed JSON", TEXT, {"content": b'{"tenant": "baseline", "text": ', "headers":
                              {"Content-Type": "application/json"}}, 400, "malformed_json",
     "the request body is not valid JSON (Expecting value at line 1 column 32)"),
    ("JSON array", TEXT, {"json": ["a"]}, 400, "malformed_json",
     "the request body is a JSON list, not an object"),
    ("not UTF-8", TEXT, {"content": b"\xff\xfe{", "headers": {"Content-Type": "application/json"}}, 400,
     "malformed_json", "not UTF-8 text"),
    ("body over the limit", TEXT, {"content": b"{" + b" " * 200_001 + b"}",
                                   "headers": {"Content-Type": "application/json"}}, 413, "body_too_large",
     "the request body (200003 bytes) is over the limit of 200,000 bytes"),
    ("bytes not an image", "/search/image",
     {"data": {"tenant": "baseline"}, "files": {"image": ("x.png", b"GIF89a? no, garbage", "image/png")}},
     422, "not_an_image", "are not an image Pillow can read"),
    ("empty image", "/search/image",
     {"data": {"tenant": "baseline"}, "files": {"image": ("x.png", b"", "image/png")}},
     422, "not_an_image", "the uploaded image is empty"),
    ("decompression bomb", "/search/image",
     {"data": {"tenant": "baseline"}, "files": {"image": ("bomb.png", _png((5000, 5000), "1"), "image/png")}},
     413, "image_too_large",
     "is 5000 x 5000 pixels, over the limit of 1,000,000 pixels (a decompression bomb?)"),
    ("image field missing", "/search/image", {"data": {"tenant": "baseline", "image": "text"},
                                              "files": {"picture": ("p.png", b"x", "image/png")}}, 422,
     "missing_field", "field 'image' (a file) is missing"),
    ("bad base64", "/search/image", {"json": {"tenant": "baseline", "image_b64": "%%%not base64%%%"}}, 422,
     "bad_base64", "field 'image_b64' is not base64"),
    ("bad target", "/search/image",
     {"json": {"tenant": "baseline", "image_b64": "AAAA", "target": "video"}}, 422,
     "bad_target", "target='video' is not 'image'"),
    ("image wrong content type", "/search/image",
     {"content": b"x", "headers": {"Content-Type": "image/png"}}, 415,
     "content_type", "send application/json or multipart/form-data"),
    ("broken multipart", "/search/image", {"content": b"--xx\r\nContent-Disposition: form-data; name=\"a\"",
                                           "headers": {"Content-Type": "multipart/form-data; boundary=xx"}},
     422, "missing_field", "field 'image' (a file) is missing"),
    ("bad authorization header", TEXT, {"json": {"tenant": "baseline", "text": "a"},
                                        "headers": {"Authorization": "Basic abc"}}, 401, "unauthorized",
     "the Authorization header must look like 'Bearer <token>'"),
    ("feedback key not in gallery", "/feedback", {"json": {"tenant": "baseline", "query": "a", "key": "nope",
                                                           "relevant": True}}, 422, "unknown_key",
     "key 'nope' is not in tenant 'baseline''s gallery"),
    ("feedback relevant not boolean", "/feedback",
     {"json": {"tenant": "baseline", "query": "a", "key": "00000001", "relevant": "yes"}}, 422, "bad_field",
     "field 'relevant' must be a bool"),
]


@pytest.mark.parametrize("name,path,kwargs,status,kind,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_refused_in_one_sentence(client, name, path, kwargs, status, kind, words):
    r = client.post(path, **kwargs)
    body = r.json()
    assert (r.status_code, body["kind"]) == (status, kind), body
    assert words in body["error"], body["error"]
    assert "Traceback" not in r.text and "\n" not in body["error"]
    ok = client.post(TEXT, json={"tenant": "baseline", "text": "a red square", "k": 2})  # still serving
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2


def test_chunked_body_over_the_limit_is_refused(client):
    def chunks():
        for _ in range(30):
            yield b" " * 10_000
    r = client.post(TEXT, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over the limit of 200,000 bytes" in r.json()["error"]


def test_unknown_route_and_method(client):
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"] == "no endpoint at /nowhere; see /docs for the API"
    r = client.get(TEXT)
    assert r.status_code == 405 and "GET is not allowed on /search/text" in r.json()["error"]


def test_errors_are_counted_by_kind(client):
    client.post(TEXT, json={"tenant": "baseline", "text": ""})
    metrics = client.get("/metrics").text
    assert 'mmft_errors_total{kind="empty_query"}' in metrics


def test_internal_failure_and_timeout_show_no_stack_trace(deployment):  # noqa: F811
    from fastapi.testclient import TestClient

    from mmft.serve import create_app

    app = create_app(deployment.config(tokens=False))
    with TestClient(app, raise_server_exceptions=False) as c:
        enc = app.state.mmft.encoder
        original = enc.encode_text
        enc.encode_text = lambda texts, tenant: (_ for _ in ()).throw(RuntimeError("secret internals /etc/x"))
        r = c.post(TEXT, json={"tenant": "tuned", "text": "a"})
        enc.encode_text = original
        assert r.status_code == 500 and r.json()["kind"] == "internal"
        assert "reference" in r.json()["error"] and "secret" not in r.text and "Traceback" not in r.text
        assert c.post(TEXT, json={"tenant": "tuned", "text": "a"}).status_code == 200
    slow = create_app(deployment.config(tokens=False, limits={"request_timeout_s": 0.0001}))
    with TestClient(slow) as c:
        r = c.post(TEXT, json={"tenant": "tuned", "text": "a"})
        assert r.status_code == 504 and "did not finish within 0.0001 s" in r.json()["error"]


def test_tenant_isolation(client):
    q = {"text": "a red square", "k": 3}
    assert client.post(TEXT, json={"tenant": "tuned", **q}, headers=_auth("tuned")).status_code == 200
    assert client.post(TEXT, json={"tenant": "baseline", **q}, headers=_auth("tuned")).status_code == 200
    r = client.post(TEXT, json={"tenant": "other", **q}, headers=_auth("tuned"))
    assert r.status_code == 403 and r.json()["error"] == ("this token does not open tenant 'other'; use that "
                                                          "tenant's own token")
    r = client.post(TEXT, json={"tenant": "tuned", **q})
    assert r.status_code == 401 and "tenant 'tuned' needs a bearer token" in r.json()["error"]
    r = client.post(TEXT, json={"tenant": "tuned", **q}, headers={"Authorization": "Bearer tok-tuned-"})
    assert r.status_code == 403  # a prefix of the right token is not the token
    key = client.post(TEXT, json={"tenant": "other", **q}, headers=_auth("other")).json()["results"][0]["key"]
    assert client.get(f"/tenants/other/thumbnails/{key}", headers=_auth("tuned")).status_code == 403
    assert client.get(f"/tenants/other/thumbnails/{key}", headers=_auth("other")).status_code == 200
    r = client.post("/feedback", json={"tenant": "other", "query": "a", "key": key, "relevant": True},
                    headers=_auth("tuned"))
    assert r.status_code == 403
    names = {t["name"] for t in client.get("/tenants", headers=_auth("tuned")).json()["tenants"]}
    assert names == {"baseline", "tuned"}
    assert client.post(TEXT, json={"tenant": "other", **q}, headers=_auth("admin")).status_code == 200


def test_admin_endpoints_need_the_admin_token(client, deployment):  # noqa: F811
    r = client.post("/admin/reload")
    assert r.status_code == 401 and "admin endpoints need the admin token" in r.json()["error"]
    r = client.post("/admin/reload", headers=_auth("tuned"))
    assert r.status_code == 403 and r.json()["error"] == "this token is not the admin token"
    r = client.post("/admin/reload", json={"tenants": ["baseline"]}, headers=_auth("admin"))
    assert r.status_code == 200 and r.json()["reloaded"][0]["tenant"] == "baseline"
    r = client.post("/admin/reload", json={"tenants": ["ghost"]}, headers=_auth("admin"))
    assert r.status_code == 409 and "no tenant 'ghost' in the config" in r.json()["error"]

    from fastapi.testclient import TestClient

    from mmft.serve import create_app

    with TestClient(create_app(deployment.config(tokens=False))) as open_client:
        r = open_client.post("/admin/reload", headers=_auth("admin"))
        assert r.status_code == 403 and "admin endpoints are off: set auth.admin_token" in r.json()["error"]


def test_access_log_has_requests_but_never_tokens(client):
    client.post(TEXT, json={"tenant": "tuned", "text": "logged query"}, headers=_auth("tuned"))
    text = client.access_log.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    mine = [r for r in records if r["path"] == TEXT and r["tenant"] == "tuned" and r["status"] == 200]
    assert mine and mine[-1]["token"] is True and mine[-1]["ms"] > 0
    assert not any(tok in text for tok in TOKENS.values())
    assert "logged query" not in text  # query texts only with server.log_queries
