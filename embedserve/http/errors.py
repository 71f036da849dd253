"""Errors answered as JSON: ClientError (any 4xx, or a 503 of a limit) and one handler.

Endpoints raise; the handler installed by `install_error_handler` turns the error into
`{"error": "..."}` (plus `"files": [...]` when it names bad files) with its status and headers.
The batcher's Overloaded (its queue is past the latency budget) is answered 503 the same way.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from embedserve.batching import Overloaded


class ClientError(Exception):
    """A client's fault: answered with `status` and a JSON body that names the problem."""

    def __init__(
        self,
        status: int,
        error: str,
        files: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(error)
        self.status, self.error, self.files, self.headers = status, error, files, headers

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.error}
        if self.files:
            body["files"] = self.files
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def error_response(exc: Exception) -> JSONResponse:
    """The answer to an error an endpoint raised (ClientError or Overloaded)."""
    if isinstance(exc, ClientError):
        return exc.response()
    if isinstance(exc, Overloaded):
        return JSONResponse({"error": f"{exc}; retry later"}, status_code=503)
    raise TypeError(f"no JSON answer for {type(exc).__name__}") from exc


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The exception handler (Starlette's signature) for the classes of HANDLED."""
    return error_response(exc)


HANDLED: tuple[type[Exception], ...] = (ClientError, Overloaded)


def install_error_handler(app: Starlette) -> None:
    """Answer every error of HANDLED that an endpoint of `app` raises with `handle_error`."""
    for cls in HANDLED:
        app.add_exception_handler(cls, handle_error)
