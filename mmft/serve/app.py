"""The FastAPI app: start-up and shut-down, errors as one sentence, the body limit, metrics and access log.

    app = create_app("configs/serve.yaml")          # or a ServeConfig / dict; mount it in your own ASGI app
    uvicorn.run(app, host="127.0.0.1", port=8000)  # `mmft serve` does this with N workers

Every refusal is a JSON body {"error": "<one sentence>", "kind": "<kind>"} with a 4xx status; an
unexpected failure is a 500 with a reference number and no stack trace (the server log has it).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mmft.serve import routes
from mmft.serve.config import ServeConfig, load_serve_config, serve_config_from_dict
from mmft.serve.inputs import ServeError
from mmft.serve.state import ServeState, state_from_env

logger = logging.getLogger("mmft.serve")
ENDPOINTS = ("/", "/healthz", "/readyz", "/tenants", "/search/text", "/search/image", "/feedback",
             "/admin/reload", "/metrics", "/docs", "/openapi.json")


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "kind": kind}, status_code=status)


class ServeMiddleware:
    """Body-size limit, latency/status metrics and the JSON access log, around every HTTP request."""

    def __init__(self, app, st: ServeState):
        self.app, self.st = app, st

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, limit = time.perf_counter(), [500], self.st.cfg.limits.max_body_bytes
        state = scope.setdefault("state", {})
        received = [0]

        async def limited_receive():
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > limit:
                raise ServeError(413, "body_too_large", f"the request body is over the limit of {limit:,} "
                                 "bytes; send a smaller image")
            return message

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length", b"").decode() or None
            if length is not None and (not length.isdigit() or int(length) > limit):
                state["error_kind"] = "body_too_large"
                await _error(413, "body_too_large", f"the request body ({length} bytes) is over the limit of "
                             f"{limit:,} bytes; send a smaller image")(scope, receive, recording_send)
            else:
                await self.app(scope, limited_receive, recording_send)
        finally:
            self._record(scope, state, status[0], time.perf_counter() - start)

    def _record(self, scope, state: dict, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        if "/thumbnails/" in path:
            endpoint = "/tenants/{name}/thumbnails/{key}"
        elif path.startswith("/static/"):
            endpoint = "/static"
        tenants = self.st.registry.tenants if self.st.registry is not None else {}
        tenant = state.get("tenant") if state.get("tenant") in tenants else "-"
        m = self.st.metrics
        m.latency.labels(endpoint, tenant).observe(seconds)
        m.requests.labels(endpoint, str(status)).inc()
        kind = state.get("error_kind") or (f"http_{status}" if status >= 400 else None)
        if kind:
            m.errors.labels(kind).inc()
        record = {"method": scope.get("method"), "path": path, "status": status,
                  "ms": round(1000 * seconds, 2), "tenant": state.get("tenant"), "error": kind,
                  "token": state.get("token", False)}
        if self.st.cfg.server.log_queries and state.get("query"):
            record["query"] = state["query"]
        self.st.access_log.write(record)


def _install_handlers(app: FastAPI) -> None:
    async def serve_error(request: Request, exc: ServeError):
        request.state.error_kind = exc.kind
        return _error(exc.status, exc.kind, exc.message)

    async def http_error(request: Request, exc: HTTPException):
        msg = {404: f"no endpoint at {request.url.path}; see /docs for the API",
               405: f"{request.method} is not allowed on {request.url.path}; see /docs"}.get(exc.status_code)
        request.state.error_kind = f"http_{exc.status_code}"
        return _error(exc.status_code, f"http_{exc.status_code}", msg or str(exc.detail))

    async def unexpected(request: Request, exc: Exception):
        ref = uuid.uuid4().hex[:12]
        logger.error("request %s %s failed (reference %s)", request.method, request.url.path, ref,
                     exc_info=exc)
        return _error(500, "internal", f"the server failed on this request (reference {ref}); it logged the "
                      "details, and the request can be retried")

    app.add_exception_handler(ServeError, serve_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _lifespan(st: ServeState):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(st.start)
        await st.batcher.start()
        watcher = asyncio.get_running_loop().create_task(st.watch(), name="mmft-reload-watch")
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # main thread only
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(
                run_in_threadpool(_reload_quietly, st)))
        st.ready = True
        logger.info("mmft serve ready: tenants %s", ", ".join(st.registry.tenants))
        try:
            yield
        finally:
            st.ready = False
            watcher.cancel()
            await st.batcher.stop()
            st.close()
    return lifespan


def _reload_quietly(st: ServeState) -> None:
    try:
        st.reload()
    except Exception as e:  # noqa: BLE001 (a signal has nobody to answer)
        logger.error("reload refused, the current versions keep serving: %s", e)


def create_app(config: ServeConfig | dict | str | Path | None = None, *, overrides: list[str] | None = None,
               encoder=None, state: ServeState | None = None) -> FastAPI:
    """The service as an ASGI app. config: a ServeConfig, a dict, or a YAML path (re-read on reload).

    encoder: an Encoder (mmft.serve.encoders) to use instead of building one from config.base.
    Tenants load when the app starts (its lifespan), so run it under uvicorn or `with TestClient(app)`.
    """
    if state is None:
        path = str(config) if isinstance(config, (str, Path)) else None
        cfg = (load_serve_config(path, overrides) if path or config is None else
               config if isinstance(config, ServeConfig) else serve_config_from_dict(config))
        state = ServeState(cfg, config_path=path, overrides=overrides, encoder=encoder)
    st = state
    app = FastAPI(title="mmft serve", version="1", lifespan=_lifespan(st),
                  description="Text and image search over mmft indexes: one base, an adapter per tenant.")
    app.state.mmft = st
    _install_handlers(app)
    app.add_middleware(ServeMiddleware, st=st)
    app.mount("/static", StaticFiles(directory=routes.static_dir()), name="static")
    routes.register(app)
    return app


def app_from_env() -> FastAPI:
    """The app of one `mmft serve` worker (uvicorn factory): config from the variables the CLI sets."""
    if not logging.getLogger().handlers:  # a spawned worker: log (and access-log) like the CLI does
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S")
    return create_app(state=state_from_env())
