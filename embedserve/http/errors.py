"""Errors answered as JSON: ClientError (any 4xx, or a 503 of a limit) and one handler.

Endpoints raise; the handler installed by `install_error_handler` turns the error into
`{"error": "..."}` (plus `"files": [...]` when it names bad files) with its status and headers.
The batcher's Overloaded (its queue is past the latency budget) is answered 503 the same way.
Under /v1/ (the OpenAI-compatible API) the same message comes in the OpenAI error shape, which
its clients read: `{"error": {"message": "...", "type": ..., "param": null, "code": null}}`
(plus `"files"` inside it).
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
        return JSONResponse(body, status_code=self.status, headers=self.headers)


OPENAI_PREFIX = "/v1/"  # the paths of the OpenAI-compatible API


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def error_response(exc: Exception, openai: bool = False) -> JSONResponse:
    """The answer to an error an endpoint raised (ClientError or Overloaded); with `openai`, in
    the OpenAI API's error shape."""
    if isinstance(exc, Overloaded):
        exc = ClientError(503, f"{exc}; retry later")
    if isinstance(exc, ClientError):
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
