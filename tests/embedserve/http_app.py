"""A tiny app built by embedserve.http.app.create_app, with routes that use the HTTP plumbing the
way embedserve.service does, for in-process tests (no model, no server subprocess)."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
from fastapi import FastAPI, Request
from PIL import Image
from starlette.responses import Response

from embedserve.batching import Overloaded
from embedserve.config import ServeConfig
from embedserve.http.app import create_app
from embedserve.http.auth import check_api_key
from embedserve.http.decode import decode_images
from embedserve.http.errors import ClientError
from embedserve.http.forms import parse_k, parse_metadata, read_images
from embedserve.http.index_api import IndexEndpoints
from embedserve.http.index_routes import install_index_routes
from embedserve.http.jsonbody import embeddings_response, read_embeddings_request, served_model
from embedserve.http.limits import body_hold
from embedserve.http.schemas import json_response
from embedserve.preprocess import Preprocess, preprocess
from embedserve.thumbnails import make_thumbnail, preprocess_with_thumbnail

KEY = "unit-test-key-0123456789"
PRE = Preprocess(resize=16, crop_height=16, crop_width=16)
MAX_PIXELS = 10_000
MODEL = "tiny-model"  # the model /v1/embeddings serves
DIM = 6


def png(size: int = 24, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def tiny_app(**settings) -> FastAPI:
    """create_app(ServeConfig(**settings)) with routes over the plumbing:

    POST /form     read_images (fields images, k, metadata) -> names, sizes, values, bytes held
    POST /decode   read_images + decode_images (a real preprocess) -> the array's shape
    POST /search   read_images + parse_k
    POST /add      read_images + parse_metadata -> paths, labels
    POST /slow     read_images, then waits for app.state.release (an asyncio.Event)
    POST /v1/embeddings  read_embeddings_request for MODEL + decode_images -> embeddings_response
                   of fake_embeddings
    GET  /auth     check_api_key with KEY (open without one: /open; required: /required)
    GET  /raise    raises ClientError(status, ...) or Overloaded (?kind=overloaded)

    (`index_app` makes an app with the index's real routes, over a FakeModel.)
    """
    cfg = ServeConfig(**settings)
    app = create_app(cfg)
    pool = ThreadPoolExecutor(2)

    async def read(request: Request, fields=("images", "k", "metadata")):
        return await read_images(request, fields, cfg.max_request_bytes, cfg.max_images_per_request)

    @app.post("/form")
    async def form(request: Request) -> Response:
        images, values = await read(request)
        hold = body_hold(request)
        return json_response(
            {
                "files": [[name, len(data)] for name, data in images],
                "values": values,
                "held": hold.bytes,
                "used": hold.budget.used,
            }
        )

    @app.post("/decode")
    async def decode(request: Request) -> Response:
        images, _ = await read(request, ("images",))
        x = await decode_images(
            images, lambda data: preprocess(data, PRE, max_pixels=MAX_PIXELS), pool
        )
        return json_response({"shape": list(x.shape)})

    @app.post("/search")
    async def search(request: Request) -> Response:
        _, values = await read(request, ("images", "k"))
        return json_response({"k": parse_k(values.get("k", "10"), cfg.max_k)})

    @app.post("/add")
    async def add(request: Request) -> Response:
        images, values = await read(request, ("images", "metadata"))
        paths, labels = parse_metadata(values.get("metadata"), images)
        return json_response({"paths": paths, "labels": labels})

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        images, encoding = await read_embeddings_request(
            request,
            MODEL,
            DIM,
            cfg.max_request_bytes,
            cfg.max_images_per_request,
            body_hold(request),
        )
        load = lambda data: preprocess(data, PRE, max_pixels=MAX_PIXELS)  # noqa: E731
        x = await decode_images(images, load, pool, "input")
        return json_response(embeddings_response(fake_embeddings(x), MODEL, encoding))

    app.state.release = None

    @app.post("/slow")
    async def slow(request: Request) -> Response:
        images, _ = await read(request, ("images",))
        app.state.entered.set()
        await app.state.release.wait()
        return json_response({"n": len(images)})

    @app.get("/auth")
    async def auth(request: Request) -> Response:
        check_api_key(request, KEY)
        return json_response({"ok": True})

    @app.get("/open")
    async def open_(request: Request) -> Response:
        check_api_key(request, None)
        return json_response({"ok": True})

    @app.get("/required")
    async def required(request: Request, key: str | None = None) -> Response:
        check_api_key(request, key, required=True)
        return json_response({"ok": True})

    @app.get("/raise")
    async def raise_(status: int = 400, kind: str = "client", files: int = 0) -> Response:
        if kind == "overloaded":
            raise Overloaded("the batch queue is full")
        if kind == "other":
            raise RuntimeError("a bug")
        named = [{"file": f"images[{i}]", "problem": "bad"} for i in range(files)]
        headers = {"Retry-After": "1"} if status == 503 else None
        raise ClientError(status, f"status {status}", named or None, headers)

    return app


def fake_embeddings(x: np.ndarray) -> np.ndarray:
    """DIM float32 numbers per decoded image (its first pixels, scaled), L2-normalized."""
    v = x.reshape(len(x), -1)[:, :DIM].astype(np.float32) + 1
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def new_events(app: FastAPI) -> None:
    """Fresh events for /slow, made in the running event loop."""
    app.state.entered = asyncio.Event()
    app.state.release = asyncio.Event()


class FakeModel:
    """What IndexEndpoints needs of a served model, over PRE and fake_embeddings (no ONNX)."""

    name = MODEL

    def __init__(self) -> None:
        self.package = SimpleNamespace(name=MODEL, card={"sha256": "0" * 64}, embedding_dim=DIM)
        self.telemetry = SimpleNamespace(index_size=SimpleNamespace(set=lambda n: None))
        self.thumbnail_calls = 0

    async def embed(self, images, pool, field: str = "images") -> np.ndarray:
        load = lambda data: preprocess(data, PRE, max_pixels=MAX_PIXELS)  # noqa: E731
        return fake_embeddings(await decode_images(images, load, pool, field))

    async def embed_with_thumbnails(self, images, pool, max_side: int):
        if max_side <= 0:
            return await self.embed(images, pool), [None] * len(images)
        self.thumbnail_calls += 1
        load = lambda data: preprocess_with_thumbnail(data, PRE, max_side, MAX_PIXELS)  # noqa: E731
        decoded = await decode_images(images, load, pool, stack=False)
        return fake_embeddings(np.stack([x for x, _ in decoded])), [t for _, t in decoded]


class FakeModels:
    """ServedModels of one FakeModel: `get(name)` answers 404 for another name."""

    def __init__(self) -> None:
        self.model = FakeModel()
        self.names = [MODEL]

    def get(self, asked) -> FakeModel:
        served_model(asked, self.names)
        return self.model


def item_vectors(n: int) -> np.ndarray:
    """The vectors `index_app` stores, in order."""
    x = np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def index_app(folder, items: int = 0, **settings) -> tuple[FastAPI, object]:
    """create_app + the index's routes over a real Flat index of DIM dimensions at `folder` (a
    folder: a SearchIndex, saved, its log open, so changes are durable; a *.db: Milvus Lite),
    with `items` random vectors (`item_vectors`; paths "img/<i>.png", labels "even"/"odd", a
    thumbnail each: png(i)), and a FakeModel. The API key is KEY unless `settings` say
    otherwise. Returns (app, index)."""
    from embedserve.index_backend import create_index

    cfg = ServeConfig(**{"api_key": KEY, "index": str(folder), **settings})
    app = create_app(cfg)
    install_index_routes(app, cfg.max_images_per_request)
    models = FakeModels()
    index = create_index(folder, models.model.package, "Flat")
    if items:
        x = item_vectors(items)
        paths = [f"img/{i}.png" for i in range(items)]
        labels = ["even" if i % 2 == 0 else "odd" for i in range(items)]
        index.add(x, paths, labels, thumbnails=[make_thumbnail(image(i)) for i in range(items)])
    index.save(folder)
    if cfg.api_key and cfg.workers == 1:
        index.open_log(folder)
    endpoints = IndexEndpoints(cfg, models, index, MODEL, ThreadPoolExecutor(2))
    app.state.index_endpoints = endpoints
    return app, index


def image(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8))


class SyncASGITransport(httpx.BaseTransport):
    """An httpx transport for a blocking client (embedserve.client.Client) that sends each
    request to an ASGI app in this process, in its own event loop."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> httpx.Response:
            response = await httpx.ASGITransport(app=self.app).handle_async_request(request)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        return asyncio.run(send())


class Client:
    """A synchronous client of an ASGI app in this process, through httpx's ASGI transport
    (each call in its own event loop). With raise_app_exceptions=False, an exception that no
    handler answers comes back as a 500, as a server would send it."""

    def __init__(self, app: FastAPI, raise_app_exceptions: bool = True) -> None:
        self.app, self.raise_app_exceptions = app, raise_app_exceptions

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(
                app=self.app, raise_app_exceptions=self.raise_app_exceptions
            )
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(send())

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs) -> httpx.Response:
        return self.request("POST", url, **kwargs)
