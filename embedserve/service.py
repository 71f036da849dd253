"""The HTTP service: `bentoml serve embedserve.service:EmbedService` (what `make serve` runs).

    POST /embed       multipart, field `images` repeated -> one L2-normalized embedding per image
    POST /search      multipart `images` + `k`           -> top-k neighbours from the FAISS index
    GET  /info        the model, the execution provider really in use, batching, limits, index
    POST /index/add   multipart `images` + `metadata`    -> ids of the images added to the index
    POST /v1/embeddings  the OpenAI embeddings API (JSON, base64 images) -> one embedding each

/embed, /search and /index/add also take a JSON body with the same fields and the images
base64-encoded ({"images": ["data:image/jpeg;base64,..."], "k": 5}); URLs are never fetched.

Reading endpoints are open unless EMBEDSERVE_API_KEY is set (then they need
`Authorization: Bearer <key>`); /index/add always needs the key and is off without one.

A request is parsed and its images decoded (in a thread pool: Pillow releases the GIL) before
anything is batched, so a bad file fails only its own request, with a 4xx that names it. The
decoded images of concurrent requests then share model calls through adaptive batching
(embedserve.batching). Configuration: embedserve.config (EMBEDSERVE_* variables or a TOML file).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from fastapi import Request
from starlette.responses import Response

from embedserve import __version__, bentoml_fixes, telemetry
from embedserve.batching import AdaptiveBatcher
from embedserve.config import ServeConfig, load_config, unknown_variables
from embedserve.http.app import create_app
from embedserve.http.auth import check_api_key
from embedserve.http.decode import decode_images
from embedserve.http.errors import ClientError
from embedserve.http.forms import Upload, client_name, parse_k, parse_metadata, read_images
from embedserve.http.jsonbody import embeddings_response, read_embeddings_request
from embedserve.http.limits import body_hold
from embedserve.http.schemas import (
    ADD_ERROR_RESPONSES,
    EMBEDDINGS_ERROR_RESPONSES,
    ERROR_RESPONSES,
    K_FIELD,
    METADATA_FIELD,
    AddResponse,
    EmbeddingsResponse,
    EmbedResponse,
    SearchResponse,
    embeddings_body,
    json_response,
    multipart_body,
)
from embedserve.package import (
    MODELS_DIR,
    Encoder,
    ModelPackage,
    PackageError,
    auto_tries_cuda,
    cuda_session_starts,
    gpu_present,
    load_package,
)
from embedserve.preprocess import preprocess

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
    if cfg.device == "cuda" or (cfg.device == "auto" and auto_tries_cuda()):
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
        "EMBEDSERVE_DEVICE=cuda, but the CUDA execution provider cannot start on this machine ("
        + ("the CUDA 13 / cuDNN 9 libraries did not load" if gpu_present() else "no GPU is present")
        + "); use EMBEDSERVE_DEVICE=auto or cpu to run on the CPU"
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


# The endpoints are routes of this app (embedserve.http.app), defined as methods of the service.
app = create_app(CONFIG)


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
        # the operators' metrics on /metrics (made here, in the worker: see embedserve.telemetry)
        self.telemetry = telemetry.install(self.package.name, cfg.max_batch_size)
        if self.index is not None:
            self.telemetry.index_size.set(len(self.index))
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
        self.batcher.on_batch = self.telemetry.batch  # the metrics count from here on
        self._warmup_s += time.perf_counter() - start
        self._ready = True
        logger.info("warm-up done in %.1f s; ready", self._warmup_s)

    async def __is_ready__(self) -> bool:
        return self._ready

    # -- request handling -------------------------------------------------------------------
    # Errors are raised (ClientError, Overloaded) and answered by the app's error handler
    # (embedserve.http.errors): a 4xx, or a 503, with a JSON body that names the problem.

    def _load_one(self, data: bytes) -> np.ndarray:
        return preprocess(data, self.package.preprocess, max_pixels=self.config.max_image_pixels)

    async def _read(
        self, request: Request, fields: tuple[str, ...]
    ) -> tuple[list[Upload], dict[str, str]]:
        cfg = self.config
        return await read_images(request, fields, cfg.max_request_bytes, cfg.max_images_per_request)

    async def _embed(self, images: list[Upload], field: str = "images") -> np.ndarray:
        """Decode (per request), then embed, batched with other requests' images."""
        start = time.perf_counter()
        x = await decode_images(images, self._load_one, self._decode_pool, field)
        self.telemetry.decode.observe(time.perf_counter() - start)
        return await self.batcher(x)

    # -- endpoints ----------------------------------------------------------------------------

    @app.post(
        "/embed",
        summary="Embed images",
        response_model=EmbedResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=multipart_body(CONFIG.max_images_per_request),
        tags=["Service APIs"],
    )
    async def embed(self, request: Request) -> Response:
        """One L2-normalized float32 embedding per image, in request order. The same images
        give the same embeddings whether they are sent together or one per request.

        Example: `curl -F images=@cat.jpg -F images=@dog.png localhost:3000/embed`

        Errors name each bad file and its problem: 400 (empty, corrupt, truncated or non-image
        file; missing field), 413 (too many images, too many pixels, body too large), 415
        (unsupported image format), 503 (overloaded)."""
        check_api_key(request, self.config.api_key)
        images, _ = await self._read(request, ("images",))
        emb = await self._embed(images)
        return json_response(
            {"model": self.package.name, "dim": int(emb.shape[1]), "embeddings": emb}
        )

    @app.post(
        "/v1/embeddings",
        summary="Embed images (OpenAI embeddings API)",
        response_model=EmbeddingsResponse,
        responses=EMBEDDINGS_ERROR_RESPONSES,
        openapi_extra=embeddings_body(
            CONFIG.max_images_per_request, _PACKAGE.name, _PACKAGE.embedding_dim
        ),
        tags=["Service APIs"],
    )
    async def embeddings(self, request: Request) -> Response:
        """The OpenAI embeddings API, for its clients (`OpenAI(base_url=".../v1")`): `input` is
        one image or a list, each base64-encoded (bare or a data:image/...;base64, URI; URLs
        are never fetched), `model` the served model's name (or absent), `encoding_format`
        float or base64 (little-endian float32). The embeddings equal /embed's. `usage` counts
        0 tokens: images are not tokens.

        Example: `curl localhost:3000/v1/embeddings -H 'Content-Type: application/json'
        -d '{"input": ["'$(base64 -w0 cat.jpg)'"]}'`

        Errors are /embed's, naming each bad input (`input[2]`), and 404 for another model."""
        check_api_key(request, self.config.api_key)
        cfg, name = self.config, self.package.name
        images, encoding = await read_embeddings_request(
            request,
            name,
            self.package.embedding_dim,
            cfg.max_request_bytes,
            cfg.max_images_per_request,
            body_hold(request),
        )
        emb = await self._embed(images, field="input")
        return json_response(embeddings_response(emb, name, encoding))

    @app.post(
        "/search",
        summary="Find similar images",
        response_model=SearchResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=multipart_body(CONFIG.max_images_per_request, K_FIELD),
        tags=["Service APIs"],
    )
    async def search(self, request: Request) -> Response:
        """The k most similar indexed images for each query image (cosine similarity), with
        their ids, scores, paths and labels. `k` over the index size returns every image.

        Example: `curl -F images=@cat.jpg -F k=5 localhost:3000/search`

        Needs an index (`embedserve index build ...`, then EMBEDSERVE_INDEX=DIR); without one
        the answer is 409 with these instructions."""
        check_api_key(request, self.config.api_key)
        if self.index is None:
            raise ClientError(
                409,
                "no search index is configured: build one with `embedserve index build "
                "--images DIR --out INDEX_DIR` and start the server with "
                "EMBEDSERVE_INDEX=INDEX_DIR",
            )
        images, values = await self._read(request, ("images", "k"))
        k = parse_k(values.get("k", "10"), self.config.max_k)
        emb = await self._embed(images)
        hits = await asyncio.get_running_loop().run_in_executor(
            self._decode_pool, self.index.search, emb, k
        )
        results = [
            {"file": client_name(i, filename), "neighbours": h}
            for i, ((filename, _), h) in enumerate(zip(images, hits, strict=True))
        ]
        return json_response({"model": self.package.name, "k": k, "results": results})

    @app.post(
        "/index/add",
        summary="Add images to the index (API key required)",
        response_model=AddResponse,
        responses=ADD_ERROR_RESPONSES,
        openapi_extra=multipart_body(CONFIG.max_images_per_request, METADATA_FIELD),
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
        if cfg.api_key is None:
            raise ClientError(403, f"POST /index/add is off: {self.writes_off}")
        check_api_key(request, cfg.api_key, required=True)
        if self.writes_off is not None:
            raise ClientError(403, f"POST /index/add is off: {self.writes_off}")
        try:
            images, values = await self._read(request, ("images", "metadata"))
            paths, labels = parse_metadata(values.get("metadata"), images)
            emb = await self._embed(images)
            ids = await asyncio.get_running_loop().run_in_executor(
                self._index_pool, self._add_durably, emb, paths, labels
            )
        except OSError as e:  # the log could not be written: nothing was acknowledged
            logger.error("index log write failed: %s", e)
            raise ClientError(
                503,
                f"not added: the index could not be written ({e.strerror}); retry",
                reason="index_write_failed",
            ) from None
        self.telemetry.index_size.set(len(self.index))
        return json_response(
            {"model": self.package.name, "ids": ids, "index_size": len(self.index)}
        )

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
        responses={401: ERROR_RESPONSES[401]},
        tags=["Service APIs"],
    )
    def info(self, request: Request) -> Response:
        """The model card's essentials, the execution provider the ONNX Runtime session really
        uses (not what `get_available_providers()` lists), the variant, the batching settings
        with what batching has really done so far, the limits, and the index's size and model.

        Example: `curl localhost:3000/info`"""
        check_api_key(request, self.config.api_key)
        return json_response(self.describe())

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
