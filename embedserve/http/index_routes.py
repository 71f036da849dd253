"""The routes of the served index's endpoints and their OpenAPI documentation; what they do is
embedserve.http.index_api's `IndexEndpoints`, found in `app.state.index_endpoints`.

    POST   /search                      images or a stored item's `id`, `k`, filters
    POST   /index/add                   images + `metadata` (+ `replace`) (key required)
    POST   /index/delete                `id`s and/or `path`s (key required)
    DELETE /index/items/{id}            one item (key required)
    GET    /index/items/{id}            its path and label
    GET    /index/items/{id}/thumbnail  its JPEG thumbnail
    GET    /index/labels                {label: live items}
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response

from embedserve.http.index_api import IndexEndpoints
from embedserve.http.schemas import (
    ADD_ERROR_RESPONSES,
    DELETE_BODY,
    DELETE_ERROR_RESPONSES,
    ITEM_ERROR_RESPONSES,
    METADATA_FIELD,
    MODEL_FIELD,
    REPLACE_FIELD,
    SEARCH_ERROR_RESPONSES,
    THUMBNAIL_RESPONSE,
    AddResponse,
    DeleteItemResponse,
    DeleteResponse,
    ItemResponse,
    LabelsResponse,
    SearchResponse,
    multipart_body,
    search_body,
)


def endpoints(request: Request) -> IndexEndpoints:
    return request.app.state.index_endpoints


def install_index_routes(app: FastAPI, max_images: int) -> None:
    """Add the index's routes to `app`, documented for the OpenAPI page (their docstrings, and
    the bodies and answers of embedserve.http.schemas)."""
    tags = ["Service APIs"]

    @app.post(
        "/search",
        summary="Find similar images, or items like a stored one",
        response_model=SearchResponse,
        responses=SEARCH_ERROR_RESPONSES,
        openapi_extra=search_body(max_images),
        tags=tags,
    )
    async def search(request: Request) -> Response:
        """The k most similar indexed images (cosine similarity) of each query image, or of the
        stored item `id` ("more like this": its stored vector, the item itself left out), with
        their ids, scores, paths and labels. Filters: `label` (repeatable: any of them),
        `path_prefix`, `min_score` (-1..1). On a Flat index the answer is the exact top k of
        the items that match; `k` over their number returns all of them.

        Examples: `curl -F images=@cat.jpg -F k=5 -F label=cats localhost:3000/search`;
        `curl -d id=42 -d k=5 localhost:3000/search` (a URL-encoded form, or JSON `{"id": 42}`)

        Needs an index (`embedserve index build ...`, then EMBEDSERVE_INDEX=DIR); without one
        the answer is 409 with these instructions. An unknown or deleted `id` is a 404."""
        return await endpoints(request).search(request)

    @app.post(
        "/index/add",
        summary="Add images to the index (API key required)",
        response_model=AddResponse,
        responses=ADD_ERROR_RESPONSES,
        openapi_extra=multipart_body(max_images, METADATA_FIELD | REPLACE_FIELD | MODEL_FIELD),
        tags=tags,
    )
    async def index_add(request: Request) -> Response:
        """Embed the images and append them to the served index, each with a JPEG thumbnail
        (EMBEDSERVE_THUMBNAILS); the answer gives their ids. With `replace=true`, the items
        already stored under the same paths are deleted in the same step (`replaced`): a
        search sees the old items or the new ones, never both or neither. When the answer
        comes, the change is in the index's fsynced write-ahead log (it survives a crash or a
        kill) and searchable. Searches running meanwhile are never failed.

        Example: `curl -H "Authorization: Bearer $KEY" -F images=@cat.jpg
        -F 'metadata=[{"path": "cat.jpg", "label": "cat"}]' -F replace=true
        localhost:3000/index/add`

        Needs EMBEDSERVE_API_KEY (without one, 403: changing the index is off),
        EMBEDSERVE_INDEX and, with a FAISS index folder, one worker (a Milvus index takes
        any number)."""
        return await endpoints(request).add(request)

    @app.post(
        "/index/delete",
        summary="Delete items by id or path (API key required)",
        response_model=DeleteResponse,
        responses=DELETE_ERROR_RESPONSES,
        openapi_extra=DELETE_BODY,
        tags=tags,
    )
    async def index_delete(request: Request) -> Response:
        """Delete the items with the given ids (`id`, repeatable) and every item stored under
        the given paths (`path`, repeatable; JSON `ids` and `paths`). Ids and paths that match
        no live item are listed in `missing_ids` and `missing_paths`. When the answer comes,
        the deletion is durable and no search returns the items; ids are never reused, and the
        next save (compaction) removes their vectors and thumbnails for good.

        Example: `curl -H "Authorization: Bearer $KEY" -d id=3 -d id=4 -d path=cat.jpg
        localhost:3000/index/delete`"""
        return await endpoints(request).delete(request)

    @app.delete(
        "/index/items/{item_id}",
        summary="Delete one item (API key required)",
        response_model=DeleteItemResponse,
        responses=DELETE_ERROR_RESPONSES,
        tags=tags,
    )
    async def index_delete_item(request: Request, item_id: str) -> Response:
        """Delete the item `item_id`, as POST /index/delete does; 404 when no live item has it.

        Example: `curl -X DELETE -H "Authorization: Bearer $KEY" localhost:3000/index/items/3`"""
        return await endpoints(request).delete_item(request, item_id)

    @app.get(
        "/index/items/{item_id}",
        summary="A stored item's path and label",
        response_model=ItemResponse,
        responses=ITEM_ERROR_RESPONSES,
        tags=tags,
    )
    async def index_item(request: Request, item_id: str) -> Response:
        """`{"id", "path", "label"}` of a live item; 404 when it was never added or deleted.

        Example: `curl localhost:3000/index/items/3`"""
        return await endpoints(request).item(request, item_id)

    @app.get(
        "/index/items/{item_id}/thumbnail",
        summary="A stored item's thumbnail (JPEG)",
        response_class=Response,
        responses={**ITEM_ERROR_RESPONSES, 200: THUMBNAIL_RESPONSE},
        tags=tags,
    )
    async def index_thumbnail(request: Request, item_id: str) -> Response:
        """The item's JPEG thumbnail, made when it was added (at most EMBEDSERVE_THUMBNAILS
        pixels on its longer side), served from the index: no file is ever read. 404 when the
        item is unknown or deleted, or has no thumbnail.

        Example: `curl -o 3.jpg localhost:3000/index/items/3/thumbnail`"""
        return await endpoints(request).thumbnail(request, item_id)

    @app.get(
        "/index/labels",
        summary="The labels in the index, with their item counts",
        response_model=LabelsResponse,
        responses=ITEM_ERROR_RESPONSES,
        tags=tags,
    )
    async def index_labels(request: Request) -> Response:
        """`{"labels": {label: number of live items}}`: the values `label` filters on.

        Example: `curl localhost:3000/index/labels`"""
        return await endpoints(request).labels(request)
