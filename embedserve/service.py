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
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

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


class RequestSizeLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before it is read whole
    (by its Content-Length, or by counting the chunks of a chunked upload)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = JSONResponse(
            {"error": f"request body over the limit of {self.max_bytes} bytes (max_request_bytes)"},
            status_code=413,
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await JSONResponse({"error": "bad Content-Length"}, 400)(scope, receive, send)
                    return
                if declared > self.max_bytes:
                    await too_large(scope, receive, send)
                    return
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


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

    async def _embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings of a preprocessed batch, in chunks no larger than max_batch_size."""
        size = self.config.max_batch_size
        chunks = [batch[i : i + size] for i in range(0, len(batch), size)]
        outs = await asyncio.gather(*(self.batcher(c) for c in chunks))
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

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
            emb = await self._embed_arrays(batch)
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
            emb = await self._embed_arrays(batch)
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


EmbedService.add_asgi_middleware(RequestSizeLimit, max_bytes=CONFIG.max_request_bytes)
