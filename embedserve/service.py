"""The HTTP service: `bentoml serve embedserve.service:EmbedService` (what `make serve` runs).

    POST /embed       multipart, field `images` repeated -> one L2-normalized embedding per image
    POST /search      multipart `images` + `k`           -> top-k neighbours from the FAISS index
    GET  /info        the model, the execution provider really in use, batching, limits, index
    POST /index/add   multipart `images` + `metadata`    -> ids of the images added to the index
    POST /v1/embeddings  the OpenAI embeddings API (JSON, base64 images) -> one embedding each
    GET  /v1/models   the served models (the OpenAI shape)

One model (EMBEDSERVE_MODEL) or several (EMBEDSERVE_MODELS=a,b): a request names its model by
its card's name (JSON `model`, or a multipart field `model`); without one, the first listed.

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

from embedserve import __version__, bentoml_fixes
from embedserve.config import ServeConfig, load_config, unknown_variables
from embedserve.http.app import create_app
from embedserve.http.auth import check_api_key
from embedserve.http.errors import ClientError
from embedserve.http.forms import Upload, client_name, parse_k, parse_metadata, read_images
from embedserve.http.jsonbody import embeddings_response, read_embeddings
from embedserve.http.limits import body_hold
from embedserve.http.schemas import (
    ADD_ERROR_RESPONSES,
    EMBEDDINGS_ERROR_RESPONSES,
    ERROR_RESPONSES,
    K_FIELD,
    METADATA_FIELD,
    MODEL_FIELD,
    AddResponse,
    EmbeddingsResponse,
    EmbedResponse,
    SearchResponse,
    embeddings_body,
    json_response,
    multipart_body,
)
from embedserve.registry import (
    ServedModel,
    ServedModels,
    check_packages,
    load_packages,
    variants_to_verify,  # noqa: F401 (imported from here before embedserve.registry held it)
)

# a child of "bentoml", whose handlers BentoML configures in every worker
logger = logging.getLogger("bentoml.embedserve")
bentoml_fixes.apply()  # BentoML's request timeout keeps a timer per request for its whole length

# Read once, when BentoML imports the service: the decorator needs the worker count. Reading
# the environment (and the optional TOML file) is all that happens at import time.
CONFIG: ServeConfig = load_config()
# A missing model or a bad card stops `bentoml serve` here, at once (reading a card is cheap).
_PACKAGES = load_packages(CONFIG)
_PACKAGE = _PACKAGES[0]  # the default model
if CONFIG.index and not Path(CONFIG.index).is_dir():
    raise FileNotFoundError(
        f"EMBEDSERVE_INDEX={CONFIG.index}: no such index directory (build one with "
        "`embedserve index build --images DIR --out INDEX_DIR`)"
    )
# A model file modified or truncated on disk, or device=cuda without CUDA, stops the server
# here with the reason, instead of each worker failing on it and being restarted forever.
check_packages(_PACKAGES, CONFIG)


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
        self.models = ServedModels(load_packages(cfg), cfg)
        for m in self.models:
            logger.info(
                "model %s (%s variant) on %s, device=%s, %d intra-op threads, %d decode threads",
                m.name,
                m.encoder.variant,
                m.provider,
                cfg.device,
                cfg.intra_op_threads,
                cfg.decoder_threads,
            )
        first = self.models.default  # /info's top level and the index's model when it has none
        self.package, self.encoder, self.provider = first.package, first.encoder, first.provider
        self.batcher, self.telemetry = first.batcher, first.telemetry
        self.index, self.index_model = None, None
        if cfg.index:
            self._load_index(cfg.index)
        self.writes_off = index_writes_off_reason(cfg)
        if self.writes_off is None:
            self.index.open_log(cfg.index)  # this worker is the index's one writer
            logger.info("POST /index/add is on (API key required)")
        elif cfg.api_key and cfg.index:
            logger.warning("POST /index/add is off: %s", self.writes_off)
        self._decode_pool = ThreadPoolExecutor(cfg.decoder_threads, thread_name_prefix="decode")
        # One thread writes the index: log appends (fsync) and saves, in request order.
        self._index_pool = ThreadPoolExecutor(1, thread_name_prefix="index-writer")
        # Warm-up before ready: the largest batch first (allocations), then single images.
        start = time.perf_counter()
        for m in self.models:
            m.warm_up()
        self._ready = False
        self._warmup_s = time.perf_counter() - start

    def _load_index(self, path: str) -> None:
        """Load the index, bound to the served model it was built with (an error when none)."""
        from embedserve.index import SearchIndex  # faiss is imported only when it is used

        index = SearchIndex.load(path)
        built_with = index.manifest["model"]["name"]
        model = built_with if built_with in self.models.names else self.models.names[0]
        index.check_model(self.models.get(model).package, where=str(path))  # refuses a stranger
        self.index, self.index_model = index, model
        self.models.get(model).telemetry.index_size.set(len(index))
        logger.info(
            "index %s of model %s: %d vectors (%d from its write-ahead log)",
            path,
            model,
            len(index),
            index.replayed,
        )

    @bentoml.on_startup
    async def _train_batcher(self) -> None:
        """Fit the dispatcher's latency model with real model calls, then declare readiness."""
        start = time.perf_counter()
        for m in self.models:
            await m.train_batcher()
        self._warmup_s += time.perf_counter() - start
        self._ready = True
        logger.info("warm-up done in %.1f s; ready", self._warmup_s)

    async def __is_ready__(self) -> bool:
        return self._ready

    # -- request handling -------------------------------------------------------------------
    # Errors are raised (ClientError, Overloaded) and answered by the app's error handler
    # (embedserve.http.errors): a 4xx, or a 503, with a JSON body that names the problem.

    async def _read(
        self, request: Request, fields: tuple[str, ...]
    ) -> tuple[list[Upload], dict[str, Any], ServedModel]:
        """The images and fields of a form or JSON body, and the model it names (`model`)."""
        cfg = self.config
        images, values = await read_images(
            request, (*fields, "model"), cfg.max_request_bytes, cfg.max_images_per_request
        )
        return images, values, self.models.get(values.get("model"))

    def _indexed_model(self, model: ServedModel) -> None:
        """409 unless `model` is the index's: its vectors are comparable with no other's."""
        if model.name != self.index_model:
            raise ClientError(
                409,
                f"the index holds embeddings of model {self.index_model!r}, not comparable with "
                f"{model.name!r}'s: send model={self.index_model!r} (or serve an index built "
                f"with {model.name!r})",
                reason="index_model",
            )

    # -- endpoints ----------------------------------------------------------------------------

    @app.post(
        "/embed",
        summary="Embed images",
        response_model=EmbedResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=multipart_body(CONFIG.max_images_per_request, MODEL_FIELD),
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
        images, _, model = await self._read(request, ("images",))
        emb = await model.embed(images, self._decode_pool)
        return json_response({"model": model.name, "dim": int(emb.shape[1]), "embeddings": emb})

    @app.post(
        "/v1/embeddings",
        summary="Embed images (OpenAI embeddings API)",
        response_model=EmbeddingsResponse,
        responses=EMBEDDINGS_ERROR_RESPONSES,
        openapi_extra=embeddings_body(
            CONFIG.max_images_per_request,
            [p.name for p in _PACKAGES],
            [p.embedding_dim for p in _PACKAGES],
        ),
        tags=["Service APIs"],
    )
    async def embeddings(self, request: Request) -> Response:
        """The OpenAI embeddings API, for its clients (`OpenAI(base_url=".../v1")`): `input` is
        one image or a list, each base64-encoded (bare or a data:image/...;base64, URI; URLs
        are never fetched), `model` a served model's name (or absent: the first), `encoding_format`
        float or base64 (little-endian float32). The embeddings equal /embed's. `usage` counts
        0 tokens: images are not tokens.

        Example: `curl localhost:3000/v1/embeddings -H 'Content-Type: application/json'
        -d '{"input": ["'$(base64 -w0 cat.jpg)'"]}'`

        Errors are /embed's, naming each bad input (`input[2]`), and 404 for another model."""
        check_api_key(request, self.config.api_key)
        cfg = self.config
        images, encoding, name = await read_embeddings(
            request,
            self.models.dims,
            cfg.max_request_bytes,
            cfg.max_images_per_request,
            body_hold(request),
        )
        emb = await self.models.get(name).embed(images, self._decode_pool, field="input")
        return json_response(embeddings_response(emb, name, encoding))

    @app.get(
        "/v1/models",
        summary="The served models (OpenAI models API)",
        responses={401: ERROR_RESPONSES[401]},
        tags=["Service APIs"],
    )
    def list_models(self, request: Request) -> Response:
        """The served models in the OpenAI shape, the default first: `{"object": "list",
        "data": [{"id": name, "object": "model", "created": ..., "owned_by": "embedserve"}]}`.

        Example: `curl localhost:3000/v1/models`"""
        check_api_key(request, self.config.api_key)
        return json_response(self.models.openai_list())

    @app.post(
        "/search",
        summary="Find similar images",
        response_model=SearchResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=multipart_body(CONFIG.max_images_per_request, K_FIELD | MODEL_FIELD),
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
        images, values, model = await self._read(request, ("images", "k"))
        self._indexed_model(model)
        k = parse_k(values.get("k", "10"), self.config.max_k)
        emb = await model.embed(images, self._decode_pool)
        hits = await asyncio.get_running_loop().run_in_executor(
            self._decode_pool, self.index.search, emb, k
        )
        results = [
            {"file": client_name(i, filename), "neighbours": h}
            for i, ((filename, _), h) in enumerate(zip(images, hits, strict=True))
        ]
        return json_response({"model": model.name, "k": k, "results": results})

    @app.post(
        "/index/add",
        summary="Add images to the index (API key required)",
        response_model=AddResponse,
        responses=ADD_ERROR_RESPONSES,
        openapi_extra=multipart_body(CONFIG.max_images_per_request, METADATA_FIELD | MODEL_FIELD),
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
            images, values, model = await self._read(request, ("images", "metadata"))
            self._indexed_model(model)
            paths, labels = parse_metadata(values.get("metadata"), images)
            emb = await model.embed(images, self._decode_pool)
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
        model.telemetry.index_size.set(len(self.index))
        return json_response({"model": model.name, "ids": ids, "index_size": len(self.index)})

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
        """/info: the first model's details at the top level, and every model's in `models`."""
        cfg = self.config
        first = self.models.default.describe()
        return {
            "version": __version__,
            "model": first["model"],
            "variant": first["variant"],
            "provider": first["provider"],
            "providers": first["providers"],
            "device": cfg.device,
            "batching": first["batching"],
            "models": {m.name: m.describe() for m in self.models},
            "default_model": self.models.names[0],
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
                "served_model": self.index_model,
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
