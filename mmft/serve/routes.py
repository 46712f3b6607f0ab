"""The HTTP routes: each checks its request, asks ServeState (request.app.state.mmft), and shapes the answer.

    GET  /                      the search page (static/index.html)
    GET  /healthz, /readyz      liveness; readiness (every tenant loaded)
    GET  /tenants               the tenants the caller's token can query
    POST /search/text           {"tenant", "text", "k"} -> top-k gallery images
    POST /search/image          multipart (image file) or JSON (image_b64): images (target=image) or captions
    GET  /tenants/{t}/thumbnails/{key}   a gallery thumbnail (JPEG)
    POST /feedback              {"tenant", "query", "key", "relevant"} -> one JSONL line
    POST /admin/reload          {"tenants": [...]} -> new versions, swapped atomically (admin token)
    GET  /metrics               Prometheus
"""
from __future__ import annotations

import base64
import time
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from mmft.serve import openapi
from mmft.serve.auth import may_access, presented_digest, require_admin, require_tenant
from mmft.serve.inputs import (
    JSON,
    MULTIPART,
    ServeError,
    check_k,
    check_target,
    check_text,
    decode_base64,
    field,
    open_image,
    parse_json,
    require_type,
)


def static_dir() -> Path:
    return Path(str(resources.files("mmft.serve") / "static"))


def _state(request: Request):
    return request.app.state.mmft


def _tenant(request: Request, name):
    """The tenant a request names, after its bearer token is checked (401/403/404 otherwise)."""
    st = _state(request)
    if not isinstance(name, str) or not name:
        raise ServeError(422, "missing_field", "field 'tenant' is missing: name a tenant (GET /tenants)")
    request.state.tenant = name
    digest = presented_digest(request.headers.get("authorization"))
    request.state.token = digest is not None
    tenant = st.tenant(name)
    require_tenant(tenant, digest, st.admin_digest)
    return tenant


def _hits(tenant, target: str, scores, rows, thumbnails: bool) -> list[dict]:
    """Result rows: rank, key, score, caption (+ caption id for target=text, + thumbnail data URL)."""
    gallery = tenant.images if target == "image" else tenant.texts
    out = []
    for rank, (score, row) in enumerate(zip(scores.tolist(), rows.tolist()), 1):
        if row < 0:
            break
        gid = str(gallery.ids[row])
        key = gid.partition("/")[0] if target == "text" else gid
        hit = {"rank": rank, "key": key, "score": round(float(score), 6), "caption": tenant.caption(gid)}
        if target == "text":
            hit["id"] = gid
        if thumbnails:
            jpeg = tenant.thumbs.jpeg(key) if tenant.thumbs is not None else None
            hit["thumbnail"] = ("data:image/jpeg;base64," + base64.b64encode(jpeg).decode()) if jpeg else None
        out.append(hit)
    return out


async def page(request: Request):
    return HTMLResponse((static_dir() / "index.html").read_text(encoding="utf-8"))


async def healthz(request: Request):
    return {"status": "ok"}


async def readyz(request: Request):
    st = _state(request)
    if not st.ready:
        return JSONResponse({"status": "not ready"}, status_code=503)
    return {"status": "ready", "tenants": {n: t.version for n, t in st.registry.tenants.items()}}


async def tenants(request: Request):
    st = _state(request)
    digest = presented_digest(request.headers.get("authorization"))
    mine = [t for t in st.registry.tenants.values() if may_access(t, digest, st.admin_digest)]
    return {"tenants": [t.info() for t in mine]}


async def search_text(request: Request):
    st, start = _state(request), time.perf_counter()
    require_type(request.headers.get("content-type"), (JSON,))
    body = parse_json(await request.body())
    tenant = _tenant(request, body.get("tenant"))
    text = check_text(field(body, "text", str, required=True), st.cfg.limits)
    request.state.query = text
    k = check_k(body.get("k"), st.cfg.limits)
    scores, rows = await st.search(tenant, "text", text, k, "image")
    return {"tenant": tenant.name, "version": tenant.version, "k": k,
            "took_ms": round(1000 * (time.perf_counter() - start), 2),
            "results": _hits(tenant, "image", scores, rows, field(body, "thumbnails", bool, False))}


async def _image_body(request: Request) -> tuple[dict, bytes]:
    """(fields, image bytes) of a JSON (image_b64) or multipart (file field 'image') request."""
    kind = require_type(request.headers.get("content-type"), (JSON, MULTIPART))
    if kind == JSON:
        body = parse_json(await request.body())
        return body, decode_base64(field(body, "image_b64", str, required=True))
    try:
        form = await request.form(max_files=1, max_fields=8)
    except ServeError:
        raise
    except Exception:  # noqa: BLE001 (starlette raises several kinds for broken multipart)
        raise ServeError(400, "malformed_multipart", "the multipart body could not be parsed; send the image "
                         "as a file field named 'image'") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ServeError(422, "missing_field", "field 'image' (a file) is missing from the multipart form")
    body = {k: v for k, v in form.items() if isinstance(v, str)}
    if "thumbnails" in body:
        body["thumbnails"] = body["thumbnails"].strip().lower() in ("1", "true", "yes", "on")
    return body, await upload.read()


