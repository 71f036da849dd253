"""Traffic limits of one worker: requests at once, and the bytes of request bodies it holds.

`RequestLimits` (ASGI middleware) answers a request over `max_concurrent_requests` with an
immediate 503 and gives every other one a `BodyHold` on the worker's `BodyBudget`
(`max_inflight_bytes`), which `embedserve.http.forms.read_form` takes the body's bytes from.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from embedserve.http.errors import ClientError

BODY_HOLD = "embedserve.body_hold"  # the ASGI scope key of a request's BodyHold


class BodyBudget:
    """The bytes of request bodies one worker holds at once (`max_inflight_bytes`).

    Each request takes its share as its body comes in (all of a declared Content-Length at
    once, before reading; a chunked body chunk by chunk) and gives it back when its answer is
    sent. A request whose body would pass the budget gets a 503 with Retry-After at once, so
    many large uploads at once wait in their clients, not in this process's memory."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0


class BodyHold:
    """One request's share of the worker's `BodyBudget`."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget, self.bytes = budget, 0

    def take(self, n: int) -> None:
        budget = self.budget
        if budget.used + n > budget.limit:  # one event loop per worker: no lock needed
            raise ClientError(
                503,
                f"the server holds {budget.used} bytes of request bodies already, and {n} more "
                f"would pass its budget of {budget.limit} (max_inflight_bytes); retry later",
                headers={"Retry-After": "1"},
            )
        budget.used += n
        self.bytes += n

    def release(self) -> None:
        self.budget.used -= self.bytes
        self.bytes = 0


def body_hold(request: Request) -> BodyHold | None:
    """The request's BodyHold (None outside RequestLimits)."""
    return request.scope.get(BODY_HOLD)


class RequestLimits:
    """ASGI middleware: at most `limit` requests in the app at once, more get a 503 at once
    (with Retry-After) instead of holding their bodies in memory while they wait; and each
    request gets a `BodyHold` on the worker's body budget, given back when it ends."""

    def __init__(self, app: ASGIApp, limit: int, max_inflight_bytes: int) -> None:
        self.app, self.limit, self.active = app, limit, 0
        self.budget = BodyBudget(max_inflight_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            response = JSONResponse(
                {
                    "error": f"the server is handling {self.limit} requests already "
                    "(max_concurrent_requests); retry later"
                },
                status_code=503,
                headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        self.active += 1  # one event loop per worker: no lock needed
        hold = scope[BODY_HOLD] = BodyHold(self.budget)
        try:
            await self.app(scope, receive, send)
        finally:
            hold.release()
            self.active -= 1
