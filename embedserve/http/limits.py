"""Traffic limits of one worker: requests at once, and the bytes of request bodies it holds.

`RequestLimits` (ASGI middleware) answers a request over `max_concurrent_requests` with an
immediate 503 and gives every other one a `BodyHold` on the worker's `BodyBudget`
(`max_inflight_bytes`), which `read_body` takes the body's bytes from (for a multipart form
and a JSON body alike). `check_length`, `read_body` and `check_count` are the per-request
limits: `max_request_bytes` and `max_images_per_request`.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from embedserve.http.errors import ClientError, is_openai_path

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
                reason="max_inflight_bytes",
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
            error = ClientError(
                503,
                f"the server is handling {self.limit} requests already "
                "(max_concurrent_requests); retry later",
                headers={"Retry-After": "1"},
                reason="max_concurrent_requests",
            )
            error.count()
            await error.response(is_openai_path(scope["path"]))(scope, receive, send)
            return
        self.active += 1  # one event loop per worker: no lock needed
        hold = scope[BODY_HOLD] = BodyHold(self.budget)
        try:
            await self.app(scope, receive, send)
        finally:
            hold.release()
            self.active -= 1


def check_length(request: Request, max_bytes: int) -> int | None:
    """The request's declared Content-Length (None when chunked): 413 when it is over
    `max_bytes`, 400 when it is not a number."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise ClientError(400, f"bad Content-Length header {declared!r}")
    if int(declared) > max_bytes:
        raise ClientError(413, too_large(max_bytes), reason="max_request_bytes")
    return int(declared)


def too_large(max_bytes: int) -> str:
    return f"request body over the limit of {max_bytes} bytes (max_request_bytes)"


async def read_body(request: Request, max_bytes: int, hold: BodyHold | None = None) -> bytes:
    """The whole body, in memory, bounded: over `max_bytes` is a 413, by its Content-Length or
    while it streams in when it has none (chunked). With `hold`, its bytes are taken from the
    worker's body budget first (a 503 when they would pass it): all of a declared length before
    a byte is read, a chunked body chunk by chunk."""
    declared = check_length(request, max_bytes)
    if hold is not None and declared is not None:
        hold.take(declared)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ClientError(413, too_large(max_bytes), reason="max_request_bytes")
            if hold is not None and declared is None:
                hold.take(len(chunk))
            chunks.append(chunk)
    except ClientDisconnect:  # nobody reads the answer; nothing to log as an error
        raise ClientError(400, "the client disconnected before sending the whole body") from None
    body = b"".join(chunks)
    chunks.clear()  # the joined body is the one copy kept
    return body


def check_count(images: list, limit: int) -> None:
    """A 413 when there are more than `limit` images (max_images_per_request)."""
    if len(images) > limit:
        raise ClientError(
            413,
            f"{len(images)} images in one request, over the limit of {limit} "
            "(max_images_per_request)",
            reason="max_images_per_request",
        )
