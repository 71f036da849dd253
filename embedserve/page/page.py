"""The routes of the search page: `/` (the page), `/page/<asset>` and `/docs` (the OpenAPI page).

The files are package data (embedserve/page/static), read once when the app is made and
answered from memory with an ETag (a reload that finds them unchanged gets a 304) and a
Content-Security-Policy that allows nothing from another origin. Only the files named in
ASSETS are served: no path from the request ever reaches the file system.

BentoML serves its own OpenAPI page (Swagger UI) at `/`; the app that embedserve.service
mounts at `/` matches first, so `/` is the search page and `/docs` serves the same Swagger UI
from BentoML's own assets (/static_content, /docs.json), without BentoML's analytics tag.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

STATIC = Path(__file__).with_name("static")

# name under /page/ -> media type
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
HTML = "text/html; charset=utf-8"

# The search page: its own scripts, styles and images, thumbnails as blob: URLs, calls to itself.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    csp: str | None = None

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'

    def response(self, request: Request) -> Response:
        headers = {
            "ETag": self.etag,
            "Cache-Control": "no-cache",  # revalidate: a new version shows at once
            "X-Content-Type-Options": "nosniff",
        }
        if self.csp:
            headers["Content-Security-Policy"] = self.csp
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def load_files() -> dict[str, StaticFile]:
    """Every served file by URL path, read from the package's static folder."""
    files = {
        "/": StaticFile((STATIC / "index.html").read_bytes(), HTML, PAGE_CSP),
        "/docs": StaticFile((STATIC / "docs.html").read_bytes(), HTML),
    }
    for name, media_type in ASSETS.items():
        files[f"/page/{name}"] = StaticFile((STATIC / name).read_bytes(), media_type)
    return files


def install_page(app: Starlette) -> None:
    """Add GET `/`, `/docs` and `/page/<asset>` to `app`; none needs the API key, none is in
    the OpenAPI spec."""
    files = load_files()

    for path, static in files.items():

        async def serve(request: Request, static: StaticFile = static) -> Response:
            return static.response(request)

        app.add_route(path, serve, methods=["GET", "HEAD"], include_in_schema=False)
