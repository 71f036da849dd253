"""The HTTP service: `bentoml serve embedserve.service:EmbedService` (what `make serve` runs).

    POST /embed   multipart, field `images` repeated -> one L2-normalized embedding per image
    POST /search  multipart `images` + `k`           -> top-k neighbours from the FAISS index
    GET  /info    the model, the execution provider really in use, batching, limits, index

A request is parsed and its images decoded (in a thread pool: Pillow releases the GIL) before
anything is batched, so a bad file fails only its own request, with a 4xx that names it. The
decoded images of concurrent requests then share model calls through adaptive batching
(embedserve.batching). Configuration: embedserve.config (EMBEDSERVE_* variables or a TOML file).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedserve import __version__
from embedserve.batching import AdaptiveBatcher, Overloaded
from embedserve.config import ServeConfig, load_config, unknown_variables
from embedserve.package import (
    MODELS_DIR,
    Encoder,
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
if CONFIG.device == "cuda" and not cuda_session_starts(_PACKAGE):
    # Checked here, in the `bentoml serve` process itself, so that the server exits with this
    # error instead of restarting a failing worker forever. No silent fallback to the CPU.
    raise PackageError(
        "EMBEDSERVE_DEVICE=cuda, but the CUDA execution provider cannot start on this machine "
        "(no GPU, or the CUDA 13 / cuDNN 9 libraries are missing); use EMBEDSERVE_DEVICE=auto "
        "or cpu to run on the CPU"
    )

# The images of a warm-up pass through the batcher: enough for BentoML's dispatcher to fit its
# latency model (it forces batches of 1, 2 and 3 for its first ~22 calls) before /readyz is 200.
WARMUP_CALLS = 24


class EmbedResponse(BaseModel):
    """The answer of /embed."""

    model: str = Field(
        description="the model package's name", examples=["simsiam-resnet18-imagenette"]
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


class ClientError(Exception):
    """A client's fault: answered with `status` and a JSON body that names the problem."""

    def __init__(self, status: int, error: str, files: list[dict[str, Any]] | None = None):
        super().__init__(error)
        self.status, self.error, self.files = status, error, files

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.error}
        if self.files:
            body["files"] = self.files
        return JSONResponse(body, status_code=self.status)


def _status_for(error: ImageDecodeError) -> int:
    if isinstance(error, ImageTooLarge):
        return 413
    if isinstance(error, UnsupportedImageFormat):
        return 415
    return 400


def _client_name(path: Path, position: int) -> str:
    """`images[i] (photo.jpg)`: BentoML stores an upload as tmpXXXXXXXX<client file name>."""
    original = path.name[11:] if path.name.startswith("tmp") else ""
    return f"images[{position}] ({original})" if original else f"images[{position}]"


