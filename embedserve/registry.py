"""The models one server serves (EMBEDSERVE_MODELS, or the one of EMBEDSERVE_MODEL), by name.

Each package gets its own verified ONNX Runtime session (its own variant choice), its own model
thread and its own adaptive batcher (embedserve.batching), so a busy model never queues another
model's images; its metrics carry its card's name as the `model` label. A request names its
model by that name (JSON `model`, a multipart field `model`); without one it gets the first
listed. An unknown name is a 404 that lists the served ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np

from embedserve import telemetry
from embedserve.batching import AdaptiveBatcher
from embedserve.config import ServeConfig
from embedserve.http.decode import decode_images
from embedserve.http.forms import Upload
from embedserve.http.jsonbody import served_model
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
from embedserve.thumbnails import preprocess_with_thumbnail

# The images of a warm-up pass through a batcher: enough for BentoML's dispatcher to fit its
# latency model (it forces batches of 1, 2 and 3 for its first ~22 calls) before /readyz is 200.
WARMUP_CALLS = 24


def load_packages(cfg: ServeConfig) -> list[ModelPackage]:
    """The packages to serve, the default first; two with the same card name are an error."""
    packages = [load_package(ref, cfg.models_dir or MODELS_DIR) for ref in cfg.model_refs]
    seen: dict[str, ModelPackage] = {}
    for package in packages:
        if package.name in seen:
            raise PackageError(
                f"{seen[package.name].path} and {package.path} have the same model name "
                f"{package.name!r} (card.json `name`): requests could not tell them apart"
            )
        seen[package.name] = package
    return packages


def variants_to_verify(package: ModelPackage, cfg: ServeConfig) -> set[str]:
    """The variants a worker may open with these settings (as Encoder chooses them)."""
    if cfg.variant != "auto":
        return {cfg.variant}
    chosen = set()
    if cfg.device == "cuda" or (cfg.device == "auto" and auto_tries_cuda()):
        chosen.add(package.choose_variant("cuda"))
    if cfg.device != "cuda":
        chosen.add(package.choose_variant("cpu"))
    return chosen


def check_packages(packages: Sequence[ModelPackage], cfg: ServeConfig) -> None:
    """What `bentoml serve` checks before it starts a worker: every file a worker may open has
    its card's sha256 (instead of each worker failing on it and being restarted forever), and
    device=cuda really starts CUDA (no silent fallback to the CPU)."""
    for package in packages:
        for variant in sorted(variants_to_verify(package, cfg)):
            package.verify_file(variant)
    if cfg.device == "cuda" and not cuda_session_starts(packages[0]):
        raise PackageError(
            "EMBEDSERVE_DEVICE=cuda, but the CUDA execution provider cannot start on this "
            "machine ("
            + (
                "the CUDA 13 / cuDNN 9 libraries did not load"
                if gpu_present()
                else "no GPU is present"
            )
            + "); use EMBEDSERVE_DEVICE=auto or cpu to run on the CPU"
        )


class ServedModel:
    """One package in a worker: its session, its model thread, its batcher, its metrics."""

    def __init__(self, package: ModelPackage, cfg: ServeConfig) -> None:
        self.package, self.config = package, cfg
        # device=cuda fails here with a clear error when CUDA cannot start: no silent fallback
        self.encoder = Encoder(
            package, variant=cfg.variant, device=cfg.device, intra_op_threads=cfg.intra_op_threads
        )
        self.provider = self.encoder.providers[0]
        inp = package.card["input"]
        self.input_shape = (inp["height"], inp["width"], inp["channels"])
        self._preprocess = package.preprocess
        # One thread runs the model: ONNX Runtime parallelises inside a call with its own pool.
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix=f"onnxruntime-{package.name}")
        self.batcher = AdaptiveBatcher(
            self.encoder.embed,
            cfg.max_batch_size,
            cfg.max_latency_ms,
            self.model_pool,
            max_wait_ms=cfg.max_batch_wait_ms,
        )
        # the operators' metrics on /metrics (made here, in the worker: see embedserve.telemetry)
        self.telemetry = telemetry.install(package.name, cfg.max_batch_size)
        self.created = int(time.time())

    @property
    def name(self) -> str:
        return self.package.name

    def warm_up(self) -> None:
        """The largest batch first (allocations), then a single image."""
        self.encoder.embed(np.zeros((self.config.max_batch_size, *self.input_shape), np.uint8))
        self.encoder.embed(np.zeros((1, *self.input_shape), np.uint8))

    async def train_batcher(self) -> None:
        """Fit the dispatcher's latency model with real model calls; then count metrics."""
        one = np.zeros((1, *self.input_shape), np.uint8)
        for _ in range(WARMUP_CALLS):
            await self.batcher(one)
        self.batcher.reset_stats()
        self.batcher.on_batch = self.telemetry.batch  # the metrics count from here on

    def load_one(self, data: bytes) -> np.ndarray:
        return preprocess(data, self._preprocess, max_pixels=self.config.max_image_pixels)

    async def embed(
        self, images: list[Upload], pool: Executor, field: str = "images"
    ) -> np.ndarray:
        """Decode (per request, on `pool`), then embed, batched with other requests' images."""
        start = time.perf_counter()
        x = await decode_images(images, self.load_one, pool, field)
        self.telemetry.decode.observe(time.perf_counter() - start)
        return await self.batcher(x)

    async def embed_with_thumbnails(
        self, images: list[Upload], pool: Executor, max_side: int
    ) -> tuple[np.ndarray, list[bytes | None]]:
        """`embed`, and a JPEG thumbnail of each image (embedserve.thumbnails) made from the
        same decoded image on `pool`; with `max_side` 0, no thumbnails (None each)."""
        if max_side <= 0:
            return await self.embed(images, pool), [None] * len(images)
        pre, max_pixels = self._preprocess, self.config.max_image_pixels
        start = time.perf_counter()
        decoded = await decode_images(
            images,
            lambda data: preprocess_with_thumbnail(data, pre, max_side, max_pixels),
            pool,
            stack=False,
        )
        self.telemetry.decode.observe(time.perf_counter() - start)
        emb = await self.batcher(np.stack([x for x, _ in decoded]))
        return emb, [thumbnail for _, thumbnail in decoded]

    def card_summary(self) -> dict[str, Any]:
        card = self.package.card
        return {
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
        }

    def describe(self) -> dict[str, Any]:
        """This model's part of /info: its card, its variant, its provider, its batching."""
        cfg = self.config
        return {
            "model": self.card_summary(),
            "variant": self.encoder.variant,
            # what the session really runs on, not what get_available_providers() lists
            "provider": self.provider,
            "providers": self.encoder.providers,
            "batching": {
                "max_batch_size": cfg.max_batch_size,
                "max_latency_ms": cfg.max_latency_ms,
                "max_batch_wait_ms": cfg.max_batch_wait_ms,
                "observed": self.batcher.stats(),
            },
        }

    def openai(self) -> dict[str, Any]:
        """This model as an entry of GET /v1/models (the OpenAI shape)."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "embedserve",
        }


class ServedModels:
    """The served models by name, in the configured order (the first is the default)."""

    def __init__(self, packages: Sequence[ModelPackage], cfg: ServeConfig) -> None:
        self._models = {p.name: ServedModel(p, cfg) for p in packages}
        self.names = list(self._models)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    @property
    def default(self) -> ServedModel:
        return self._models[self.names[0]]

    @property
    def dims(self) -> dict[str, int]:
        """name -> embedding size, the default first (what /v1/embeddings checks)."""
        return {m.name: m.package.embedding_dim for m in self}

    def get(self, asked: Any) -> ServedModel:
        """The model a request names (None: the default); 404 listing the served ones."""
        return self._models[served_model(asked, self.names)]

    def openai_list(self) -> dict[str, Any]:
        return {"object": "list", "data": [m.openai() for m in self]}
