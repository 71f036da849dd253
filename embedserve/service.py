"""The HTTP service: `bentoml serve embedserve.service:EmbedService` (what `make serve` runs).

    POST /embed       multipart, field `images` repeated -> one L2-normalized embedding per image
    POST /search      multipart `images` + `k`           -> top-k neighbours from the FAISS index
    GET  /info        the model, the execution provider really in use, batching, limits, index
    POST /index/add   multipart `images` + `metadata`    -> ids of the images added to the index

Reading endpoints are open unless EMBEDSERVE_API_KEY is set (then they need
`Authorization: Bearer <key>`); /index/add always needs the key and is off without one.

A request is parsed and its images decoded (in a thread pool: Pillow releases the GIL) before
anything is batched, so a bad file fails only its own request, with a 4xx that names it. The
decoded images of concurrent requests then share model calls through adaptive batching
(embedserve.batching). Configuration: embedserve.config (EMBEDSERVE_* variables or a TOML file).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import onnxruntime as ort
import orjson
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from embedserve import __version__, bentoml_fixes
from embedserve.batching import AdaptiveBatcher, Overloaded
from embedserve.config import ServeConfig, load_config, unknown_variables
from embedserve.package import (
    MODELS_DIR,
    Encoder,
    ModelPackage,
    PackageError,
    cuda_session_starts,
    load_package,
)
from embedserve.preprocess import (
    ImageDecodeError,
    ImageTooLarge,
    UnsupportedImageFormat,
    preprocess,
)

# a child of "bentoml", whose handlers BentoML configures in every worker
logger = logging.getLogger("bentoml.embedserve")
bentoml_fixes.apply()  # BentoML's request timeout keeps a timer per request for its whole length

# Read once, when BentoML imports the service: the decorator needs the worker count. Reading
# the environment (and the optional TOML file) is all that happens at import time.
CONFIG: ServeConfig = load_config()
# A missing model or a bad card stops `bentoml serve` here, at once (reading a card is cheap).
_PACKAGE = load_package(CONFIG.model, CONFIG.models_dir or MODELS_DIR)
if CONFIG.index and not Path(CONFIG.index).is_dir():
    raise FileNotFoundError(
        f"EMBEDSERVE_INDEX={CONFIG.index}: no such index directory (build one with "
        "`embedserve index build --images DIR --out INDEX_DIR`)"
    )


def _variants_to_verify(package: ModelPackage, cfg: ServeConfig) -> set[str]:
    """The variants a worker may open with these settings (as Encoder chooses them)."""
    if cfg.variant != "auto":
        return {cfg.variant}
    chosen = set()
    if cfg.device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        chosen.add(package.choose_variant("cuda"))
    if cfg.device != "cuda":
        chosen.add(package.choose_variant("cpu"))
    return chosen


# A model file modified or truncated on disk stops the server here with the sha256 mismatch,
# instead of each worker failing on it and being restarted forever (never ready).
for _variant in sorted(_variants_to_verify(_PACKAGE, CONFIG)):
    _PACKAGE.verify_file(_variant)
if CONFIG.device == "cuda" and not cuda_session_starts(_PACKAGE):
    # Checked here, in the `bentoml serve` process itself, so that the server exits with this
    # error instead of restarting a failing worker forever. No silent fallback to the CPU.
    raise PackageError(
        "EMBEDSERVE_DEVICE=cuda, but the CUDA execution provider cannot start on this machine "
        "(no GPU, or the CUDA 13 / cuDNN 9 libraries are missing); use EMBEDSERVE_DEVICE=auto "
        "or cpu to run on the CPU"
    )


def index_writes_off_reason(cfg: ServeConfig) -> str | None:
    """Why POST /index/add is off with these settings, or None when it is on."""
    if not cfg.api_key:
        return (
            "adding to the index needs an API key, and none is configured: start the server "
            "with EMBEDSERVE_API_KEY set (and EMBEDSERVE_INDEX)"
        )
    if not cfg.index:
        return "no search index is configured (EMBEDSERVE_INDEX)"
    if cfg.workers != 1:
        # each worker holds its own copy of the index: additions through one would be
        # invisible to the others
        return f"adding to the index needs EMBEDSERVE_WORKERS=1 (this server runs {cfg.workers})"
    return None


# The images of a warm-up pass through the batcher: enough for BentoML's dispatcher to fit its
# latency model (it forces batches of 1, 2 and 3 for its first ~22 calls) before /readyz is 200.
WARMUP_CALLS = 24


class EmbedResponse(BaseModel):
    """The answer of /embed."""

    model: str = Field(
        description="the model package's name", examples=["barlow-twins-resnet18-imagenette"]
    )
    dim: int = Field(description="embedding dimension", examples=[512])
    embeddings: list[list[float]] = Field(
        description="one L2-normalized float32 embedding per image, in request order"
    )


class Neighbour(BaseModel):
    id: int = Field(description="the image's id in the index (stable across `index add`)")
    score: float = Field(description="cosine similarity (inner product of unit vectors)")
    path: str | None = Field(description="the indexed file's path, as given at build time")
    label: str | None = Field(description="its class folder, when the index was built from one")


class SearchResult(BaseModel):
    file: str = Field(description="the query image, as the request named it")
    neighbours: list[Neighbour]


class SearchResponse(BaseModel):
    """The answer of /search."""

    model: str
    k: int
    results: list[SearchResult] = Field(description="one entry per query image, in request order")


class AddResponse(BaseModel):
    """The answer of /index/add: the additions are durable and searchable when it comes."""

    model: str
    ids: list[int] = Field(description="the new images' ids, in request order")
    index_size: int = Field(description="images in the index now")


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


def check_api_key(request: Request, key: str | None, required: bool = False) -> None:
    """Raise a 401 ClientError unless the request carries `Authorization: Bearer <key>`.

    Without a configured key the reading endpoints are open (`required=False`). The comparison
    takes the same time wherever the first wrong byte is (hmac.compare_digest), and the error
    never repeats what was sent."""
    if key is None and not required:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if key is not None and scheme.lower() == "bearer":
        # digests of equal length: not even the key's length shows in the timing
        if hmac.compare_digest(_digest(token.strip()), _digest(key)):
            return
        problem = "wrong API key"
    else:
        problem = "missing API key"
    raise ClientError(
        401,
        f"{problem}: send the header 'Authorization: Bearer <key>' (EMBEDSERVE_API_KEY)",
        headers={"WWW-Authenticate": 'Bearer realm="embedserve"'},
    )


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


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


BODY_HOLD = "embedserve.body_hold"  # the ASGI scope key of a request's BodyHold


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


def _status_for(error: ImageDecodeError) -> int:
    if isinstance(error, ImageTooLarge):
        return 413
    if isinstance(error, UnsupportedImageFormat):
        return 415
    return 400


def _client_name(position: int, filename: str | None) -> str:
    """How an error names a file: `images[1] (scan.pdf)`."""
    return f"images[{position}] ({filename})" if filename else f"images[{position}]"


async def read_form(
    request: Request,
    max_bytes: int,
    fields: tuple[str, ...],
    max_files: int = 10_000,
    hold: BodyHold | None = None,
) -> tuple[list[tuple[str | None, bytes]], dict[str, str]]:
    """The uploaded images (filename, bytes) and the text fields of a multipart request.

    Everything stays in memory, bounded: a body over `max_bytes` is refused by its
    Content-Length, or while it streams in when it has none (chunked). Then the body must be
    multipart/form-data (415) that parses (400), with its images as files in the field `images`
    (400: missing, sent as text, or a misspelt field) and no field other than `fields`.
    More than `max_files` file parts stop the parser at once (413), and more text parts than
    the form has fields (400): a body of a million tiny parts costs no more than its bytes.
    With `hold`, the body's bytes are taken from the worker's body budget first (503 when they
    would pass it).
    """
    too_large = f"request body over the limit of {max_bytes} bytes (max_request_bytes)"
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise (
            ClientError(413, too_large)
            if declared.isdigit()
            else ClientError(400, f"bad Content-Length header {declared!r}")
        )
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise ClientError(
            415,
            f"Content-Type {media_type or 'missing'}: send multipart/form-data with the images "
            "as files in the field 'images' (curl -F images=@photo.jpg)",
        )
    if hold is not None and declared is not None:
        hold.take(int(declared))  # before a byte is read
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ClientError(413, too_large)
            if hold is not None and declared is None:
                hold.take(len(chunk))
            chunks.append(chunk)
    except ClientDisconnect:  # nobody reads the answer; nothing to log as an error
        raise ClientError(400, "the client disconnected before sending the whole body") from None
    body = b"".join(chunks)
    chunks.clear()  # the joined body is the one copy kept

    async def stream():
        yield body

    try:
        form = await MultiPartParser(
            request.headers,
            stream(),
            max_files=max_files,
            max_fields=len(fields),
            max_part_size=len(body) + 1,
        ).parse()
    except (MultiPartException, ValueError) as e:
        if str(e).startswith("Too many files"):
            raise ClientError(
                413,
                f"more than {max_files} files in one request, over the limit of "
                f"{max_files - 1} images (max_images_per_request)",
            ) from None
        raise ClientError(400, f"malformed multipart body: {e}") from None
    try:
        unknown = sorted(set(form.keys()) - set(fields))
        if unknown:
            raise ClientError(
                400,
                f"unknown field(s) {', '.join(map(repr, unknown))}; this endpoint takes "
                + ", ".join(map(repr, fields)),
            )
        images = []
        for i, value in enumerate(form.getlist("images")):
            if not isinstance(value, UploadFile):
                raise ClientError(
                    400,
                    f"images[{i}] is a text value, not a file: upload the image itself "
                    "(curl -F images=@photo.jpg); URLs are not fetched",
                )
            images.append((value.filename, await value.read()))
        if not images:
            raise ClientError(400, "missing field 'images': send one or more image files in it")
        values = {}
        for name in fields:
            if name == "images" or name not in form:
                continue
            given = form.getlist(name)
            if len(given) > 1 or isinstance(given[0], UploadFile):
                raise ClientError(400, f"field {name!r} must be given once, as a value")
            values[name] = given[0]
        return images, values
    finally:
        await form.close()


# What a stored path or label may be: text of bounded length without control characters (a
# path is only ever stored and returned, never opened, joined or written to).
_MAX_PATH_CHARS = 1024
_MAX_LABEL_CHARS = 256


def _clean_text(value: Any, what: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ClientError(400, f"{what} must be a string or null, not {type(value).__name__}")
    if len(value) > limit:
        raise ClientError(400, f"{what} is {len(value)} characters, over the limit of {limit}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ClientError(400, f"{what} contains control characters")
    return value


def _parse_metadata(
    raw: str | None, images: list[tuple[str | None, bytes]]
) -> tuple[list[str | None], list[str | None]]:
    """Paths and labels of the images to add, from the `metadata` field (a JSON array with one
    {"path", "label"} object per image) or, without it, the uploaded files' names."""
    if raw is None:
        paths = [
            _clean_text(name, f"images[{i}]'s file name", _MAX_PATH_CHARS)
            for i, (name, _) in enumerate(images)
        ]
        return paths, [None] * len(images)
    try:
        items = json.loads(raw)
    except ValueError as e:
        raise ClientError(400, f"metadata is not valid JSON: {e}") from None
    if not isinstance(items, list) or len(items) != len(images):
        raise ClientError(
            400,
            f"metadata must be a JSON array with one object per image ({len(images)}), "
            '[{"path": ..., "label": ...}, ...]',
        )
    paths, labels = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"path", "label"}:
            raise ClientError(400, f'metadata[{i}] must be an object with only "path" and "label"')
        paths.append(_clean_text(item.get("path"), f"metadata[{i}].path", _MAX_PATH_CHARS))
        labels.append(_clean_text(item.get("label"), f"metadata[{i}].label", _MAX_LABEL_CHARS))
    return paths, labels


