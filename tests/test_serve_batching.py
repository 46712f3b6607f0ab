"""Dynamic batching: jobs gathered per group, bounded batch size, errors and abandoned jobs handled."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mmft.serve.batching import Batcher, Job


def _recording(delay: float = 0.0, fail_group=None):
    calls = []
    lock = threading.Lock()

    def process(group, jobs):
        with lock:
            calls.append((group, [j.payload for j in jobs]))
        time.sleep(delay)
        if group == fail_group:
            raise RuntimeError(f"group {group} failed")
        return [(group, j.payload * 2) for j in jobs]
    return process, calls


async def _submit_all(batcher, jobs):
    try:
        return await asyncio.gather(*(batcher.submit(j) for j in jobs), return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_jobs_are_batched_per_group_within_max_batch():
    process, calls = _recording(delay=0.005)
    batcher = Batcher(process, max_batch=8, max_wait_s=0.01)
    jobs = [Job(group=i % 2, payload=i, k=1) for i in range(41)]
    results = asyncio.run(_submit_all(batcher, jobs))
    assert results == [(i % 2, 2 * i) for i in range(41)]  # every caller gets its own answer
    assert all(len(payloads) <= 8 for _, payloads in calls)
    assert all(p % 2 == g for g, payloads in calls for p in payloads)  # never two groups in one call
    assert max(len(payloads) for _, payloads in calls) > 1
    assert sorted(p for _, payloads in calls for p in payloads) == list(range(41))


def test_max_batch_one_runs_every_job_alone():
    process, calls = _recording()
    results = asyncio.run(_submit_all(Batcher(process, max_batch=1, max_wait_s=0.0),
                                      [Job(group="g", payload=i, k=1) for i in range(12)]))
    assert results == [("g", 2 * i) for i in range(12)]
    assert [len(p) for _, p in calls] == [1] * 12


def test_a_failing_group_fails_only_its_own_jobs():
    process, _ = _recording(fail_group="bad")
    jobs = [Job(group="bad" if i % 3 == 0 else "good", payload=i, k=1) for i in range(9)]
    results = asyncio.run(_submit_all(Batcher(process, max_batch=16, max_wait_s=0.005), jobs))
    for i, r in enumerate(results):
        if i % 3 == 0:
            assert isinstance(r, RuntimeError) and "group bad failed" in str(r)
        else:
            assert r == ("good", 2 * i)


def test_abandoned_jobs_are_not_processed():
    process, calls = _recording(delay=0.05)
    batcher = Batcher(process, max_batch=1, max_wait_s=0.0)

    async def run():
        first = asyncio.ensure_future(batcher.submit(Job(group="g", payload=1, k=1)))
        await asyncio.sleep(0.01)  # the first job is running now
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(Job(group="g", payload=2, k=1)), 0.005)
        assert await first == ("g", 2)
        assert await batcher.submit(Job(group="g", payload=3, k=1)) == ("g", 6)
        await batcher.stop()

    asyncio.run(run())
    assert [p for _, payloads in calls for p in payloads] == [1, 3]
