"""What the endpoints answer and take, for the OpenAPI page, and the JSON encoding of answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from pydantic import BaseModel, Field
from starlette.responses import Response

from embedserve.http.forms import MAX_LABEL_CHARS, MAX_PATH_CHARS


class EmbedResponse(BaseModel):
    """The answer of /embed."""

    model: str = Field(
        description="the model package's name", examples=["barlow-twins-resnet18-imagenette"]
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
    file: str | None = Field(
        description="the query image, as the request named it (null for a search by id)"
    )
    id: int | None = Field(description="the stored item searched by (null for an image)")
    neighbours: list[Neighbour]


class SearchResponse(BaseModel):
    """The answer of /search."""

    model: str
    k: int
    results: list[SearchResult] = Field(description="one entry per query image, in request order")


class AddResponse(BaseModel):
    """The answer of /index/add: the additions are durable and searchable when it comes."""

    model: str
    ids: list[int] = Field(description="the new images' ids, in request order")
    replaced: list[int] = Field(
        description="with replace=true, the ids of the items deleted because a new image has "
        "their path"
    )
    index_size: int = Field(description="images in the index now")


class DeleteResponse(BaseModel):
    """The answer of POST /index/delete: the deletions are durable when it comes."""

    deleted: list[int] = Field(description="the ids of the items deleted")
    missing_ids: list[int] = Field(description="ids sent that no live item has")
    missing_paths: list[str] = Field(description="paths sent that no live item has")
    index_size: int = Field(description="items in the index now")


class DeleteItemResponse(BaseModel):
    """The answer of DELETE /index/items/{id}."""

    deleted: list[int] = Field(description="[the id]")
    index_size: int = Field(description="items in the index now")


class ItemResponse(BaseModel):
    """A stored item (GET /index/items/{id})."""

    id: int
    path: str | None = Field(description="the path stored with it (text, never opened)")
    label: str | None


class LabelsResponse(BaseModel):
    """GET /index/labels."""

    labels: dict[str, int] = Field(description="each label and its number of live items")


class EmbeddingItem(BaseModel):
    object: str = Field(examples=["embedding"])
    index: int = Field(description="the input's position in the request")
    embedding: list[float] | str = Field(
        description="the L2-normalized embedding: floats, or with encoding_format=base64 the "
        "base64 of its little-endian float32 bytes"
    )


class Usage(BaseModel):
    prompt_tokens: int = Field(description="always 0: images are not tokens")
    total_tokens: int = Field(description="always 0")


class EmbeddingsResponse(BaseModel):
    """The answer of /v1/embeddings (the OpenAI embeddings API's shape)."""

    object: str = Field(examples=["list"])
    data: list[EmbeddingItem] = Field(description="one entry per input, in request order")
    model: str
    usage: Usage


# The error answers of the endpoints, as documented in the OpenAPI page.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "a bad file or field; the body names each bad file and its problem"},
    401: {"description": "EMBEDSERVE_API_KEY is set and the request has no or a wrong key"},
    404: {"description": "`model` names a model this server does not serve"},
    409: {
        "description": "no index configured (for /search), or `model` is not the one the "
        "index was built with"
    },
    413: {"description": "too many images, too many pixels, or a body over the byte limit"},
    415: {
        "description": "an image format that is not decoded, a data URI that is not an image, "
        "or a body that is neither multipart nor JSON"
    },
    503: {
        "description": "overloaded: the batch queue exceeds max_latency_ms, or "
        "max_concurrent_requests are running, or the request bodies held would pass "
        "max_inflight_bytes; retry (Retry-After)"
    },
}

# The extra responses of POST /index/add.
ADD_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    401: {"description": "no or a wrong API key (Authorization: Bearer <key>)"},
    403: {"description": "adding is off: no API key configured, no index, or workers > 1"},
    409: {"description": "no index configured, or `model` is not the index's"},
}

# The extra responses of the index's endpoints.
SEARCH_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    400: {
        "description": "a bad file or field (k, id, label, path_prefix, min_score), images and "
        "id together, or neither"
    },
    404: {"description": "`id` is no live item's (never added, or deleted), or `model` unknown"},
}
ITEM_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "the id is not a non-negative integer"},
    401: ERROR_RESPONSES[401],
    404: {"description": "no live item has this id (or, for a thumbnail, it has none)"},
    409: {"description": "no index configured"},
}
DELETE_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "a bad id or path, or none sent"},
    401: ADD_ERROR_RESPONSES[401],
    403: {
        "description": "changing the index is off: no API key configured, no index, or workers > 1"
    },
    404: {"description": "DELETE /index/items/{id}: no live item has this id"},
    413: {"description": "a body over the byte limit"},
    415: {"description": "a body that is neither a form nor JSON"},
    503: {"description": "the index could not be written (nothing was deleted); retry"},
}
THUMBNAIL_RESPONSE: dict[str, Any] = {
    "description": "the JPEG thumbnail",
    "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
}

# The extra responses of POST /v1/embeddings.
EMBEDDINGS_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {**ERROR_RESPONSES}
EMBEDDINGS_ERROR_RESPONSES.pop(409)

# An image in a JSON body, as an OpenAPI schema.
IMAGE_STRING = {
    "type": "string",
    "description": "an image, base64-encoded: bare, or as data:image/<type>;base64,<data>. "
    "URLs are never fetched (400).",
}

