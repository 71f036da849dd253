"""A Python client of the embedserve HTTP API: `Client` (blocking) and `AsyncClient` (asyncio).

    from embedserve.client import Client

    with Client("http://localhost:3000", api_key=None) as client:
        vectors = client.embed(["cat.jpg", "dog.png"])        # numpy float32 [2, D]
        hits = client.search("cat.jpg", k=5)[0]                # neighbours of the one query
        print(hits[0].id, hits[0].score, hits[0].path, hits[0].label)
        cats = client.search("cat.jpg", labels=["cat"], min_score=0.5)[0]  # filtered
        more = client.search_by_id(hits[0].id, k=5)            # more like a stored item
        jpeg = client.thumbnail(hits[0].id)                     # its thumbnail (JPEG bytes)
        client.add(["new/cat.jpg"], replace=True)              # the API key: changes
        client.delete(ids=[3], paths=["old/cat.jpg"])

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
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from embedserve.client_base import (
    Added,
    APIError,
    Deleted,
    Images,
    Item,
    Neighbour,
    _Base,
    _item_id,
)

__all__ = ["Added", "APIError", "AsyncClient", "Client", "Deleted", "Images", "Item", "Neighbour"]


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

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retries, waited = 0, 0.0
        while True:
            response = self._http.request(method, path, **kwargs)
            delay = self._delay(response, retries, waited)
            if delay is None:
                return response
            self._sleep(delay)
            retries, waited = retries + 1, waited + delay

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._json(self._send(method, path, **kwargs))

    def embed(self, images: Images, model: str | None = None) -> np.ndarray:
        """L2-normalized float32 embeddings [N, D], one row per image in order (POST /embed).

        >>> client.embed("cat.jpg").shape  # doctest: +SKIP
        (1, 512)"""
        return self._embeddings(self._request("POST", "/embed", **self._embed_form(images, model)))

    def search(
        self,
        images: Images,
        k: int = 10,
        model: str | None = None,
        *,
        labels: str | Sequence[str] | None = None,
        path_prefix: str | None = None,
        min_score: float | None = None,
    ) -> list[list[Neighbour]]:
        """The `k` most similar indexed images of each query image, best first (POST /search);
        only items with one of `labels`, a path starting with `path_prefix`, a score of at
        least `min_score`, when given.

        >>> client.search(["cat.jpg"], k=1, labels=["cats"])[0][0]  # doctest: +SKIP
        Neighbour(id=12, score=0.93, path='cats/tabby.jpg', label='cats')"""
        form = self._search_form(images, k, model, labels, path_prefix, min_score)
        return self._neighbours(self._request("POST", "/search", **form))

    def search_by_id(
        self,
        item_id: int,
        k: int = 10,
        model: str | None = None,
        *,
        labels: str | Sequence[str] | None = None,
        path_prefix: str | None = None,
        min_score: float | None = None,
    ) -> list[Neighbour]:
        """More like the stored item `item_id`: its `k` nearest items, itself left out, with
        the filters of `search` (POST /search with `id`). APIError 404 when no live item has
        this id.

        >>> client.search_by_id(12, k=1)  # doctest: +SKIP
        [Neighbour(id=40, score=0.88, path='cats/tom.jpg', label='cats')]"""
        form = self._by_id_form(item_id, k, model, labels, path_prefix, min_score)
        return self._neighbours(self._request("POST", "/search", **form))[0]

    def add(
        self,
        images: Images,
        paths: Sequence[str | None] | None = None,
        labels: Sequence[str | None] | None = None,
        model: str | None = None,
        *,
        replace: bool = False,
    ) -> Added:
        """Add images to the served index (POST /index/add; needs the server's API key), with
        a path and a label each (default: a file's path as given, no label). They are
        durable and searchable when this returns, each with a thumbnail. With `replace`, the
        items already stored under these paths are deleted in the same step (`replaced`).

        >>> client.add(["a.jpg", "b.jpg"], labels=["cat", "dog"]).ids  # doctest: +SKIP
        [24, 25]"""
        form = self._add_form(images, paths, labels, model, replace)
        return self._added(self._request("POST", "/index/add", **form))

    def delete(
        self,
        ids: int | Sequence[int] | None = None,
        paths: str | Sequence[str] | None = None,
    ) -> Deleted:
        """Delete items by id and by stored path (every item stored under it) (POST
        /index/delete; needs the server's API key). Durable when this returns; ids and paths
        that named no live item come back in `missing_ids` and `missing_paths`.

        >>> client.delete(ids=[3], paths=["old/cat.jpg"]).deleted  # doctest: +SKIP
        [3, 17]"""
        body = self._delete_body(ids, paths)
        return self._deleted(self._request("POST", "/index/delete", **body))

    def item(self, item_id: int) -> Item:
        """A stored item's path and label (GET /index/items/{id}); APIError 404 if none."""
        return self._item(self._request("GET", f"/index/items/{_item_id(item_id)}"))

    def thumbnail(self, item_id: int) -> bytes:
        """A stored item's JPEG thumbnail (GET /index/items/{id}/thumbnail); APIError 404 when
        the item is unknown or deleted, or has none.

        >>> Image.open(io.BytesIO(client.thumbnail(12))).size  # doctest: +SKIP
        (128, 96)"""
        return self._bytes(self._send("GET", f"/index/items/{_item_id(item_id)}/thumbnail"))

    def labels(self) -> dict[str, int]:
        """The labels in the index and their item counts (GET /index/labels)."""
        return self._request("GET", "/index/labels")["labels"]

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

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retries, waited = 0, 0.0
        while True:
            response = await self._http.request(method, path, **kwargs)
            delay = self._delay(response, retries, waited)
            if delay is None:
                return response
            await self._sleep(delay)
            retries, waited = retries + 1, waited + delay

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._json(await self._send(method, path, **kwargs))

    async def embed(self, images: Images, model: str | None = None) -> np.ndarray:
        """As `Client.embed`: float32 [N, D]."""
        form = self._embed_form(images, model)
        return self._embeddings(await self._request("POST", "/embed", **form))

    async def search(
        self,
        images: Images,
        k: int = 10,
        model: str | None = None,
        *,
        labels: str | Sequence[str] | None = None,
        path_prefix: str | None = None,
        min_score: float | None = None,
    ) -> list[list[Neighbour]]:
        """As `Client.search`: the neighbours of each query image, best first."""
        form = self._search_form(images, k, model, labels, path_prefix, min_score)
        return self._neighbours(await self._request("POST", "/search", **form))

    async def search_by_id(
        self,
        item_id: int,
        k: int = 10,
        model: str | None = None,
        *,
        labels: str | Sequence[str] | None = None,
        path_prefix: str | None = None,
        min_score: float | None = None,
    ) -> list[Neighbour]:
        """As `Client.search_by_id`: more like a stored item."""
        form = self._by_id_form(item_id, k, model, labels, path_prefix, min_score)
        return self._neighbours(await self._request("POST", "/search", **form))[0]

    async def add(
        self,
        images: Images,
        paths: Sequence[str | None] | None = None,
        labels: Sequence[str | None] | None = None,
        model: str | None = None,
        *,
        replace: bool = False,
    ) -> Added:
        """As `Client.add` (needs the server's API key)."""
        form = self._add_form(images, paths, labels, model, replace)
        return self._added(await self._request("POST", "/index/add", **form))

    async def delete(
        self,
        ids: int | Sequence[int] | None = None,
        paths: str | Sequence[str] | None = None,
    ) -> Deleted:
        """As `Client.delete` (needs the server's API key)."""
        body = self._delete_body(ids, paths)
        return self._deleted(await self._request("POST", "/index/delete", **body))

    async def item(self, item_id: int) -> Item:
        """As `Client.item`."""
        return self._item(await self._request("GET", f"/index/items/{_item_id(item_id)}"))

    async def thumbnail(self, item_id: int) -> bytes:
        """As `Client.thumbnail`: JPEG bytes."""
        path = f"/index/items/{_item_id(item_id)}/thumbnail"
        return self._bytes(await self._send("GET", path))

    async def labels(self) -> dict[str, int]:
        """As `Client.labels`."""
        return (await self._request("GET", "/index/labels"))["labels"]

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
