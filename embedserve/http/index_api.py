"""What the endpoints of the served index do: search, add, delete, an item, its thumbnail, the labels.

    POST   /search                      images or a stored item's `id`, `k`, filters (`label`,
                                        `path_prefix`, `min_score`) -> neighbours per query
    POST   /index/add                   images + `metadata` (+ `replace`) -> ids (key required)
    POST   /index/delete                `id`s and/or `path`s -> what was deleted (key required)
    DELETE /index/items/{id}            one item (key required)
    GET    /index/items/{id}            its path and label
    GET    /index/items/{id}/thumbnail  its JPEG thumbnail (image/jpeg)
    GET    /index/labels                {label: live items}

`IndexEndpoints` answers them (embedserve.http.index_routes adds the routes, which find it in
`app.state.index_endpoints`): each worker makes one when it starts (`IndexEndpoints.open`;
tests make one over a fake model).
Reading follows /embed's access rule (open unless EMBEDSERVE_API_KEY is set); changing the
index needs the key and is off without one. A change is in the index's fsynced write-ahead log
and visible to every search when its answer comes. No endpoint reads a path from disk: paths
are stored and returned as text, thumbnails come from the index.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.responses import Response

from embedserve import index_backend
from embedserve.config import ServeConfig
from embedserve.http.auth import check_api_key
from embedserve.http.errors import ClientError
from embedserve.http.fields import parse_bool, parse_filters, parse_item_id, parse_targets
from embedserve.http.forms import client_name, parse_k, parse_metadata, read_images
from embedserve.http.schemas import json_response
from embedserve.index_format import IndexUnavailableError

logger = logging.getLogger("bentoml.embedserve")

SEARCH_FIELDS = ("images", "k", "model", "label", "path_prefix", "min_score", "id")
ADD_FIELDS = ("images", "metadata", "model", "replace")
DELETE_FIELDS = ("id", "path", "ids", "paths")
NO_INDEX = (
    "no search index is configured: build one with `embedserve index build --images DIR "
    "--out INDEX_DIR` and start the server with EMBEDSERVE_INDEX=INDEX_DIR"
)


def index_writes_off_reason(cfg: ServeConfig) -> str | None:
    """Why changing the index (POST /index/add, deleting) is off with these settings, or None
    when it is on."""
    if not cfg.api_key:
        return (
            "changing the index (adding, deleting) needs an API key, and none is configured: "
            "start the server with EMBEDSERVE_API_KEY set (and EMBEDSERVE_INDEX)"
        )
    if not cfg.index:
        return "no search index is configured (EMBEDSERVE_INDEX)"
    if cfg.workers != 1 and not index_backend.is_milvus(cfg.index):
        # each worker holds its own copy of a FAISS index: changes through one would be
        # invisible to the others (a Milvus collection is one, shared by all)
        return (
            f"changing a FAISS index needs EMBEDSERVE_WORKERS=1 (this server runs "
            f"{cfg.workers}); a Milvus index (EMBEDSERVE_INDEX=http://...) takes any number"
        )
    return None


class IndexEndpoints:
    """One worker's index and what its endpoints need: the served models (`get(name)`, each
    with `name`, `embed`, `embed_with_thumbnails`, `telemetry`), the decode pool, and one
    writer thread that appends to the log (fsync) and saves, in request order."""

    def __init__(
        self,
        config: ServeConfig,
        models: Any,
        index: Any,
        index_model: str | None,
        decode_pool: Executor,
    ) -> None:
        self.config, self.models, self.index, self.index_model = config, models, index, index_model
        self.decode_pool = decode_pool
        self.writes_off = index_writes_off_reason(config)
        self.index_pool = ThreadPoolExecutor(1, thread_name_prefix="index-writer")

    @classmethod
    def open(cls, config: ServeConfig, models: Any, decode_pool: Executor) -> IndexEndpoints:
        """Load EMBEDSERVE_INDEX (if set), bound to the served model it was built with (an
        error when none is), and open its log when this worker is its one writer."""
        if not config.index:
            return cls(config, models, None, None, decode_pool)
        index = index_backend.open_index(  # faiss or pymilvus imported only now
            config.index, collection=config.milvus_collection, token=config.milvus_token
        )
        built_with = index.manifest["model"]["name"]
        model = built_with if built_with in models.names else models.names[0]
        index.check_model(models.get(model).package, where=str(config.index))  # no stranger
        models.get(model).telemetry.index_size.set(len(index))
        logger.info(
            "index %s of model %s: %d vectors (%d additions, %d deletions from its log)",
            config.index,
            model,
            len(index),
            index.replayed,
            index.replayed_deletions,
        )
        endpoints = cls(config, models, index, model, decode_pool)
        if endpoints.writes_off is None:
            index.open_log(config.index)  # this worker is the index's one writer
            logger.info("changing the index is on (API key required)")
        elif config.api_key:
            logger.warning("changing the index is off: %s", endpoints.writes_off)
        return endpoints

    def describe(self) -> dict[str, Any] | None:
        """/info's `index`."""
        if self.index is None:
            return None
        return {
            "path": str(self.config.index),
            "backend": index_backend.kind(self.config.index),
            "size": len(self.index),
            "model": self.index.manifest.get("model"),
            "served_model": self.index_model,
            "factory": self.index.manifest.get("factory"),
            "writes": "on (api key required)" if self.writes_off is None else "off",
            "log_bytes": self.index.log_size,
            "thumbnails": self.config.thumbnails,
        }

    # -- checks ------------------------------------------------------------------------------

    def _served_index(self, request: Request) -> Any:
        """The index, after the reading endpoints' key check; 409 without one."""
        check_api_key(request, self.config.api_key)
        if self.index is None:
            raise ClientError(409, NO_INDEX)
        return self.index

    def _writable(self, request: Request, action: str) -> None:
        """403 when changing the index is off (before the key is looked at when no key is
        configured, so that the answer says why), 401 without the right key."""
        if self.config.api_key is None:
            raise ClientError(403, f"{action} is off: {self.writes_off}")
        check_api_key(request, self.config.api_key, required=True)
        if self.writes_off is not None:
            raise ClientError(403, f"{action} is off: {self.writes_off}")

    def _model(self, name: Any) -> Any:
        """The named served model (404 unknown), 409 unless it is the index's: its vectors are
        comparable with no other's."""
        model = self.models.get(name)
        if model.name != self.index_model:
            raise ClientError(
                409,
                f"the index holds embeddings of model {self.index_model!r}, not comparable with "
                f"{model.name!r}'s: send model={self.index_model!r} (or serve an index built "
                f"with {model.name!r})",
                reason="index_model",
            )
        return model

    async def _read(self, request: Request, fields: tuple[str, ...], **options: Any):
        cfg = self.config
        return await read_images(
            request, fields, cfg.max_request_bytes, cfg.max_images_per_request, **options
        )

    async def _in(self, pool: Executor, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except IndexUnavailableError as e:  # a Milvus server that is down or refused the call
            logger.error("index unavailable: %s", e)
            raise ClientError(
                503, f"the index could not be reached: {e}; retry", reason="index_unavailable"
            ) from None

    # -- reading -----------------------------------------------------------------------------

    async def search(self, request: Request) -> Response:
        index = self._served_index(request)
        images, values = await self._read(
            request, SEARCH_FIELDS, lists=("label",), images_required=False
        )
        item_id = None if values.get("id") is None else parse_item_id(values["id"])
        if item_id is not None and images:
            raise ClientError(
                400,
                "send either images (search by image) or id (search by a stored item), not both",
            )
        if item_id is None and not images:
            raise ClientError(
                400,
                "missing field 'images': send one or more image files in it, or the field 'id' "
                "to search by a stored item",
            )
        # by id no model runs: without `model`, the index's own (not the server's first)
        model = self._model(values.get("model", None if item_id is None else self.index_model))
        k = parse_k(values.get("k", "10"), self.config.max_k)
        filters = parse_filters(values).kwargs()
        if item_id is not None:
            hits = await self._in(self.decode_pool, self._search_by_id, item_id, k, filters)
            results = [{"file": None, "id": item_id, "neighbours": hits}]
        else:
            emb = await model.embed(images, self.decode_pool)
            found = await self._in(self.decode_pool, lambda: index.search(emb, k, **filters))
            results = [
                {"file": client_name(i, filename), "id": None, "neighbours": hits}
                for i, ((filename, _), hits) in enumerate(zip(images, found, strict=True))
            ]
        return json_response({"model": model.name, "k": k, "results": results})

    def _search_by_id(self, item_id: int, k: int, filters: dict[str, Any]) -> list[dict]:
        try:
            return self.index.search_by_id(item_id, k, **filters)
        except KeyError:  # embedserve.index's ItemNotFound
            raise self._not_found(item_id) from None

    @staticmethod
    def _not_found(item_id: int, what: str = "item") -> ClientError:
        return ClientError(
            404,
            f"no {what} with id {item_id} in the index (never added, or deleted)",
            reason="unknown_id",
        )

    async def item(self, request: Request, item_id: str) -> Response:
        index = self._served_index(request)
        number = parse_item_id(item_id)
        found = await self._in(self.decode_pool, index.item, number)
        if found is None:
            raise self._not_found(number)
        return json_response(found)

    async def thumbnail(self, request: Request, item_id: str) -> Response:
        index = self._served_index(request)
        number = parse_item_id(item_id)
        jpeg = await self._in(self.decode_pool, index.thumbnail, number)
        if jpeg is None:
            if await self._in(self.decode_pool, index.item, number) is None:
                raise self._not_found(number)
            raise ClientError(
                404,
                f"item {number} has no thumbnail (added with thumbnails off, or by a version "
                "before thumbnails)",
                reason="no_thumbnail",
            )
        # no-cache: a deleted item's thumbnail must not come back from a browser's cache
        headers = {"Cache-Control": "private, no-cache"}
        return Response(bytes(jpeg), media_type="image/jpeg", headers=headers)

    async def labels(self, request: Request) -> Response:
        index = self._served_index(request)
        return json_response({"labels": await self._in(self.decode_pool, index.labels)})

    # -- changing ----------------------------------------------------------------------------

    async def add(self, request: Request) -> Response:
        self._writable(request, "POST /index/add")
        images, values = await self._read(request, ADD_FIELDS)
        model = self._model(values.get("model"))
        paths, labels = parse_metadata(values.get("metadata"), images)
        replace = parse_bool(values.get("replace", False), "replace")
        emb, thumbnails = await model.embed_with_thumbnails(
            images, self.decode_pool, self.config.thumbnails
        )
        if all(t is None for t in thumbnails):
            thumbnails = None
        added = await self._write(
            lambda: self.index.add_durable(
                emb, paths, labels, thumbnails=thumbnails, replace=replace
            ),
            "not added",
        )
        model.telemetry.index_size.set(len(self.index))
        return json_response(
            {
                "model": model.name,
                "ids": added.ids,
                "replaced": list(added.replaced),
                "index_size": len(self.index),
            }
        )

    async def delete(self, request: Request) -> Response:
        self._writable(request, "deleting from the index")
        _, values = await self._read(
            request, DELETE_FIELDS, lists=DELETE_FIELDS, images_required=False
        )
        targets = parse_targets(values)
        result = await self._write(
            lambda: self.index.delete_durable(ids=targets.ids, paths=targets.paths), "not deleted"
        )
        return json_response(
            {
                "deleted": list(result.deleted),
                "missing_ids": list(result.missing_ids),
                "missing_paths": list(result.missing_paths),
                "index_size": self._size(),
            }
        )

    async def delete_item(self, request: Request, item_id: str) -> Response:
        self._writable(request, "deleting from the index")
        number = parse_item_id(item_id)
        result = await self._write(lambda: self.index.delete_durable(ids=[number]), "not deleted")
        if not result.deleted:
            raise self._not_found(number)
        return json_response({"deleted": list(result.deleted), "index_size": self._size()})

    def _size(self) -> int:
        size = len(self.index)
        self.models.get(self.index_model).telemetry.index_size.set(size)
        return size

    async def _write(self, change: Any, undone: str) -> Any:
        """`change()` on the writer thread (log + apply: durable and searchable), then a save
        of a log grown past its limit; 503 when the log could not be written."""
        try:
            return await self._in(self.index_pool, self._durably, change)
        except OSError as e:  # the log could not be written: nothing was acknowledged
            logger.error("index log write failed: %s", e)
            raise ClientError(
                503,
                f"{undone}: the index could not be written ({e.strerror}); retry",
                reason="index_write_failed",
            ) from None

    def _durably(self, change: Any) -> Any:
        result = change()
        if self.index.log_size > self.config.index_log_max_bytes:
            start = time.perf_counter()
            version = self.index.save(self.config.index)  # atomic (compacts); the log emptied
            logger.info(
                "index saved as %s (%d vectors) in %.2f s; log emptied",
                Path(version).name,
                len(self.index),
                time.perf_counter() - start,
            )
        return result
