"""The FastAPI app that embedserve.service mounts on its BentoML service, built from a config.

The endpoints are routes of a FastAPI app mounted on the service (BentoML merges them into its
OpenAPI page). Measured here with an echo endpoint: a BentoML `@bentoml.api` taking
`list[Path]` writes each upload to a temporary file and answers 357 single-file requests/s,
a route mounted in the same server 827; and BentoML's APIs are POST only, /info is a GET.
"""

from __future__ import annotations

from fastapi import FastAPI

from embedserve.config import ServeConfig
from embedserve.http.errors import install_error_handler
from embedserve.http.limits import RequestLimits


def create_app(config: ServeConfig) -> FastAPI:
    """An app without routes (the service adds them) and without docs pages (BentoML serves
    the OpenAPI page), with the traffic limits of `config` and the JSON error handler."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        RequestLimits,
        limit=config.max_concurrent_requests,
        max_inflight_bytes=config.max_inflight_bytes,
    )
    install_error_handler(app)
    return app
