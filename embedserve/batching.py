"""Adaptive batching of model calls across concurrent requests.

The dispatcher is BentoML's own (`CorkDispatcher`, the class behind `@bentoml.api(batchable=True)`):
it learns the model's cost per batch and per image from the calls it makes, and releases a
batch when waiting longer would cost more latency than it saves; a request that would wait past
`max_latency_ms` is shed (the service answers 503) instead of queueing without bound.

Why not a `batchable=True` endpoint called from /embed: BentoML reaches such an endpoint from
inside the same service only through an HTTP self-proxy that encodes the array as JSON (measured
here: 16 requests/s and 503s for 128x128 images), and a second service via `bentoml.depends`
adds a process and an HTTP hop per request (196 requests/s against 452 for this dispatcher,
with connection resets under load). Decoding and validation stay per request, outside the
batch, so one client's bad file can never fail another client's images.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher


class Overloaded(RuntimeError):
    """The batch queue is longer than the latency budget allows (answered with a 503)."""


class AdaptiveBatcher:
    """`await batcher(x)`, x [n, ...] -> fn(concatenation of concurrent xs)[the rows of x].

    `fn` is blocking (an ONNX Runtime call) and runs on `executor`, one batch at a time; the
    event loop stays free to parse and decode the next requests meanwhile. `on_batch`, when
    set, is told of every model call: (images, seconds of the call, seconds each image waited
    in the queue before it); the service sets it to its metrics (embedserve.telemetry).
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        max_latency_ms: int,
        executor: Executor | None = None,
        max_wait_ms: float = 5.0,
    ) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self.max_wait_ms = max_wait_ms
        self._executor = executor
        # A job is one image: (caller number, when it was queued, uint8 [1, ...]). The dispatcher decides whether to
        # wait for more work by the number of jobs queued and compares it with max_batch_size,
        # which is in images: with one job per image both count images, so a queue that
        # already holds a full batch is released at once instead of being corked like a short
        # one, and no job is ever split across two batches.
        self._dispatcher = CorkDispatcher(
            max_latency_in_ms=max_latency_ms,
            max_batch_size=max_batch_size,
            fallback=self._overloaded,
            get_batch_size=lambda job: 1,
            batch_dim=(0, 0),
        )
        self._call = self._dispatcher(self._run)
        self._callers = itertools.count()
        self._lock = threading.Lock()
        self.calls = 0  # model calls made
        self.requests = 0  # calls of this batcher served (an HTTP request is one)
        self.images = 0  # images embedded
        self.largest = 0  # most images in one model call
        self.most_requests = 0  # most callers whose images shared one model call
        self.on_batch: Callable[[int, float, list[float]], None] | None = None

    @staticmethod
    def _overloaded() -> np.ndarray:
        raise Overloaded("the server is overloaded: the batch queue exceeds max_latency_ms")

    def _timed(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        return self.fn(batch), time.perf_counter() - start

    async def _run(self, jobs: Sequence[tuple[int, float, np.ndarray]]) -> list[np.ndarray]:
        batch = np.concatenate([row for _, _, row in jobs])
        now = time.perf_counter()
        waits = [now - queued for _, queued, _ in jobs]
        loop = asyncio.get_running_loop()
        out, call_s = await loop.run_in_executor(self._executor, self._timed, batch)
        # The dispatcher corks a lone request for about the mean wait of recent batches. That
        # mean also counts time spent queued behind a busy model, so after a burst a single
        # client would wait hundreds of milliseconds for company that never comes, for minutes
        # (measured: 114 ms instead of 30 for 8 images at concurrency 1 after a concurrency-64
        # burst). While the model is busy requests pile up anyway; the cork only has to cover
        # the idle case, so it is capped.
        optimizer = self._dispatcher.optimizer
        optimizer.wait = min(optimizer.wait, self.max_wait_ms / 1000.0)
        with self._lock:
            self.calls += 1
            self.images += len(batch)
            self.largest = max(self.largest, len(batch))
            self.most_requests = max(self.most_requests, len({caller for caller, _, _ in jobs}))
        if self.on_batch is not None:
            self.on_batch(len(batch), call_s, waits)
        return list(out[:, None])  # [1, D] per job

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        """Rows of `fn` for the rows of `x` [n, ...], batched with whatever else is waiting."""
        caller, queued = next(self._callers), time.perf_counter()
        rows = await asyncio.gather(
            *(self._call((caller, queued, x[i : i + 1])) for i in range(len(x)))
        )
        with self._lock:
            self.requests += 1
        return np.concatenate(rows)

    def reset_stats(self) -> None:
        """Forget the counts so far (after the warm-up)."""
        with self._lock:
            self.calls = self.requests = self.images = self.largest = self.most_requests = 0

    def stats(self) -> dict[str, float | int]:
        """What batching has really done so far (tests and /info read it)."""
        with self._lock:
            return {
                "model_calls": self.calls,
                "requests": self.requests,
                "images": self.images,
                "largest_batch": self.largest,
                "most_requests_in_a_batch": self.most_requests,
                "mean_batch": round(self.images / self.calls, 2) if self.calls else 0.0,
            }

    def shutdown(self) -> None:
        self._dispatcher.shutdown()
