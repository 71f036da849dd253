"""Adaptive batching: concurrent calls share model calls, each gets its own rows back."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from embedserve.batching import AdaptiveBatcher, Overloaded


def slow_double(x: np.ndarray) -> np.ndarray:
    time.sleep(0.01)  # a model call long enough for requests to queue behind it
    return x * 2


def test_concurrent_calls_are_merged_and_each_gets_its_own_rows():
    async def main():
        batcher = AdaptiveBatcher(slow_double, max_batch_size=16, max_latency_ms=10_000)
        inputs = [np.full((1 + i % 3, 4), i, np.float32) for i in range(40)]
        outputs = await asyncio.gather(*(batcher(x) for x in inputs))
        return batcher, inputs, outputs

    batcher, inputs, outputs = asyncio.run(main())
    for x, y in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(y, x * 2)
    stats = batcher.stats()
    assert stats["requests"] == 40 and stats["images"] == sum(len(x) for x in inputs)
    assert stats["largest_batch"] <= 16
    assert stats["model_calls"] < 40
    assert stats["most_requests_in_a_batch"] > 1


def test_the_model_runs_one_batch_at_a_time_off_the_event_loop():
    active, most = 0, 0
    lock = threading.Lock()
    loop_thread = None

    def fn(x):
        nonlocal active, most
        assert threading.current_thread() is not loop_thread
        with lock:
            active += 1
            most = max(most, active)
        time.sleep(0.005)
        with lock:
            active -= 1
        return x

    async def main():
        nonlocal loop_thread
        loop_thread = threading.current_thread()
        batcher = AdaptiveBatcher(fn, max_batch_size=4, max_latency_ms=10_000)
        await asyncio.gather(*(batcher(np.zeros((1, 2), np.float32)) for _ in range(30)))

    asyncio.run(main())
    assert most == 1


def test_an_error_in_the_model_reaches_every_caller_of_that_batch():
    def broken(x):
        raise RuntimeError("model exploded")

    async def main():
        batcher = AdaptiveBatcher(broken, max_batch_size=4, max_latency_ms=10_000)
        return await asyncio.gather(
            *(batcher(np.zeros((1, 2), np.float32)) for _ in range(3)), return_exceptions=True
        )

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)


def test_a_queue_longer_than_the_latency_budget_is_shed_with_overloaded():
    def slow(x):
        time.sleep(0.05)
        return x

    async def main():
        batcher = AdaptiveBatcher(slow, max_batch_size=2, max_latency_ms=20)
        return await asyncio.gather(
            *(batcher(np.zeros((1, 2), np.float32)) for _ in range(40)), return_exceptions=True
        )

    results = asyncio.run(main())
    shed = [r for r in results if isinstance(r, Overloaded)]
    assert shed, "40 requests of 50 ms each within a 20 ms budget: some must be shed"
    assert all(isinstance(r, (np.ndarray, Overloaded)) for r in results)
    with pytest.raises(Overloaded, match="max_latency_ms"):
        raise shed[0]


def test_after_a_burst_a_lone_request_is_not_corked_for_the_burst_queue_time():
    """The dispatcher learns its cork from the mean wait of recent batches, which under a burst
    is mostly time queued behind the busy model; the batcher caps it at max_wait_ms."""

    async def main():
        batcher = AdaptiveBatcher(
            slow_double, max_batch_size=2, max_latency_ms=60_000, max_wait_ms=3
        )
        await asyncio.gather(*(batcher(np.zeros((1, 2), np.float32)) for _ in range(60)))
        batcher._dispatcher.optimizer.trigger_refresh()  # relearn from the burst's batches
        learned = batcher._dispatcher.optimizer.wait
        await batcher(np.zeros((1, 2), np.float32))
        return learned, batcher._dispatcher.optimizer.wait

    learned, capped = asyncio.run(main())
    assert learned > 0.01  # what the burst taught: tens of milliseconds of queueing
    assert capped <= 0.003
