"""Metrics for operators, on BentoML's Prometheus endpoint (`GET /metrics`) beside its own.

BentoML 1.4 serves `/metrics` from prometheus_client's multiprocess collector: every worker
process writes its metrics to files in PROMETHEUS_MULTIPROC_DIR (set in the worker's
environment by `bentoml serve`), and whichever worker answers `/metrics` merges them all. So
user metrics are plain prometheus_client metrics, created in the worker (not at import time in
the `bentoml serve` process: prometheus_client chooses its multiprocess mode when it is first
imported) and they appear on the same endpoint whatever the number of workers. (`bentoml.metrics`
is the same module behind a deprecation warning.)

Every metric has the label `model` (the model card's name):

    embedserve_images_embedded_total        counter   images through the model (warm-up excluded)
    embedserve_batch_size                   histogram images per model call
    embedserve_queue_wait_seconds           histogram per image: batcher entry to its model call
    embedserve_decode_seconds               histogram per request: decoding all its images
    embedserve_model_call_seconds           histogram per model call (ONNX Runtime)
    embedserve_requests_refused_total       counter   answers 4xx/503, labels status and reason
    embedserve_index_size                   gauge     images in the served index (max over workers)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# seconds: from a fraction of a millisecond (a decode) to the longest request timeout
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# the reason label of a refusal whose error does not name one, by status
REASONS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "no_index",
    413: "too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


def batch_buckets(max_batch_size: int) -> list[float]:
    """1, 2, 4, ... up to max_batch_size, and max_batch_size itself (a full batch)."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(float(size))
        size *= 2
    return [*buckets, float(max_batch_size)]


def _families(max_batch_size: int, registry: Any = None) -> dict[str, Any]:
    """The metric families (every model's, told apart by the `model` label) in `registry`."""
    # deferred: prometheus_client reads PROMETHEUS_MULTIPROC_DIR when first imported
    import prometheus_client as pc

    reg = pc.REGISTRY if registry is None else registry
    by_model = ["model"]

    def histogram(name: str, doc: str, buckets: Sequence[float]) -> Any:
        return pc.Histogram(name, doc, by_model, buckets=buckets, registry=reg)

    return {
        "images": pc.Counter(
            "embedserve_images_embedded", "images embedded by the model", by_model, registry=reg
        ),
        "batch_size": histogram(
            "embedserve_batch_size", "images per model call", batch_buckets(max_batch_size)
        ),
        "queue_wait": histogram(
            "embedserve_queue_wait_seconds",
            "per image, from entering the batcher to the start of its model call",
            SECONDS_BUCKETS,
        ),
        "decode": histogram(
            "embedserve_decode_seconds", "per request, decoding all its images", SECONDS_BUCKETS
        ),
        "model_call": histogram(
            "embedserve_model_call_seconds", "per model call (ONNX Runtime)", SECONDS_BUCKETS
        ),
        "refused": pc.Counter(
            "embedserve_requests_refused",
            "requests answered with an error (4xx, 503), by status and reason",
            ["model", "status", "reason"],
            registry=reg,
        ),
        # every worker serves the same index (a FAISS folder: additions need one worker; a
        # Milvus collection: shared, each worker reports the size after its own changes): the
        # live maximum
        "index_size": pc.Gauge(
            "embedserve_index_size",
            "images in the served index",
            by_model,
            registry=reg,
            multiprocess_mode="livemax",
        ),
    }


class Telemetry:
    """The metrics of one model in this process. Create it in the worker (`install`), or with
    a `registry` of its own (tests); `sibling` gives another model's, in the same families."""

    def __init__(
        self,
        model: str,
        max_batch_size: int,
        registry: Any = None,
        families: dict[str, Any] | None = None,
    ) -> None:
        self.families = families or _families(max_batch_size, registry)
        self.model = model
        f = self.families
        self.images = f["images"].labels(model)
        self.batch_size = f["batch_size"].labels(model)
        self.queue_wait = f["queue_wait"].labels(model)
        self.decode = f["decode"].labels(model)
        self.model_call = f["model_call"].labels(model)
        self._refused = f["refused"]
        self.index_size = f["index_size"].labels(model)

    def sibling(self, model: str) -> Telemetry:
        """Another model's metrics in the same families (a metric is registered only once)."""
        return Telemetry(model, 0, families=self.families)

    def batch(self, size: int, call_s: float, waits: Sequence[float]) -> None:
        """One model call of `size` images that took `call_s`, after its images had waited
        `waits` seconds in the batcher."""
        self.images.inc(size)
        self.batch_size.observe(size)
        self.model_call.observe(call_s)
        for wait in waits:
            self.queue_wait.observe(wait)

    def refused(self, status: int, reason: str | None = None) -> None:
        reason = reason or REASONS.get(status, "error")
        self._refused.labels(self.model, str(status), reason).inc()


_active: Telemetry | None = None  # this process's first model's, once `install` made it
_installed: dict[str, Telemetry] = {}


def install(model: str, max_batch_size: int) -> Telemetry:
    """This process's Telemetry of `model` (the families are made once: prometheus_client
    refuses a metric registered twice); `refused` counts into the first model's."""
    global _active
    if _active is None:
        _active = Telemetry(model, max_batch_size)
    if model not in _installed:
        _installed[model] = _active if model == _active.model else _active.sibling(model)
    return _installed[model]


def refused(status: int, reason: str | None = None) -> None:
    """Count a refused request (nothing before `install`: the in-process test apps)."""
    if _active is not None:
        _active.refused(status, reason)
