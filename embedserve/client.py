"""A Python client of the embedserve HTTP API: `Client` (blocking) and `AsyncClient` (asyncio).

    from embedserve.client import Client

    with Client("http://localhost:3000", api_key=None) as client:
        vectors = client.embed(["cat.jpg", "dog.png"])        # numpy float32 [2, D]
        hits = client.search("cat.jpg", k=5)[0]                # neighbours of the one query
        print(hits[0].id, hits[0].score, hits[0].path, hits[0].label)

An image is a file path (str or os.PathLike), the file's bytes (any format the server decodes),
a PIL image, or a numpy uint8 array H x W x 3 (RGB); a method takes one image or a sequence of
them (a uint8 array N x H x W x 3 is N images). PIL images and arrays are sent as PNG, which is
lossless: the server sees exactly those pixels.

The images go as a multipart form (one file part per image): their bytes travel as they are,
where JSON would need base64 (4/3 of the bytes, against the same max_request_bytes and
max_inflight_bytes budgets), and errors name each bad file by its position and file name.

A server of several models (EMBEDSERVE_MODELS) answers with the one a request names:
`Client(url, model="name")` names it in every request, `client.embed(images, model="name")` in
one; neither: the server's first model. `client.models()` lists the served ones.

A 503 (the server is busy: every 503 means nothing was done) is retried after its Retry-After,
at most `max_retries` times and `max_retry_wait` seconds of waiting in all; then, or for any
other error status, `APIError` is raised with the status, the server's message and the bad
files it named. A 4xx is never retried. Network errors and timeouts are httpx's exceptions.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import httpx
import numpy as np

try:
    from PIL import Image as _PIL
except ImportError:  # pragma: no cover (Pillow is a dependency of the server, not of httpx)
    _PIL = None

if TYPE_CHECKING:
    import PIL.Image

# One image: a path, encoded bytes, a PIL image, or a uint8 array H x W x 3.
ImageInput = Union[str, os.PathLike, bytes, np.ndarray, "PIL.Image.Image"]
# One image or several (a uint8 array N x H x W x 3 is N images).
Images = ImageInput | Sequence[ImageInput]


class APIError(Exception):
    """The server answered an error status (after any retries of a 503).

    `status` the HTTP status, `message` the server's explanation, `files` the bad images it
    named (`[{"file": "images[1] (scan.pdf)", "problem": "..."}]`, empty when none), and
    `retry_after` the seconds the server asked to wait (a 503), or None."""

    def __init__(
        self,
        status: int,
        message: str,
        files: list[dict[str, str]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message
        self.files = files or []
        self.retry_after = retry_after


@dataclass(frozen=True)
class Neighbour:
    """An indexed image found by `search`: its id in the index, cosine similarity, and the
    path and label stored with it (None when there were none)."""

    id: int
    score: float
    path: str | None
    label: str | None


@dataclass(frozen=True)
class Added:
    """What `add` did: the new images' ids, in order, and the index's size after it."""

    ids: list[int]
    index_size: int


def _is_one(images: Images) -> bool:
    if isinstance(images, np.ndarray):
        return images.ndim == 3
    return isinstance(images, (str, os.PathLike, bytes, bytearray)) or (
        _PIL is not None and isinstance(images, _PIL.Image)
    )


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _encode(image: ImageInput, position: int) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) of one image for the form."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes(), "application/octet-stream"
    if isinstance(image, (bytes, bytearray)):
        return f"image{position}", bytes(image), "application/octet-stream"
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image {position}: an array must be uint8 H x W x 3 (RGB), not "
                f"{image.dtype} {tuple(image.shape)}"
            )
        if _PIL is None:  # pragma: no cover
            raise ImportError("sending numpy arrays needs Pillow")
        return f"image{position}.png", _png(_PIL.fromarray(image)), "image/png"
    if _PIL is not None and isinstance(image, _PIL.Image):
        # modes PNG stores are sent as they are, for the server to convert as it would a file's
        same = image if image.mode in ("RGB", "RGBA", "L", "LA", "P") else image.convert("RGB")
        return f"image{position}.png", _png(same), "image/png"
    raise TypeError(
        f"image {position}: a path, bytes, a PIL image or a uint8 array, not {type(image).__name__}"
    )


def _files(images: Images) -> list[tuple[str, tuple[str, bytes, str]]]:
    items = [images] if _is_one(images) else list(images)
    if not items:
        raise ValueError("no images given")
    return [("images", _encode(image, i)) for i, image in enumerate(items)]


def _retry_after(response: httpx.Response) -> float | None:
    """The Retry-After of a response in seconds (a number or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def _error(response: httpx.Response) -> APIError:
    """The APIError of an error answer: embedserve's `{"error": "...", "files": [...]}`, the
    OpenAI shape `{"error": {"message": ...}}`, or whatever text came."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message, files = response.text or response.reason_phrase, None
    if isinstance(body, dict) and "error" in body:
        error = body["error"]
        if isinstance(error, dict):
            message, files = str(error.get("message")), error.get("files")
        else:
            message, files = str(error), body.get("files")
    return APIError(response.status_code, message, files, _retry_after(response))


class _Base:
    """What both clients share: settings, requests and the answers' parsing."""

    def __init__(
        self,
        base_url: str = "http://localhost:3000",
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        model: str | None = None,
    ) -> None:
        if max_retries < 0 or max_retry_wait < 0:
            raise ValueError("max_retries and max_retry_wait must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.max_retries, self.max_retry_wait = max_retries, max_retry_wait
        self.model = model  # the model every request names; None: the server's default
        self._options: dict[str, Any] = {
            "base_url": self.base_url,
            "timeout": timeout,
            "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {},
        }

    def _delay(self, response: httpx.Response, retries: int, waited: float) -> float | None:
        """How long to wait before sending again, or None to answer (or raise) now: only a 503
        is retried, while retries and waiting time are left."""
        if response.status_code != 503 or retries >= self.max_retries:
            return None
        delay = _retry_after(response)
        delay = 1.0 if delay is None else delay
        return delay if waited + delay <= self.max_retry_wait else None

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def _model(self, model: str | None) -> dict[str, str]:
        """The form field that names the model: this call's, else the client's, else none."""
        model = model or self.model
        return {"model": model} if model else {}

    def _embed_form(self, images: Images, model: str | None) -> dict[str, Any]:
        return {"files": _files(images), "data": self._model(model)}

    def _search_form(self, images: Images, k: int, model: str | None = None) -> dict[str, Any]:
        return {"files": _files(images), "data": {"k": str(k), **self._model(model)}}

    def _add_form(
        self,
        images: Images,
        paths: Sequence[str | None] | None,
        labels: Sequence[str | None] | None,
        model: str | None = None,
    ) -> dict[str, Any]:
        items = [images] if _is_one(images) else list(images)
        if paths is None:  # a file's path as given; none for bytes, PIL images and arrays
            paths = [str(i) if isinstance(i, (str, os.PathLike)) else None for i in items]
        labels = [None] * len(items) if labels is None else labels
        if len(paths) != len(items) or len(labels) != len(items):
            raise ValueError(f"give one path and one label per image ({len(items)})")
        metadata = [{"path": p, "label": lb} for p, lb in zip(paths, labels, strict=True)]
        data = {"metadata": json.dumps(metadata), **self._model(model)}
        return {"files": _files(items), "data": data}

    @staticmethod
    def _embeddings(body: dict[str, Any]) -> np.ndarray:
        return np.asarray(body["embeddings"], np.float32).reshape(-1, body["dim"])

    @staticmethod
    def _neighbours(body: dict[str, Any]) -> list[list[Neighbour]]:
        return [
            [Neighbour(int(n["id"]), float(n["score"]), n.get("path"), n.get("label")) for n in r]
            for r in (result["neighbours"] for result in body["results"])
        ]

    @staticmethod
    def _model_ids(body: dict[str, Any]) -> list[str]:
        return [m["id"] for m in body["data"]]

    @staticmethod
    def _added(body: dict[str, Any]) -> Added:
        return Added(ids=[int(i) for i in body["ids"]], index_size=int(body["index_size"]))


class Client(_Base):
    """A blocking client; use it as a context manager (or call `close`).

    Example:

        with Client("http://localhost:3000", api_key=KEY, timeout=30) as client:
            vectors = client.embed(["cat.jpg", open("dog.png", "rb").read()])  # float32 [2, D]
            for hit in client.search("cat.jpg", k=3)[0]:
                print(hit.score, hit.path, hit.label)
            added = client.add(["bird.jpg"], labels=["bird"])  # needs the API key
            print(added.ids, client.info()["index"]["size"])

    `api_key` is sent as `Authorization: Bearer <key>`; `timeout` (seconds, or an
    httpx.Timeout) bounds each attempt; a 503 is retried after its Retry-After at most
    `max_retries` times and `max_retry_wait` seconds in all; `model` names the served model
    of every request (a method's `model=` overrides it; neither: the server's first);
    `transport` is for tests."""

    def __init__(
        self,
        base_url: str = "http://localhost:3000",
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        model: str | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait=max_retry_wait,
            model=model,
        )
        self._http = httpx.Client(transport=transport, **self._options)
        self._sleep = time.sleep

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        retries, waited = 0, 0.0
        while True:
            response = self._http.request(method, path, **kwargs)
            delay = self._delay(response, retries, waited)
            if delay is None:
                return self._json(response)
            self._sleep(delay)
            retries, waited = retries + 1, waited + delay

    def embed(self, images: Images, model: str | None = None) -> np.ndarray:
        """L2-normalized float32 embeddings [N, D], one row per image in order (POST /embed).

        >>> client.embed("cat.jpg").shape  # doctest: +SKIP
        (1, 512)"""
        return self._embeddings(self._request("POST", "/embed", **self._embed_form(images, model)))

    def search(
        self, images: Images, k: int = 10, model: str | None = None
    ) -> list[list[Neighbour]]:
        """The `k` most similar indexed images of each query image, best first (POST /search).

        >>> client.search(["cat.jpg"], k=1)[0][0]  # doctest: +SKIP
        Neighbour(id=12, score=0.93, path='cats/tabby.jpg', label='cats')"""
        form = self._search_form(images, k, model)
        return self._neighbours(self._request("POST", "/search", **form))

    def add(
        self,
        images: Images,
        paths: Sequence[str | None] | None = None,
        labels: Sequence[str | None] | None = None,
        model: str | None = None,
    ) -> Added:
        """Add images to the served index (POST /index/add; needs the server's API key), with
        a path and a label each (default: a file's path as given, no label). They are
        durable and searchable when this returns.

        >>> client.add(["a.jpg", "b.jpg"], labels=["cat", "dog"]).ids  # doctest: +SKIP
        [24, 25]"""
        form = self._add_form(images, paths, labels, model)
        return self._added(self._request("POST", "/index/add", **form))

    def info(self) -> dict[str, Any]:
        """What the server serves (GET /info): model, provider, batching, limits, index."""
        return self._request("GET", "/info")

    def models(self) -> list[str]:
        """The names of the served models, the default first (GET /v1/models)."""
        return self._model_ids(self._request("GET", "/v1/models"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of `Client`, with the same options and methods, awaited.

    Example:

        async with AsyncClient("http://localhost:3000") as client:
            vectors, hits = await asyncio.gather(
                client.embed(["cat.jpg", "dog.png"]), client.search("cat.jpg", k=5)
            )"""

    def __init__(
        self,
        base_url: str = "http://localhost:3000",
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        model: str | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait=max_retry_wait,
            model=model,
        )
        self._http = httpx.AsyncClient(transport=transport, **self._options)
        self._sleep = asyncio.sleep

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        retries, waited = 0, 0.0
        while True:
            response = await self._http.request(method, path, **kwargs)
            delay = self._delay(response, retries, waited)
            if delay is None:
                return self._json(response)
            await self._sleep(delay)
            retries, waited = retries + 1, waited + delay

    async def embed(self, images: Images, model: str | None = None) -> np.ndarray:
        """As `Client.embed`: float32 [N, D]."""
        form = self._embed_form(images, model)
        return self._embeddings(await self._request("POST", "/embed", **form))

    async def search(
        self, images: Images, k: int = 10, model: str | None = None
    ) -> list[list[Neighbour]]:
        """As `Client.search`: the neighbours of each query image, best first."""
        form = self._search_form(images, k, model)
        return self._neighbours(await self._request("POST", "/search", **form))

    async def add(
        self,
        images: Images,
        paths: Sequence[str | None] | None = None,
        labels: Sequence[str | None] | None = None,
        model: str | None = None,
    ) -> Added:
        """As `Client.add` (needs the server's API key)."""
        form = self._add_form(images, paths, labels, model)
        return self._added(await self._request("POST", "/index/add", **form))

    async def info(self) -> dict[str, Any]:
        """As `Client.info`."""
        return await self._request("GET", "/info")

    async def models(self) -> list[str]:
        """As `Client.models`."""
        return self._model_ids(await self._request("GET", "/v1/models"))

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
