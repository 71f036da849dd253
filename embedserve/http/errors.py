"""Errors answered as JSON: ClientError (any 4xx, or a 503 of a limit) and one handler.

Endpoints raise; the handler installed by `install_error_handler` turns the error into
`{"error": "..."}` (plus `"files": [...]` when it names bad files) with its status and headers,
and counts it in embedserve_requests_refused_total (embedserve.telemetry) by status and reason.
The batcher's Overloaded (its queue is past the latency budget) is answered 503 the same way.
Every 503 carries `Retry-After` (RETRY_AFTER_S unless the error gives its own): all of them mean
that nothing was done and the same request may be sent again.
Under /v1/ (the OpenAI-compatible API) the same message comes in the OpenAI error shape, which
its clients read: `{"error": {"message": "...", "type": ..., "param": null, "code": null}}`
(plus `"files"` inside it).
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from embedserve import telemetry
from embedserve.batching import Overloaded

RETRY_AFTER_S = 1  # the Retry-After of a 503 that does not give its own


class ClientError(Exception):
    """A client's fault: answered with `status` and a JSON body that names the problem.
    `reason` labels it in embedserve_requests_refused_total (default: by status)."""

    def __init__(
        self,
        status: int,
        error: str,
        files: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ):
        super().__init__(error)
        self.status, self.error, self.files, self.headers = status, error, files, headers
        self.reason = reason

    def response(self, openai: bool = False) -> JSONResponse:
        """The JSON answer; with `openai`, in the OpenAI API's error shape."""
        body: dict[str, Any] = {"error": self.error}
        if self.files:
            body["files"] = self.files
        if openai:
            kind = "invalid_request_error" if self.status < 500 else "server_error"
            body = {"error": {"message": self.error, "type": kind, "param": None, "code": None}}
            if self.files:
                body["error"]["files"] = self.files
        headers = self.headers
        if self.status == 503 and "Retry-After" not in (headers or {}):
            headers = {**(headers or {}), "Retry-After": str(RETRY_AFTER_S)}
        return JSONResponse(body, status_code=self.status, headers=headers)

    def count(self) -> None:
        """Count this refusal in the process's metrics (when they are installed)."""
        telemetry.refused(self.status, self.reason)


OPENAI_PREFIX = "/v1/"  # the paths of the OpenAI-compatible API


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def error_response(exc: Exception, openai: bool = False) -> JSONResponse:
    """The answer to an error an endpoint raised (ClientError or Overloaded); with `openai`, in
    the OpenAI API's error shape."""
    if isinstance(exc, Overloaded):
        exc = ClientError(503, f"{exc}; retry later", reason="batch_queue_full")
    if isinstance(exc, ClientError):
        exc.count()
        return exc.response(openai)
    raise TypeError(f"no JSON answer for {type(exc).__name__}") from exc


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The exception handler (Starlette's signature) for the classes of HANDLED."""
    return error_response(exc, is_openai_path(request.url.path))


HANDLED: tuple[type[Exception], ...] = (ClientError, Overloaded)


def install_error_handler(app: Starlette) -> None:
    """Answer every error of HANDLED that an endpoint of `app` raises with `handle_error`."""
    for cls in HANDLED:
        app.add_exception_handler(cls, handle_error)
