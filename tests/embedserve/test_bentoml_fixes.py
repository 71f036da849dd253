"""The fixed BentoML request timeout: same answers, and no timer outlives its request."""

from __future__ import annotations

import asyncio
import json

import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware

from embedserve import bentoml_fixes

bentoml_fixes.apply()


def app_that(delay: float = 0.0, fail: bool = False):
    async def app(scope, receive, send):
        await asyncio.sleep(delay)
        if fail:
            raise RuntimeError("boom")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def call(middleware, sent: list) -> None:
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await middleware({"type": "http", "method": "GET", "path": "/"}, receive, send)


def live_timers(loop) -> int:
    return sum(not h.cancelled() for h in loop._scheduled)  # noqa: SLF001


def test_no_timer_outlives_its_request():
    async def main():
        middleware = TimeoutMiddleware(app_that(), timeout=120)
        loop = asyncio.get_running_loop()
        before = live_timers(loop)
        for _ in range(500):
            sent = []
            await call(middleware, sent)
            assert sent[0]["status"] == 200
        return live_timers(loop) - before

    # BentoML's own middleware leaves 500 timers of 120 s here
    assert asyncio.run(main()) == 0


def test_a_slow_request_still_gets_504_with_bentomls_body():
    async def main():
        sent = []
        await call(TimeoutMiddleware(app_that(delay=5), timeout=0.1), sent)
        return sent

    sent = asyncio.run(main())
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"]) == {
        "error": "Not able to process the request in 0.1 seconds"
    }


def test_an_app_that_fails_before_answering_fails_at_once_not_after_the_timeout():
    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(RuntimeError, match="boom"):
            await call(TimeoutMiddleware(app_that(fail=True), timeout=30), [])
        return loop.time() - start

    assert asyncio.run(main()) < 5