# The text fields of the forms, as OpenAPI properties.
MODEL_FIELD = {
    "model": {
        "type": "string",
        "description": "the served model to use, by name (GET /v1/models); absent: the first",
    }
}
K_FIELD = {"k": {"type": "integer", "default": 10, "description": "neighbours per image"}}
METADATA_FIELD = {
    "metadata": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "path": {"type": ["string", "null"], "maxLength": MAX_PATH_CHARS},
                "label": {"type": ["string", "null"], "maxLength": MAX_LABEL_CHARS},
            },
            "additionalProperties": False,
        },
        "description": "optional JSON array, one object per image in order: "
        '[{"path": "photos/cat.jpg", "label": "cat"}, ...]; both keys optional. '
        "Without it, each path is the uploaded file's name and there is no label. "
        "Paths are stored as text, never opened.",
    }
}


REPLACE_FIELD = {
    "replace": {
        "type": "boolean",
        "default": False,
        "description": "true: delete the items already stored under the new images' paths, in "
        "the same step (their ids come back in `replaced`)",
    }
}
FILTER_FIELDS = {
    "label": {
        "anyOf": [
            {"type": "string", "maxLength": MAX_LABEL_CHARS},
            {"type": "array", "items": {"type": "string", "maxLength": MAX_LABEL_CHARS}},
        ],
        "description": "keep only items with this label; repeat the field (a JSON array) for "
        "any of several",
    },
    "path_prefix": {
        "type": "string",
        "maxLength": MAX_PATH_CHARS,
        "description": "keep only items whose stored path starts with this text",
    },
    "min_score": {
        "type": "number",
        "minimum": -1,
        "maximum": 1,
        "description": "keep only neighbours with at least this cosine similarity",
    },
}
ID_FIELD = {
    "id": {
        "type": "integer",
        "minimum": 0,
        "description": "search by this stored item instead of images (more like this; the item "
        "itself is left out)",
    }
}


def search_body(max_images: int) -> dict[str, Any]:
    """The OpenAPI requestBody of POST /search: images (a multipart form or JSON) or the `id`
    of a stored item (any of those, or a URL-encoded form), with `k`, `model` and filters."""
    body = multipart_body(max_images, K_FIELD | MODEL_FIELD | FILTER_FIELDS | ID_FIELD)
    content = body["requestBody"]["content"]
    for kind in ("multipart/form-data", "application/json"):
        content[kind]["schema"].pop("required")
    content["multipart/form-data"]["encoding"] = {"images": {"contentType": "image/*"}}
    content["application/x-www-form-urlencoded"] = {
        "schema": {
            "type": "object",
            "required": ["id"],
            "properties": K_FIELD | MODEL_FIELD | FILTER_FIELDS | ID_FIELD,
        }
    }
    return body


_TARGETS = {
    "id": {"type": "array", "items": {"type": "integer", "minimum": 0}, "description": "ids"},
    "path": {"type": "array", "items": {"type": "string"}, "description": "stored paths"},
}
DELETE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "properties": _TARGETS}
            },
            "multipart/form-data": {"schema": {"type": "object", "properties": _TARGETS}},
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"ids": _TARGETS["id"], "paths": _TARGETS["path"]},
                    "additionalProperties": False,
                }
            },
        },
    }
}


def multipart_body(max_images: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAPI requestBody of an endpoint that takes 1..max_images `images` (+ `extra`
    fields), for a route's `openapi_extra`: a multipart form, or a JSON object with the same
    fields and the images base64-encoded."""
    json_properties = {
        "images": {"type": "array", "items": IMAGE_STRING, "minItems": 1, "maxItems": max_images},
        **(extra or {}),
    }
    properties = {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "minItems": 1,
            "maxItems": max_images,
            "description": "image files (JPEG, PNG, WebP, GIF, BMP, TIFF): repeat the field "
            "once per image",
        },
        **(extra or {}),
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["images"], "properties": properties},
                    "encoding": {
                        "images": {"contentType": "image/*"},
                        **{
                            name: {"contentType": "application/json"}
                            for name, spec in (extra or {}).items()
                            if spec.get("type") == "array"
                        },
                    },
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["images"],
                        "properties": json_properties,
                        "additionalProperties": False,
                    }
                },
            },
        }
    }


def embeddings_body(
    max_images: int, model: str | Sequence[str], dim: int | Sequence[int]
) -> dict[str, Any]:
    """The OpenAPI requestBody of POST /v1/embeddings (the OpenAI embeddings API's fields) for
    the served model(s) (the first is the default) and their embedding size(s)."""
    models = [model] if isinstance(model, str) else list(model)
    dims = sorted({dim} if isinstance(dim, int) else set(dim))
    served = ", ".join(map(repr, models))
    properties = {
        "model": {
            "type": ["string", "null"],
            "description": f"a served model, {served} (absent: {models[0]!r})",
        },
        "input": {
            "anyOf": [
                IMAGE_STRING,
                {"type": "array", "items": IMAGE_STRING, "minItems": 1, "maxItems": max_images},
            ]
        },
        "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
        "dimensions": {"type": "integer", "enum": dims, "description": "only the model's own"},
        "user": {"type": "string", "description": "accepted and ignored"},
    }
    schema = {"type": "object", "required": ["input"], "properties": properties}
    content = {"application/json": {"schema": {**schema, "additionalProperties": False}}}
    return {"requestBody": {"required": True, "content": content}}


def json_response(body: dict[str, Any]) -> Response:
    """A JSON answer; numpy arrays in `body` are written as lists."""
    # orjson writes a float32 array as the shortest decimal that reads back to the same float32
    # (exact, and 44% smaller than Python floats), 26x faster than json.dumps(array.tolist()):
    # at 8 images per request that was 11% of the event loop's time.
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
    )
