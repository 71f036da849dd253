"""JSON request bodies beside multipart forms: the images base64-encoded, the other fields as JSON.

    POST /embed, /search, /index/add  {"images": [...], "k": 5, "metadata": [...]}: the fields
                                      of the endpoint's multipart form, the same answers
                                      (/search {"id": 42} searches by a stored item, no images)
    POST /index/delete                {"ids": [...], "paths": [...]}
    POST /v1/embeddings               the OpenAI embeddings API: {"model", "input",
                                      "encoding_format"} -> {"object": "list", "data": [...]}

An image is a string: a data URI `data:image/<type>;base64,<data>`, or bare base64 (standard
alphabet, padded; line breaks are allowed). URLs are never fetched: a string that starts with
any other scheme (http:, https:, file:, s3:, ...) is a 400 that says so. The body is read with
the same limits as a form (max_request_bytes, the worker's max_inflight_bytes budget,
max_images_per_request), and its problems have the same statuses: 413 over a limit, 415 for a
data URI that is not an image, 400 for the rest, with each bad image named by its position
(`images[2]`, `input[2]`) as a form names its files.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request

from embedserve.http.errors import ClientError
from embedserve.http.limits import BodyHold, check_count, check_length, read_body

# An image as read: (its file name, which JSON images do not have; its bytes).
Upload = tuple[str | None, bytes]

# A URI scheme (RFC 3986) at the start of a string; base64 never contains a colon.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
# data:[<media type>][;<parameter>]*,<data> (RFC 2397): the comma is looked for this far in
MAX_DATA_HEADER = 1024
IMAGE_HINT = "base64-encoded, bare or as data:image/<type>;base64,<data>"

# The fields of POST /v1/embeddings (`user` is accepted and ignored, as a hint for abuse logs).
EMBEDDINGS_FIELDS = ("model", "input", "encoding_format", "dimensions", "user")
ENCODINGS = ("float", "base64")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_json(request: Request) -> bool:
    """Whether the request says its body is JSON (application/json or a +json type)."""
    kind = media_type(request)
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def json_kind(value: Any) -> str:
    """What a JSON value is, for an error message (never the value itself)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), "a value")


async def read_json(request: Request, max_bytes: int, hold: BodyHold | None = None) -> Any:
    """The parsed JSON body: 413 over `max_bytes`, 415 when it is not JSON, 400 when it does
    not parse; its bytes are taken from `hold` as a form's are."""
    check_length(request, max_bytes)
    if not is_json(request):
        raise ClientError(
            415,
            f"Content-Type {media_type(request) or 'missing'}: send application/json with the "
            f"images {IMAGE_HINT}",
        )
    body = await read_body(request, max_bytes, hold)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ClientError(400, f"the body is not valid JSON: {e}") from None


def check_fields(body: Any, fields: tuple[str, ...], example: str) -> dict[str, Any]:
    """The body as an object with no field other than `fields` (400 otherwise)."""
    if not isinstance(body, dict):
        raise ClientError(400, f"the JSON body must be an object, {example}, not {json_kind(body)}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ClientError(
            400,
            f"unknown field(s) {', '.join(repr(u[:100]) for u in unknown)}; this endpoint takes "
            + ", ".join(map(repr, fields)),
        )
    return body


def image_strings(value: Any, field: str) -> list[str]:
    """The field's images: one string or a non-empty array of strings (400 otherwise)."""
    if value is None:
        raise ClientError(
            400, f"missing field {field!r}: send one or more images in it, {IMAGE_HINT}"
        )
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ClientError(
            400, f"{field} must be a string or an array of strings, not {json_kind(value)}"
        )
    if not items:
        raise ClientError(400, f"{field} is empty: send one or more images in it, {IMAGE_HINT}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ClientError(
                400, f"{field}[{i}] is {json_kind(item)}, not a string: send the image {IMAGE_HINT}"
            )
    return items


class BadImage(ValueError):
    """One image string that does not give an image's bytes: its status and problem."""

    def __init__(self, status: int, problem: str) -> None:
        super().__init__(problem)
        self.status, self.problem = status, problem


def image_bytes(text: str) -> bytes:
    """The bytes of one image string (a data: URI or bare base64); BadImage otherwise."""
    if text[:5].lower() == "data:":
        comma = text.find(",", 0, MAX_DATA_HEADER)  # a bounded look: the header is short
        if comma < 0:
            raise BadImage(400, "a data URI without a comma: send data:image/<type>;base64,<data>")
        kind, *parameters = (p.strip().lower() for p in text[5:comma].split(";"))
        if not kind.startswith("image/"):
            raise BadImage(
                415,
                f"a data URI of type {kind[:100] or 'text/plain (none given)'}, not an image: "
                "send data:image/<type>;base64,<data>",
            )
        if "base64" not in parameters:
            raise BadImage(
                400, "a data URI that is not base64: send data:image/<type>;base64,<data>"
            )
        text = text[comma + 1 :]
    elif scheme := _SCHEME.match(text[:64]):
        raise BadImage(
            400,
            f"a URL ({scheme.group(1).lower()}:), and URLs are never fetched: send the image "
            f"itself, {IMAGE_HINT}",
        )
    if "\n" in text or "\r" in text:
        text = text.replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:  # ValueError: characters that are not ASCII
        raise BadImage(400, f"not valid base64 (standard alphabet, padded): {e}") from None


