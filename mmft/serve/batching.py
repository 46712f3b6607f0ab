"""Dynamic batching: concurrent queries gathered for a few milliseconds, then encoded and searched together.

The first query of a batch waits up to `max_wait_s` for company (or until `max_batch` queries are
in); while one batch runs in the worker thread, new queries queue up and form the next one, so the
batch size grows with the load by itself. Queries of a batch are split into groups (one tenant slot,
one kind of query, one gallery) and each group is one `process(group, jobs)` call in a single worker
thread: the model is shared, and encoding plus FAISS search stay off the event loop.
With max_batch=1 every query runs alone: the unbatched reference of tools/bench_serve.py.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    group: Hashable  # jobs with equal groups are processed together
    payload: Any  # a query text, an image, ...
    k: int
    context: Any = None  # what `process` needs besides the payload (the tenant version)
    future: asyncio.Future | None = None
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers jobs and runs `process(group, jobs) -> list of results (one per job)` in one thread."""

    def __init__(self, process: Callable[[Hashable, list[Job]], list], *, max_batch: int = 64,
                 max_wait_s: float = 0.002, on_batch: Callable[[list[Job], float], None] | None = None):
        self.process, self.max_batch, self.max_wait_s = process, max(1, int(max_batch)), max(0.0, max_wait_s)
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self._task is None:  # (again after stop: an app's lifespan may run more than once)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmft-batch")
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="mmft-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def submit(self, job: Job):
        """Queue `job` and wait for its result (cancel the await to give up on it)."""
        if self._task is None:
            await self.start()
        job.future = asyncio.get_running_loop().create_future()
        job.enqueued = time.perf_counter()
        self._queue.put_nowait(job)
        return await job.future

    async def _gather(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [j for j in await self._gather() if not j.future.done()]  # timed-out callers left
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(batch, time.perf_counter())
            groups: dict[Hashable, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.group, []).append(job)
            for group, jobs in groups.items():
                try:
                    results = await loop.run_in_executor(self._executor, self.process, group, jobs)
                    outcome = list(zip(jobs, results, strict=True))
                except Exception as e:  # noqa: BLE001 (handed to every waiting caller)
                    outcome = [(job, e) for job in jobs]
                for job, result in outcome:
                    if job.future.done():
                        continue
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
