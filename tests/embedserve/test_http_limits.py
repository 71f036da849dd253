"""The traffic limits of a worker (embedserve.http.limits), in-process with concurrent requests
through httpx's ASGI transport: requests at once over max_concurrent_requests and bodies past
max_inflight_bytes get an immediate 503 with Retry-After, and every share comes back."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from embedserve.http.errors import ClientError
from embedserve.http.limits import BodyBudget, BodyHold
from tests.embedserve.http_app import new_events, tiny_app

MAX_BYTES = 20_000


def images(size: int) -> list:
    return [("images", ("a.bin", b"\0" * size, "application/octet-stream"))]


async def with_one_request_held(app, held_size: int, then):
    """Start a /slow request with a body of about `held_size` bytes, run `then(client)` while
    it is held in the app, release it; returns (the held response, then's result)."""
    new_events(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        slow = asyncio.create_task(client.post("/slow", files=images(held_size)))
        await asyncio.wait_for(app.state.entered.wait(), 10)
        try:
            result = await then(client)
        finally:
            app.state.release.set()
        return await slow, result


def test_a_request_over_the_concurrency_limit_gets_503_at_once():
    app = tiny_app(max_concurrent_requests=1, max_request_bytes=MAX_BYTES)

    async def second(client):
        return await client.post("/form", files=images(10))

    async def after(client_app):
        transport = httpx.ASGITransport(app=client_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/form", files=images(10))

    held, refused = asyncio.run(with_one_request_held(app, 10, second))
    assert held.status_code == 200 and held.json() == {"n": 1}
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {
        "error": "the server is handling 1 requests already (max_concurrent_requests); retry later"
    }
    again = asyncio.run(after(app))  # the slot came back when the first request ended
    assert again.status_code == 200, again.text
    assert again.json()["used"] == again.json()["held"] > 0  # only this request's bytes


def test_bodies_past_the_byte_budget_get_503_and_the_budget_comes_back():
    app = tiny_app(max_request_bytes=MAX_BYTES, max_inflight_bytes=int(MAX_BYTES * 1.5))

    async def others(client):
        large = await client.post("/form", files=images(MAX_BYTES - 1000))
        small = await client.post("/form", files=images(1000))
        return large, small

    held, (large, small) = asyncio.run(with_one_request_held(app, MAX_BYTES - 1000, others))
    assert held.status_code == 200
    assert large.status_code == 503, large.text  # it would pass the budget: refused at once
    assert large.headers["retry-after"] == "1"
    assert "(max_inflight_bytes); retry later" in large.json()["error"]
    assert small.status_code == 200  # what fits beside the held body is served
    assert small.json()["used"] > MAX_BYTES - 1000  # the held body's share was still out

    async def alone(client_app):
        transport = httpx.ASGITransport(app=client_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            ok = await client.post("/form", files=images(MAX_BYTES - 1000))
            misspelt = [("image", ("a.bin", b"\0" * 5000, "application/octet-stream"))]
            bad = await client.post("/form", files=misspelt)  # a 400 after its body was taken
            after = await client.post("/form", files=images(10))
            return ok, bad, after

    ok, bad, after = asyncio.run(alone(app))
    assert ok.status_code == 200  # the held request's share came back when it ended
    assert bad.status_code == 400
    assert after.json()["used"] == after.json()["held"]  # the failed request gave its share back


def test_a_hold_takes_and_releases_its_share_of_the_budget():
    budget = BodyBudget(100)
    a, b = BodyHold(budget), BodyHold(budget)
    a.take(60)
    a.take(20)
    with pytest.raises(ClientError) as e:
        b.take(21)
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
    assert e.value.error == (
        "the server holds 80 bytes of request bodies already, and 21 more would pass its "
        "budget of 100 (max_inflight_bytes); retry later"
    )
    b.take(20)
    assert budget.used == 100
    a.release()
    assert (budget.used, a.bytes) == (20, 0)
    a.release()  # twice is harmless
    b.release()
    assert budget.used == 0
