"""A fix to BentoML 1.4 applied when the service is imported: its request timeout leaks timers.

BentoML's `TimeoutMiddleware` (what `traffic={"timeout": N}` installs, 60 s by default, on every
HTTP request) schedules `loop.call_later(timeout, ...)` for each request and never cancels it.
Each timer, with the future it holds, stays alive for the full timeout after its request is
answered, so a worker holds about `request rate x timeout` of them. Measured with the soak
(`benchmarks/soak.py`, 120 s timeout): the worker's memory grew by 1.3 MB/s at 227 requests/s for
exactly 120 s, then stopped (+154 MB): about 5.7 kB per request, mostly allocator pages pinned by
the long-lived timers among short-lived objects. At a GPU's request rates this is gigabytes.

`apply()` replaces the middleware's `__call__` with one that does the same thing (a 504 with the
same JSON body when the response has not started in time) and cancels its timer as soon as the
request is over. It also ends the wait when the app finishes without sending anything (an
exception), instead of holding the request until the timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.responses import JSONResponse


async def _call(self: TimeoutMiddleware, scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] not in ("http", "websocket"):
        await self.app(scope, receive, send)
        return
    loop = asyncio.get_running_loop()
    started = loop.create_future()  # done when the response starts (or the app ends)

    async def _send(message: Any) -> None:
        if not started.done():
            started.set_result(None)
        await send(message)

    timer = loop.call_later(self.timeout, self._set_timer_out, started)
    app = asyncio.ensure_future(self.app(scope, receive, _send))
    app.add_done_callback(lambda _: started.done() or started.set_result(None))
    try:
        await started
    except TimeoutError:
        if app.cancel():
            response = JSONResponse(
                {"error": f"Not able to process the request in {self.timeout} seconds"},
                status_code=504,
            )
            await response(scope, receive, send)
            return
    finally:
        timer.cancel()
    await app


def apply() -> None:
    """Install the fixed `__call__` (idempotent)."""
    TimeoutMiddleware.__call__ = _call  # type: ignore[method-assign]
