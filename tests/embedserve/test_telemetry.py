"""embedserve.telemetry in process: the metrics, the refusals the error handler counts, and
what the batcher reports of its model calls. (/metrics of a real server: test_client_service.)"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from embedserve import telemetry
from embedserve.batching import AdaptiveBatcher
from embedserve.telemetry import Telemetry, batch_buckets
from tests.embedserve.http_app import Client, png, tiny_app


def samples(registry: CollectorRegistry) -> dict[tuple, float]:
    """{(sample name, sorted labels without `le`...): value} of everything in `registry`."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def metrics(monkeypatch) -> tuple[Telemetry, CollectorRegistry]:
    registry = CollectorRegistry()
    made = Telemetry("tiny", max_batch_size=8, registry=registry)
    monkeypatch.setattr(telemetry, "_active", made)
    return made, registry


def test_batch_buckets_end_at_a_full_batch():
    assert batch_buckets(1) == [1.0]
    assert batch_buckets(8) == [1.0, 2.0, 4.0, 8.0]
    assert batch_buckets(12) == [1.0, 2.0, 4.0, 8.0, 12.0]


def test_a_model_call_is_counted_in_images_batch_size_call_time_and_queue_waits(metrics):
    made, registry = metrics
    made.batch(3, 0.02, [0.001, 0.002, 0.004])
    made.batch(1, 0.01, [0.0])
    made.index_size.set(42)
    got = samples(registry)
    model = ("model", "tiny")
    assert got[("embedserve_images_embedded_total", model)] == 4
    assert got[("embedserve_batch_size_count", model)] == 2
    assert got[("embedserve_batch_size_sum", model)] == 4
    assert got[("embedserve_batch_size_bucket", ("le", "2.0"), model)] == 1
    assert got[("embedserve_model_call_seconds_sum", model)] == pytest.approx(0.03)
    assert got[("embedserve_queue_wait_seconds_count", model)] == 4
    assert got[("embedserve_index_size", model)] == 42


def test_the_error_handler_counts_refusals_by_status_and_reason(metrics):
    _, registry = metrics
    app = Client(tiny_app(max_images_per_request=2))
    assert (
        app.post("/form", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    )
    assert app.get("/raise?kind=overloaded").status_code == 503
    assert app.get("/raise?status=401").status_code == 401
    images = [("images", (f"{i}.png", png(seed=i), "image/png")) for i in range(3)]
    assert app.post("/form", files=images).status_code == 413
    assert app.post("/decode", files=[("images", ("a.pdf", b"%PDF-1.4 x"))]).status_code == 415
    got = samples(registry)

    def refused(status: int, reason: str) -> float:
        key = ("model", "tiny"), ("reason", reason), ("status", str(status))
        return got.get(("embedserve_requests_refused_total", *key), 0)

    assert refused(415, "unsupported_media_type") == 1
    assert refused(503, "batch_queue_full") == 1
    assert refused(401, "unauthorized") == 1
    assert refused(413, "max_images_per_request") == 1
    assert refused(415, "unsupported_image_format") == 1


def test_without_installed_metrics_refusals_are_not_counted(monkeypatch):
    monkeypatch.setattr(telemetry, "_active", None)
    telemetry.refused(400)  # nothing to count into, and no error


def test_the_batcher_reports_each_model_call():
    calls = []
    batcher = AdaptiveBatcher(lambda x: x.reshape(len(x), -1).astype(np.float32), 4, 10_000)
    batcher.on_batch = lambda size, call_s, waits: calls.append((size, call_s, waits))

    async def run() -> None:
        await asyncio.gather(*(batcher(np.ones((2, 3), np.uint8)) for _ in range(3)))
        batcher.shutdown()

    asyncio.run(run())
    assert sum(size for size, _, _ in calls) == 6
    for size, call_s, waits in calls:
        assert 1 <= size <= 4 and call_s >= 0 and len(waits) == size
        assert all(w >= 0 for w in waits)
