"""The HTTP service: `bentoml serve embedserve.service:EmbedService` (what `make serve` runs).

    POST /embed       multipart, field `images` repeated -> one L2-normalized embedding per image
    POST /search      `images` (or a stored `id`) + `k` + filters -> top-k neighbours
    GET  /info        the model, the execution provider really in use, batching, limits, index
    POST /index/add   multipart `images` + `metadata` (+ `replace`) -> ids of the images added
    POST /index/delete, DELETE /index/items/{id}   delete items by id or path
    GET  /index/items/{id}, .../thumbnail, /index/labels   an item, its JPEG, the labels
    POST /v1/embeddings  the OpenAI embeddings API (JSON, base64 images) -> one embedding each
    GET  /v1/models   the served models (the OpenAI shape)

One model (EMBEDSERVE_MODEL) or several (EMBEDSERVE_MODELS=a,b): a request names its model by
its card's name (JSON `model`, or a multipart field `model`); without one, the first listed.

/embed, /search and /index/add also take a JSON body with the same fields and the images
base64-encoded ({"images": ["data:image/jpeg;base64,..."], "k": 5}); URLs are never fetched.

Reading endpoints are open unless EMBEDSERVE_API_KEY is set (then they need
`Authorization: Bearer <key>`); changing the index (adding, deleting) always needs the key
and is off without one.

A request is parsed and its images decoded (in a thread pool: Pillow releases the GIL) before
anything is batched, so a bad file fails only its own request, with a 4xx that names it. The
decoded images of concurrent requests then share model calls through adaptive batching
(embedserve.batching). Configuration: embedserve.config (EMBEDSERVE_* variables or a TOML file).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import bentoml
from fastapi import Request
from starlette.responses import Response

from embedserve import __version__, bentoml_fixes, index_backend
from embedserve.config import ServeConfig, load_config, unknown_variables
from embedserve.http.app import create_app
from embedserve.http.auth import check_api_key
from embedserve.http.forms import Upload, read_images
from embedserve.http.index_api import IndexEndpoints
from embedserve.http.index_routes import install_index_routes
from embedserve.http.jsonbody import embeddings_response, read_embeddings
from embedserve.http.limits import body_hold
from embedserve.http.schemas import (
    EMBEDDINGS_ERROR_RESPONSES,
    ERROR_RESPONSES,
    MODEL_FIELD,
    EmbeddingsResponse,
    EmbedResponse,
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
if CONFIG.index:  # checked, not opened: only the worker that serves may open a Milvus Lite file
    index_backend.check_location(
        CONFIG.index, CONFIG.workers, CONFIG.milvus_collection, CONFIG.milvus_token
    )
# A model file modified or truncated on disk, or device=cuda without CUDA, stops the server
# here with the reason, instead of each worker failing on it and being restarted forever.
check_packages(_PACKAGES, CONFIG)


# The endpoints are routes of this app (embedserve.http.app): the model's, defined as methods of
# the service; the index's, by embedserve.http.index_routes (answered by each worker's
# IndexEndpoints, embedserve.http.index_api).
app = create_app(CONFIG)
install_index_routes(app, CONFIG.max_images_per_request)


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="embedserve",
    workers=CONFIG.workers,
    # A request whose answer has not started after this long gets a 504 (slow clients).
    traffic={"timeout": CONFIG.request_timeout_s},
    logging={"access": {"enabled": CONFIG.access_log}},
    # The OpenAPI page's title and description (the page at /docs, the spec at /docs.json).
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
        self._decode_pool = ThreadPoolExecutor(cfg.decoder_threads, thread_name_prefix="decode")
        # the index's endpoints (search, add, delete, items, thumbnails, labels)
        self.index_api = IndexEndpoints.open(cfg, self.models, self._decode_pool)
        app.state.index_endpoints = self.index_api
        # Warm-up before ready: the largest batch first (allocations), then single images.
        start = time.perf_counter()
        for m in self.models:
            m.warm_up()
        self._ready = False
        self._warmup_s = time.perf_counter() - start

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
            "index": self.index_api.describe(),
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