class RequestGuard:
    """ASGI middleware that answers a client's malformed request with a 4xx before BentoML
    parses it (BentoML answers some of these with a 500).

    For POST to the image endpoints: a body over `max_bytes` gets 413 (by its Content-Length,
    or by counting a chunked upload); then the body must be multipart/form-data (415), parse
    as multipart (400), carry its images as files in the field `images` (400: missing, sent as
    text, or a misspelt field) and no other field than `fields`. BentoML then parses the same
    bytes again: parsing a multipart body costs tens of microseconds, a 500 costs a client.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, routes: dict[str, tuple[str, ...]]) -> None:
        self.app, self.max_bytes, self.routes = app, max_bytes, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fields = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if fields is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, receive, send, *self._too_large(declared))
            return
        chunks, size = [], 0
        while True:  # read the body, bounded: at most max_bytes are ever held
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send, *self._too_large(None))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = await self._check_form(headers, body, fields)
        if problem is not None:
            await self._reject(scope, receive, send, *problem)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self, declared: str | None) -> tuple[int, str]:
        if declared is not None and not declared.isdigit():
            return 400, f"bad Content-Length header {declared!r}"
        return 413, f"request body over the limit of {self.max_bytes} bytes (max_request_bytes)"

    @staticmethod
    async def _check_form(
        headers: Headers, body: bytes, fields: tuple[str, ...]
    ) -> tuple[int, str] | None:
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "multipart/form-data":
            return 415, (
                f"Content-Type {media_type or 'missing'}: send multipart/form-data with the "
                "images as files in the field 'images' (curl -F images=@photo.jpg)"
            )

        async def stream():
            yield body

        try:
            form = await MultiPartParser(headers, stream(), max_part_size=len(body) + 1).parse()
        except (MultiPartException, ValueError) as e:
            return 400, f"malformed multipart body: {e}"
        try:
            unknown = sorted(set(form.keys()) - set(fields))
            if unknown:
                return 400, (
                    f"unknown field(s) {', '.join(map(repr, unknown))}; this endpoint takes "
                    + ", ".join(map(repr, fields))
                )
            images = form.getlist("images")
            if not images:
                return 400, "missing field 'images': send one or more image files in it"
            texts = [i for i, v in enumerate(images) if not isinstance(v, UploadFile)]
            if texts:
                return 400, (
                    f"images[{texts[0]}] is a text value, not a file: upload the image "
                    "itself (curl -F images=@photo.jpg); URLs are not fetched"
                )
            for name in fields:
                if name != "images" and len(form.getlist(name)) > 1:
                    return 400, f"field {name!r} given {len(form.getlist(name))} times"
                if name != "images" and isinstance(form.get(name), UploadFile):
                    return 400, f"field {name!r} must be a value, not a file"
        finally:
            await form.close()
        return None

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, status: int, error: str):
        await JSONResponse({"error": error}, status_code=status)(scope, receive, send)


# GET routes: BentoML's own APIs are POST only; a FastAPI app mounted on the service adds
# GET /info, and BentoML merges its routes into the OpenAPI page.
info_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(
    name="embedserve",
    workers=CONFIG.workers,
    traffic={"timeout": 120},
    # The OpenAPI page's title and description (served at / and /docs.json).
    description=__doc__,
)
class EmbedService:
    """Image embeddings and similarity search with a self-supervised encoder on ONNX Runtime."""

    def __init__(self) -> None:
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
            logger.info("index %s: %d vectors", cfg.index, len(self.index))
        inp = self.package.card["input"]
        self._input_shape = (inp["height"], inp["width"], inp["channels"])
        self._decode_pool = ThreadPoolExecutor(cfg.decoder_threads, thread_name_prefix="decode")
        # One thread runs the model: ONNX Runtime parallelises inside a call with its own pool.
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")
        self.batcher = AdaptiveBatcher(
            self.encoder.embed, cfg.max_batch_size, cfg.max_latency_ms, self._model_pool
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

    def _check_count(self, images: list[Path]) -> None:
        if not images:
            raise ClientError(
                400, "no images: send one or more files in the multipart field 'images'"
            )
        limit = self.config.max_images_per_request
        if len(images) > limit:
            raise ClientError(
                413,
                f"{len(images)} images in one request, over the limit of {limit} (max_images_per_request)",
            )

    def _load_one(self, path: Path) -> np.ndarray:
        return preprocess(path, self.package.preprocess, max_pixels=self.config.max_image_pixels)

    async def _decode_all(self, images: list[Path]) -> np.ndarray:
        """Decode and preprocess every file in parallel; every bad file is named in one 4xx."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self._decode_pool, self._load_one, p) for p in images),
            return_exceptions=True,
        )
        problems = []
        for position, (path, result) in enumerate(zip(images, results, strict=True)):
            if isinstance(result, ImageDecodeError):
                problems.append((_status_for(result), _client_name(path, position), str(result)))
            elif isinstance(result, BaseException):
                raise result
        if problems:
            status = max(s for s, _, _ in problems)  # 415 > 413 > 400: the most specific
            files = [{"file": name, "problem": why} for _, name, why in problems]
            summary = "; ".join(f"{f['file']}: {f['problem']}" for f in files)
            raise ClientError(status, summary, files)
        return np.stack(results)

    async def _handle(self, images: list[Path], work) -> Response:
        try:
            self._check_count(images)
            batch = await self._decode_all(images)
            return await work(batch)
        except ClientError as e:
            return e.response()
        except Overloaded as e:
            return JSONResponse({"error": str(e) + "; retry later"}, status_code=503)

    # -- endpoints ----------------------------------------------------------------------------

    @bentoml.api(route="/embed")
    async def embed(
        self,
        images: Annotated[
            list[Path],
            Field(
                description="image files (JPEG, PNG, WebP, GIF, BMP, TIFF): repeat the multipart "
                "field `images` once per image. Example: "
                "`curl -F images=@cat.jpg -F images=@dog.png localhost:3000/embed`"
            ),
        ],
    ) -> EmbedResponse:
        """Embed images: one L2-normalized float32 vector per image, in request order.

        The same images give the same embeddings whether they are sent together or one per
        request. Errors: 400 (empty, corrupt, truncated or non-image file; missing field),
        413 (too many images, too many pixels, request too large), 415 (unsupported image
        format), 503 (overloaded); the JSON body names each bad file and its problem."""

        async def work(batch: np.ndarray) -> Response:
            emb = await self.batcher(batch)  # split into batches of max_batch_size
            return _json(
                {"model": self.package.name, "dim": int(emb.shape[1]), "embeddings": emb.tolist()}
            )

        return await self._handle(images, work)

    @bentoml.api(route="/search")
    async def search(
        self,
        images: Annotated[
            list[Path],
            Field(
                description="query images, the multipart field `images` repeated. Example: "
                "`curl -F images=@cat.jpg -F k=5 localhost:3000/search`"
            ),
        ],
        k: Annotated[
            int, Field(description="neighbours per query image (1..max_k)", examples=[5])
        ] = 10,
    ) -> SearchResponse:
        """Find the k most similar indexed images for each query image (cosine similarity).

        Needs an index (`embedserve index build ...`, then EMBEDSERVE_INDEX=DIR); without one
        the answer is 409 with instructions. `k` over the index size returns every image."""
        if self.index is None:
            return JSONResponse(
                {
                    "error": "no search index is configured: build one with `embedserve index "
                    "build --images DIR --out INDEX_DIR` and start the server with "
                    "EMBEDSERVE_INDEX=INDEX_DIR"
                },
                status_code=409,
            )
        if not 1 <= k <= self.config.max_k:
            return JSONResponse(
                {"error": f"k must be between 1 and {self.config.max_k} (max_k), not {k}"},
                status_code=400,
            )

        async def work(batch: np.ndarray) -> Response:
            emb = await self.batcher(batch)  # split into batches of max_batch_size
            loop = asyncio.get_running_loop()
            hits = await loop.run_in_executor(self._decode_pool, self.index.search, emb, k)
            results = [
                {"file": _client_name(p, i), "neighbours": h}
                for i, (p, h) in enumerate(zip(images, hits, strict=True))
            ]
            return _json({"model": self.package.name, "k": k, "results": results})

        return await self._handle(images, work)

    @info_app.get("/info", summary="What is being served", tags=["Service APIs"])
    def info(self) -> dict[str, Any]:
        """The model card's essentials, the execution provider the ONNX Runtime session really
        uses (not what `get_available_providers()` lists), the variant, the batching settings
        with what batching has really done so far, the limits, and the index's size and model.

        Example: `curl localhost:3000/info`"""
        return self.describe()

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
            "index": None
            if self.index is None
            else {
                "path": str(cfg.index),
                "size": len(self.index),
                "model": self.index.manifest.get("model"),
                "factory": self.index.manifest.get("factory"),
            },
        }


def _json(body: dict[str, Any]) -> Response:
    # json.dumps of Python floats: float32 values round-trip exactly (shortest repr of a double)
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


EmbedService.add_asgi_middleware(
    RequestGuard,
    max_bytes=CONFIG.max_request_bytes,
    routes={"/embed": ("images",), "/search": ("images", "k")},
)