async def search_image(request: Request):
    st, start = _state(request), time.perf_counter()
    body, data = await _image_body(request)
    tenant = _tenant(request, body.get("tenant"))
    k, target = check_k(body.get("k"), st.cfg.limits), check_target(body.get("target"))
    image = await run_in_threadpool(open_image, data, st.cfg.limits)
    scores, rows = await st.search(tenant, "image", image, k, target)
    return {"tenant": tenant.name, "version": tenant.version, "k": k, "target": target,
            "took_ms": round(1000 * (time.perf_counter() - start), 2),
            "results": _hits(tenant, target, scores, rows, field(body, "thumbnails", bool, False))}


async def thumbnail(request: Request, name: str, key: str):
    tenant = _tenant(request, name)
    jpeg = tenant.thumbs.jpeg(key) if tenant.thumbs is not None else None
    if jpeg is None:
        raise ServeError(404, "no_thumbnail", f"tenant '{name}' has no thumbnail for key '{key[:80]}'")
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


async def feedback(request: Request):
    st = _state(request)
    if st.feedback is None:
        raise ServeError(404, "feedback_off", "feedback is off on this server: set feedback.path")
    require_type(request.headers.get("content-type"), (JSON,))
    body = parse_json(await request.body())
    tenant = _tenant(request, body.get("tenant"))
    query_kind = field(body, "query_kind", str, "text")
    query = check_text(field(body, "query", str, required=True), st.cfg.limits, "query")
    key, relevant = field(body, "key", str, required=True), field(body, "relevant", bool, required=True)
    if not tenant.has_key(key):
        raise ServeError(422, "unknown_key",
                         f"key '{key[:80]}' is not in tenant '{tenant.name}''s gallery")
    record = {"tenant": tenant.name, "version": tenant.version, "query": query, "query_kind": query_kind,
              "key": key, "relevant": relevant, "rank": field(body, "rank", int),
              "caption": tenant.caption(key), "index": tenant.source.get("index")}
    await run_in_threadpool(st.feedback.append, record)
    return JSONResponse({"recorded": True}, status_code=202)


async def reload(request: Request):
    st = _state(request)
    digest = presented_digest(request.headers.get("authorization"))
    request.state.token = digest is not None
    require_admin(digest, st.admin_digest)
    raw = await request.body()
    body = parse_json(raw) if raw.strip() else {}
    names = field(body, "tenants", list)
    if names is not None and not all(isinstance(n, str) for n in names):
        raise ServeError(422, "bad_field", "field 'tenants' must be a list of tenant names")
    try:
        built = await run_in_threadpool(st.reload, names)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        reason = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ServeError(409, "reload_failed",
                         f"reload refused, the current versions keep serving: {reason}") from None
    return {"reloaded": [{"tenant": t.name, "version": t.version} for t in built]}


async def metrics(request: Request):
    data, content_type = _state(request).metrics.render()
    return Response(data, media_type=content_type)


def register(app: FastAPI) -> None:
    """Add every route to `app` (the handlers find the ServeState on app.state.mmft)."""
    search_docs = {"responses": openapi.SEARCH_RESPONSE}
    add = app.add_api_route
    add("/", page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    add("/healthz", healthz, methods=["GET"], summary="The process is up")
    add("/readyz", readyz, methods=["GET"], summary="Every tenant is loaded and the server takes queries")
    add("/tenants", tenants, methods=["GET"], summary="The tenants your token can query")
    add("/search/text", search_text, methods=["POST"], summary="Text -> image search",
        openapi_extra={**openapi.TEXT_QUERY, **search_docs})
    add("/search/image", search_image, methods=["POST"], openapi_extra={**openapi.IMAGE_QUERY, **search_docs},
        summary="Image -> image (target=image) or image -> caption (target=text) search")
    add("/tenants/{name}/thumbnails/{key:path}", thumbnail, methods=["GET"],
        summary="A gallery image's thumbnail (JPEG)")
    add("/feedback", feedback, methods=["POST"], status_code=202, openapi_extra=openapi.FEEDBACK,
        summary="Record whether a result was relevant to a query")
    add("/admin/reload", reload, methods=["POST"], openapi_extra=openapi.RELOAD,
        summary="Load new versions of tenants (atomic swap; admin token)")
    add("/metrics", metrics, methods=["GET"], include_in_schema=False)