def decode_strings(items: list[str], field: str) -> list[Upload]:
    """The bytes of every image string; one ClientError names every bad one, with the most
    specific status of theirs (415 > 400), as `embedserve.http.decode` names bad files."""
    images, problems = [], []
    for i, text in enumerate(items):
        try:
            images.append((None, image_bytes(text)))
        except BadImage as e:
            problems.append((e.status, f"{field}[{i}]", e.problem))
    if problems:
        files = [{"file": name, "problem": why} for _, name, why in problems]
        summary = "; ".join(f"{f['file']}: {f['problem']}" for f in files)
        raise ClientError(max(s for s, _, _ in problems), summary, files)
    return images


async def read_json_form(
    request: Request,
    fields: tuple[str, ...],
    max_bytes: int,
    max_images: int,
    hold: BodyHold | None = None,
    images_required: bool = True,
) -> tuple[list[Upload], dict[str, Any]]:
    """A form's fields from a JSON body: the images of `images` (at most `max_images`, a 413
    before any is decoded; absent or null is none unless `images_required`) and the other
    fields' values as sent (null is absent)."""
    example = (
        '{"images": ["data:image/jpeg;base64,..."]}' if "images" in fields else '{"ids": [...]}'
    )
    body = check_fields(await read_json(request, max_bytes, hold), fields, example)
    if body.get("images") is None and not images_required:
        return [], {k: v for k, v in body.items() if v is not None}
    items = image_strings(body.get("images"), "images")
    check_count(items, max_images)
    values = {k: v for k, v in body.items() if k != "images" and v is not None}
    return decode_strings(items, "images"), values


def served_model(asked: Any, served: Sequence[str]) -> str:
    """The served model a request names (`served[0]` when absent or null): 400 when the name
    is not a string, 404 that lists the served models when none has it."""
    if asked is None:
        return served[0]
    if not isinstance(asked, str):
        raise ClientError(400, f"model must be a string, not {json_kind(asked)}")
    if asked not in served:
        raise ClientError(
            404,
            f"model {asked[:200]!r} is not served here; this server serves "
            + ", ".join(map(repr, served)),
        )
    return asked


async def read_embeddings(
    request: Request,
    served: Mapping[str, int],
    max_bytes: int,
    max_images: int,
    hold: BodyHold | None = None,
) -> tuple[list[Upload], str, str]:
    """The images, the encoding_format and the model of an OpenAI embeddings request to a
    server of the models `served` (name -> embedding size; absent or null is the first): 404
    for another model, 400 for a bad field."""
    example = '{"model": ..., "input": ["data:image/jpeg;base64,..."]}'
    body = check_fields(await read_json(request, max_bytes, hold), EMBEDDINGS_FIELDS, example)
    model = served_model(body.get("model"), list(served))
    dim = served[model]
    encoding = "float" if body.get("encoding_format") is None else body["encoding_format"]
    if encoding not in ENCODINGS:
        raise ClientError(400, "encoding_format must be 'float' or 'base64'")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or dimensions != dim):
        raise ClientError(
            400, f"dimensions: {model!r} gives embeddings of {dim} dimensions, no other size"
        )
    if not isinstance(body.get("user"), str | None):
        raise ClientError(400, f"user must be a string, not {json_kind(body['user'])}")
    items = image_strings(body.get("input"), "input")
    check_count(items, max_images)
    return decode_strings(items, "input"), encoding, model


async def read_embeddings_request(
    request: Request,
    model: str,
    dim: int,
    max_bytes: int,
    max_images: int,
    hold: BodyHold | None = None,
) -> tuple[list[Upload], str]:
    """`read_embeddings` for a server of one model: the images and the encoding_format."""
    images, encoding, _ = await read_embeddings(request, {model: dim}, max_bytes, max_images, hold)
    return images, encoding


def embeddings_response(emb: np.ndarray, model: str, encoding: str) -> dict[str, Any]:
    """The OpenAI answer: one embedding per input in order, floats or base64 of little-endian
    float32. Images are not tokens: `usage` counts 0 prompt and total tokens."""
    if encoding == "base64":
        rows = np.ascontiguousarray(emb, dtype="<f4")
        vectors: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        vectors = list(np.ascontiguousarray(emb, dtype=np.float32))
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }
