"""Monitoring: Prometheus metrics and a JSON-lines access log.

Metrics (GET /metrics): request latency histograms per endpoint and tenant, requests by status,
errors by kind, batch sizes, queue wait, index sizes and tenant versions. With several worker
processes the CLI sets PROMETHEUS_MULTIPROC_DIR and /metrics sums over the workers. Each app has
its own registry, so tests can build many apps in one process.
The access log has one JSON object per request: time, method, path, status, milliseconds, tenant,
error kind, whether a token was sent (never the token), and the query text only with
server.log_queries.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        reg = {"registry": self.registry}
        self.latency = Histogram("mmft_request_seconds", "Request latency by endpoint and tenant",
                                 ["endpoint", "tenant"], buckets=LATENCY_BUCKETS, **reg)
        self.requests = Counter("mmft_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                **reg)
        self.errors = Counter("mmft_errors", "Refused or failed requests by kind", ["kind"], **reg)
        self.batch_size = Histogram("mmft_batch_size", "Queries encoded and searched together",
                                    buckets=BATCH_BUCKETS, **reg)
        self.queue_wait = Histogram("mmft_queue_wait_seconds", "Time a query waits before its batch runs",
                                    buckets=LATENCY_BUCKETS, **reg)
        gauge = {"multiprocess_mode": "max"} if self.multiprocess else {}
        self.index_vectors = Gauge("mmft_index_vectors", "Vectors in a tenant's gallery",
                                   ["tenant", "gallery"], **gauge, **reg)
        self.tenant_version = Gauge("mmft_tenant_version", "Loaded version of each tenant", ["tenant"],
                                    **gauge, **reg)
        self.reloads = Counter("mmft_reloads", "Tenant reloads by outcome", ["outcome"], **reg)

    def on_batch(self, jobs, started: float) -> None:
        self.batch_size.observe(len(jobs))
        for job in jobs:
            self.queue_wait.observe(max(0.0, started - job.enqueued))

    def set_tenants(self, tenants: dict) -> None:
        for name, t in tenants.items():
            self.tenant_version.labels(name).set(t.version)
            for gallery, index in (("images", t.images), ("captions", t.texts)):
                if index is not None:
                    self.index_vectors.labels(name, gallery).set(index.ntotal)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class AccessLog:
    """Appends one JSON line per request to a file (O_APPEND, so workers can share it) or a logger."""

    def __init__(self, path: str = ""):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
        self._logger = logging.getLogger("mmft.serve.access")
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}, ensure_ascii=False)
        if self._fd is None:
            self._logger.info(line)
            return
        with self._lock:
            os.write(self._fd, (line + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
