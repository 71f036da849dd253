"""The FastAPI app that embedserve.service mounts on its BentoML service, built from a config.

The endpoints are routes of a FastAPI app mounted on the service (BentoML merges them into its
OpenAPI page). Measured here with an echo endpoint: a BentoML `@bentoml.api` taking
`list[Path]` writes each upload to a temporary file and answers 357 single-file requests/s,
a route mounted in the same server 827; and BentoML's APIs are POST only, /info is a GET.

The app also serves the search page (embedserve.page): `/`, its assets under `/page/`, and
BentoML's OpenAPI page (Swagger UI) at `/docs`, which BentoML itself would serve at `/`.
"""

from __future__ import annotations

from fastapi import FastAPI

from embedserve.config import ServeConfig
from embedserve.http.errors import install_error_handler
from embedserve.http.limits import RequestLimits
from embedserve.page import install_page


def create_app(config: ServeConfig) -> FastAPI:
    """An app with the search page (`/`, `/page/...`, `/docs`; open, outside the OpenAPI
    spec) and no endpoints (the service adds them), with the traffic limits of `config` and
    the JSON error handler. FastAPI's own docs pages are off: BentoML serves the spec
    (/docs.json) and its Swagger UI assets."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        RequestLimits,
        limit=config.max_concurrent_requests,
        max_inflight_bytes=config.max_inflight_bytes,
    )
    install_error_handler(app)
    install_page(app)
    return app