def _multipart_body(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAPI requestBody of an endpoint that takes `images` (+ `extra` fields)."""
    properties = {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "minItems": 1,
            "maxItems": CONFIG.max_images_per_request,
            "description": "image files (JPEG, PNG, WebP, GIF, BMP, TIFF): repeat the field "
            "once per image",
        },
        **(extra or {}),
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["images"], "properties": properties},
                    "encoding": {
                        "images": {"contentType": "image/*"},
                        **{
                            name: {"contentType": "application/json"}
                            for name, spec in (extra or {}).items()
                            if spec.get("type") == "array"
                        },
                    },
                }
            },
        }
    }


_ERRORS = {
    400: {"description": "a bad file or field; the body names each bad file and its problem"},
    401: {"description": "EMBEDSERVE_API_KEY is set and the request has no or a wrong key"},
    409: {"description": "no index configured (for /search)"},
    413: {"description": "too many images, too many pixels, or a body over the byte limit"},
    415: {"description": "an image format that is not decoded, or a body that is not multipart"},
    503: {
        "description": "overloaded: the batch queue exceeds max_latency_ms, or "
        "max_concurrent_requests are running, or the request bodies held would pass "
        "max_inflight_bytes; retry (Retry-After)"
    },
}


# The endpoints are routes of a FastAPI app mounted on the service (BentoML merges them into its
# OpenAPI page). Measured here with an echo endpoint: a BentoML `@bentoml.api` taking
# `list[Path]` writes each upload to a temporary file and answers 357 single-file requests/s,
# a route mounted in the same server 827; and BentoML's APIs are POST only, /info is a GET.
app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(
    RequestLimits,
    limit=CONFIG.max_concurrent_requests,
    max_inflight_bytes=CONFIG.max_inflight_bytes,
)


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="embedserve",
    workers=CONFIG.workers,
    # A request whose answer has not started after this long gets a 504 (slow clients).
    traffic={"timeout": CONFIG.request_timeout_s},
    logging={"access": {"enabled": CONFIG.access_log}},
    # The OpenAPI page's title and description (served at / and /docs.json).
    description=__doc__,
)
class EmbedService:
    """Image embeddings and similarity search with a self-supervised encoder on ONNX Runtime."""

    def __init__(self) -> None:
        _exit_when_orphaned()
        for name in unknown_variables():
            logger.warning("ignoring %s: no such setting (see embedserve.config)", name)
        cfg = self.config = CONFIG
        self.package = load_package(cfg.model, cfg.models_dir or MODELS_DIR)
        # device=cuda fails here with a clear error when CUDA cannot start: no silent fallback
        self.encoder = Encoder(
            self.package,
            variant=cfg.variant,
            device=cfg.device,
            intra_op_threads=cfg.intra_op_threads,
        )
        self.provider = self.encoder.providers[0]
        logger.info(
            "model %s (%s variant) on %s, device=%s, %d intra-op threads, %d decode threads",
            self.package.name,
            self.encoder.variant,
            self.provider,
            cfg.device,
            cfg.intra_op_threads,
            cfg.decoder_threads,
        )
        self.index = None
        if cfg.index:
            from embedserve.index import SearchIndex  # faiss is imported only when it is used

            self.index = SearchIndex.load(cfg.index, self.package)  # refuses another model's
            logger.info(
                "index %s: %d vectors (%d from its write-ahead log)",
                cfg.index,
                len(self.index),
                self.index.replayed,
            )
        self.writes_off = index_writes_off_reason(cfg)
        if self.writes_off is None:
            self.index.open_log(cfg.index)  # this worker is the index's one writer
            logger.info("POST /index/add is on (API key required)")
        elif cfg.api_key and cfg.index:
            logger.warning("POST /index/add is off: %s", self.writes_off)
        inp = self.package.card["input"]
        self._input_shape = (inp["height"], inp["width"], inp["channels"])
        self._decode_pool = ThreadPoolExecutor(cfg.decoder_threads, thread_name_prefix="decode")
        # One thread runs the model: ONNX Runtime parallelises inside a call with its own pool.
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")
        # One thread writes the index: log appends (fsync) and saves, in request order.
        self._index_pool = ThreadPoolExecutor(1, thread_name_prefix="index-writer")
        self.batcher = AdaptiveBatcher(
            self.encoder.embed,
            cfg.max_batch_size,
            cfg.max_latency_ms,
            self._model_pool,
            max_wait_ms=cfg.max_batch_wait_ms,
        )
        # Warm-up before ready: the largest batch first (allocations), then single images.
        start = time.perf_counter()
        self.encoder.embed(np.zeros((cfg.max_batch_size, *self._input_shape), np.uint8))
        self.encoder.embed(np.zeros((1, *self._input_shape), np.uint8))
        self._ready = False
        self._warmup_s = time.perf_counter() - start

    @bentoml.on_startup
    async def _train_batcher(self) -> None:
        """Fit the dispatcher's latency model with real model calls, then declare readiness."""
        one = np.zeros((1, *self._input_shape), np.uint8)
        start = time.perf_counter()
        for _ in range(WARMUP_CALLS):
            await self.batcher(one)
        self.batcher.reset_stats()
        self._warmup_s += time.perf_counter() - start
        self._ready = True
        logger.info("warm-up done in %.1f s; ready", self._warmup_s)

    async def __is_ready__(self) -> bool:
        return self._ready

    # -- request handling -------------------------------------------------------------------

    def _check_count(self, images: list) -> None:
        limit = self.config.max_images_per_request
        if len(images) > limit:
            raise ClientError(
                413,
                f"{len(images)} images in one request, over the limit of {limit} "
                "(max_images_per_request)",
            )

    def _load_one(self, data: bytes) -> np.ndarray:
        return preprocess(data, self.package.preprocess, max_pixels=self.config.max_image_pixels)

    async def _decode_all(self, images: list[tuple[str | None, bytes]]) -> np.ndarray:
        """Decode and preprocess every file in parallel; every bad file is named in one 4xx."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self._decode_pool, self._load_one, b) for _, b in images),
            return_exceptions=True,
        )
        problems = []
        for position, ((filename, _), result) in enumerate(zip(images, results, strict=True)):
            if isinstance(result, ImageDecodeError):
                name = _client_name(position, filename)
                problems.append((_status_for(result), name, str(result)))
            elif isinstance(result, BaseException):
                raise result
        if problems:
            status = max(s for s, _, _ in problems)  # 415 > 413 > 400: the most specific
            files = [{"file": name, "problem": why} for _, name, why in problems]
            summary = "; ".join(f"{f['file']}: {f['problem']}" for f in files)
            raise ClientError(status, summary, files)
        return np.stack(results)

    async def _read(
        self, request: Request, fields: tuple[str, ...]
    ) -> tuple[list[tuple[str | None, bytes]], dict[str, str]]:
        cfg = self.config
        # one file part over the limit is still counted exactly (a 413 that says how many)
        images, values = await read_form(
            request,
            cfg.max_request_bytes,
            fields,
            max_files=cfg.max_images_per_request + 1,
            hold=request.scope.get(BODY_HOLD),
        )
        self._check_count(images)
        return images, values

    async def _embed(self, images: list[tuple[str | None, bytes]]) -> np.ndarray:
        """Decode (per request), then embed, batched with other requests' images."""
        return await self.batcher(await self._decode_all(images))

    # -- endpoints ----------------------------------------------------------------------------

    @app.post(
        "/embed",
        summary="Embed images",
        response_model=EmbedResponse,
        responses=_ERRORS,
        openapi_extra=_multipart_body(),
        tags=["Service APIs"],
    )
    async def embed(self, request: Request) -> Response:
        """One L2-normalized float32 embedding per image, in request order. The same images
        give the same embeddings whether they are sent together or one per request.

        Example: `curl -F images=@cat.jpg -F images=@dog.png localhost:3000/embed`

        Errors name each bad file and its problem: 400 (empty, corrupt, truncated or non-image
        file; missing field), 413 (too many images, too many pixels, body too large), 415
        (unsupported image format), 503 (overloaded)."""
        try:
            check_api_key(request, self.config.api_key)
            images, _ = await self._read(request, ("images",))
            emb = await self._embed(images)
        except ClientError as e:
            return e.response()
        except Overloaded as e:
            return JSONResponse({"error": f"{e}; retry later"}, status_code=503)
        return _json({"model": self.package.name, "dim": int(emb.shape[1]), "embeddings": emb})

    @app.post(
        "/search",
        summary="Find similar images",
        response_model=SearchResponse,
        responses=_ERRORS,
        openapi_extra=_multipart_body(
            {"k": {"type": "integer", "default": 10, "description": "neighbours per image"}}
        ),
        tags=["Service APIs"],
    )
    async def search(self, request: Request) -> Response:
        """The k most similar indexed images for each query image (cosine similarity), with
        their ids, scores, paths and labels. `k` over the index size returns every image.

        Example: `curl -F images=@cat.jpg -F k=5 localhost:3000/search`

        Needs an index (`embedserve index build ...`, then EMBEDSERVE_INDEX=DIR); without one
        the answer is 409 with these instructions."""
        try:
            check_api_key(request, self.config.api_key)
        except ClientError as e:
            return e.response()
        if self.index is None:
            return JSONResponse(
                {
                    "error": "no search index is configured: build one with `embedserve index "
                    "build --images DIR --out INDEX_DIR` and start the server with "
                    "EMBEDSERVE_INDEX=INDEX_DIR"
                },
                status_code=409,
            )
        try:
            images, values = await self._read(request, ("images", "k"))
            k = self._parse_k(values.get("k", "10"))
            emb = await self._embed(images)
            hits = await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, self.index.search, emb, k
            )
        except ClientError as e:
            return e.response()
        except Overloaded as e:
            return JSONResponse({"error": f"{e}; retry later"}, status_code=503)
        results = [
            {"file": _client_name(i, filename), "neighbours": h}
            for i, ((filename, _), h) in enumerate(zip(images, hits, strict=True))
        ]
        return _json({"model": self.package.name, "k": k, "results": results})

    def _parse_k(self, raw: str) -> int:
        try:
            k = int(raw)
        except ValueError:
            raise ClientError(400, f"k must be an integer, not {raw!r}") from None
        if not 1 <= k <= self.config.max_k:
            raise ClientError(400, f"k must be between 1 and {self.config.max_k} (max_k), not {k}")
        return k

    @app.post(
        "/index/add",
        summary="Add images to the index (API key required)",
        response_model=AddResponse,
        responses={
            **_ERRORS,
            401: {"description": "no or a wrong API key (Authorization: Bearer <key>)"},
            403: {"description": "adding is off: no API key configured, no index, or workers > 1"},
            409: {"description": "no index configured"},
        },
        openapi_extra=_multipart_body(
            {
                "metadata": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "path": {"type": ["string", "null"], "maxLength": _MAX_PATH_CHARS},
                            "label": {"type": ["string", "null"], "maxLength": _MAX_LABEL_CHARS},
                        },
                        "additionalProperties": False,
                    },
                    "description": "optional JSON array, one object per image in order: "
                    '[{"path": "photos/cat.jpg", "label": "cat"}, ...]; both keys optional. '
                    "Without it, each path is the uploaded file's name and there is no label. "
                    "Paths are stored as text, never opened.",
                }
            }
        ),
        tags=["Service APIs"],
    )
    async def index_add(self, request: Request) -> Response:
        """Embed the images and append them to the served index; the answer gives their ids.
        When it comes, the additions are in the index's fsynced write-ahead log (they survive
        a crash or a kill) and searchable. Searches running meanwhile are never failed.

        Example: `curl -H "Authorization: Bearer $KEY" -F images=@cat.jpg
        -F 'metadata=[{"path": "cat.jpg", "label": "cat"}]' localhost:3000/index/add`

        Needs EMBEDSERVE_API_KEY (without one, 403: adding is off), EMBEDSERVE_INDEX and one
        worker."""
        cfg = self.config
        try:
            if cfg.api_key is None:
                raise ClientError(403, f"POST /index/add is off: {self.writes_off}")
            check_api_key(request, cfg.api_key, required=True)
            if self.writes_off is not None:
                raise ClientError(403, f"POST /index/add is off: {self.writes_off}")
            images, values = await self._read(request, ("images", "metadata"))
            paths, labels = _parse_metadata(values.get("metadata"), images)
            emb = await self._embed(images)
            ids = await asyncio.get_running_loop().run_in_executor(
                self._index_pool, self._add_durably, emb, paths, labels
            )
        except ClientError as e:
            return e.response()
        except Overloaded as e:
            return JSONResponse({"error": f"{e}; retry later"}, status_code=503)
        except OSError as e:  # the log could not be written: nothing was acknowledged
            logger.error("index log write failed: %s", e)
            return JSONResponse(
                {"error": f"not added: the index could not be written ({e.strerror}); retry"},
                status_code=503,
            )
        return _json({"model": self.package.name, "ids": ids, "index_size": len(self.index)})

    def _add_durably(
        self, emb: np.ndarray, paths: list[str | None], labels: list[str | None]
    ) -> np.ndarray:
        """Log + add (durable and searchable), then compact a log grown past its limit."""
        ids = self.index.add_durable(emb, paths, labels)
        if self.index.log_size > self.config.index_log_max_bytes:
            start = time.perf_counter()
            version = self.index.save(self.config.index)  # atomic; then the log is emptied
            logger.info(
                "index saved as %s (%d vectors) in %.2f s; log emptied",
                version.name,
                len(self.index),
                time.perf_counter() - start,
            )
        return ids

    @app.get(
        "/info",
        summary="What is being served",
        responses={401: _ERRORS[401]},
        tags=["Service APIs"],
    )
    def info(self, request: Request) -> Response:
        """The model card's essentials, the execution provider the ONNX Runtime session really
        uses (not what `get_available_providers()` lists), the variant, the batching settings
        with what batching has really done so far, the limits, and the index's size and model.

        Example: `curl localhost:3000/info`"""
        try:
            check_api_key(request, self.config.api_key)
        except ClientError as e:
            return e.response()
        return _json(self.describe())

    def describe(self) -> dict[str, Any]:
        card = self.package.card
        cfg = self.config
        return {
            "version": __version__,
            "model": {
                "name": self.package.name,
                "path": str(self.package.path),
                "method": card["method"],
                "backbone": card["backbone"],
                "dataset": card["dataset"]["name"],
                "embedding_dim": card["embedding_dim"],
                "input": card["input"],
                "preprocess": card["preprocess"],
                "sha256": card["sha256"],
                "knn": card["metrics"]["knn"],
            },
            "variant": self.encoder.variant,
            # what the session really runs on, not what get_available_providers() lists
            "provider": self.provider,
            "providers": self.encoder.providers,
            "device": cfg.device,
            "batching": {
                "max_batch_size": cfg.max_batch_size,
                "max_latency_ms": cfg.max_latency_ms,
                "max_batch_wait_ms": cfg.max_batch_wait_ms,
                "observed": self.batcher.stats(),
            },
            "threads": {"intra_op": cfg.intra_op_threads, "decode": cfg.decoder_threads},
            "workers": cfg.workers,
            "limits": {
                "max_images_per_request": cfg.max_images_per_request,
                "max_request_bytes": cfg.max_request_bytes,
                "max_image_pixels": cfg.max_image_pixels,
                "max_k": cfg.max_k,
            },
            "traffic": {
                "max_concurrent_requests": cfg.max_concurrent_requests,
                "max_inflight_bytes": cfg.max_inflight_bytes,
                "request_timeout_s": cfg.request_timeout_s,
            },
            # whether a key is needed; the key itself is never shown
            "auth": "api key required" if cfg.api_key else "open",
            "index": None
            if self.index is None
            else {
                "path": str(cfg.index),
                "size": len(self.index),
                "model": self.index.manifest.get("model"),
                "factory": self.index.manifest.get("factory"),
                "writes": "on (api key required)" if self.writes_off is None else "off",
                "log_bytes": self.index.log_size,
            },
        }


def _exit_when_orphaned(period_s: float = 1.0) -> None:
    """Exit this worker when the `bentoml serve` process that started it dies (SIGKILL, OOM).

    Its workers run in their own sessions, so they outlive it: an orphan would keep serving
    from the inherited socket with nobody to restart it, and keep the index's writer lock, so
    that a restarted server could not add to the index."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(period_s)
            if os.getppid() != parent:
                logger.error("the server process %d is gone; this worker exits", parent)
                os._exit(70)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _json(body: dict[str, Any]) -> Response:
    # orjson writes a float32 array as the shortest decimal that reads back to the same float32
    # (exact, and 44% smaller than Python floats), 26x faster than json.dumps(array.tolist()):
    # at 8 images per request that was 11% of the event loop's time.
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
    )
