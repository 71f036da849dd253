"""Reading a request's images and fields (`k`, `metadata`), all bounded: a multipart form, or a
JSON body (embedserve.http.jsonbody) with the same fields and the images base64-encoded.

Every problem is a ClientError that says what to send instead: 413 for a body or an image
count over its limit, 415 for a body that is neither multipart/form-data nor JSON, 400 for the
rest.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from embedserve.http.errors import ClientError
from embedserve.http.jsonbody import is_json, media_type, read_json_form
from embedserve.http.limits import BodyHold, body_hold, check_count, check_length, read_body

# An uploaded image as read: (its file name, if the client gave one; its bytes).
Upload = tuple[str | None, bytes]

# What a stored path or label may be: text of bounded length without control characters (a
# path is only ever stored and returned, never opened, joined or written to).
MAX_PATH_CHARS = 1024
MAX_LABEL_CHARS = 256
# How often a repeatable field (a label to filter by, an id or path to delete) may be given.
MAX_LIST_ITEMS = 1000
URLENCODED = "application/x-www-form-urlencoded"


def client_name(position: int, filename: str | None, field: str = "images") -> str:
    """How an error names a file: `images[1] (scan.pdf)`; `images[1]` (or `input[1]`, after
    its field) when it has no name, as a JSON body's images."""
    return f"{field}[{position}] ({filename})" if filename else f"{field}[{position}]"


async def read_form(
    request: Request,
    max_bytes: int,
    fields: tuple[str, ...],
    max_files: int = 10_000,
    hold: BodyHold | None = None,
    lists: tuple[str, ...] = (),
    images_required: bool = True,
) -> tuple[list[Upload], dict[str, Any]]:
    """The uploaded images (filename, bytes) and the text fields of a multipart request.

    Everything stays in memory, bounded: a body over `max_bytes` is refused by its
    Content-Length, or while it streams in when it has none (chunked). Then the body must be
    multipart/form-data (415) that parses (400), with its images as files in the field `images`
    (400: missing unless not `images_required`, sent as text, or a misspelt field) and no field
    other than `fields`. A field of `lists` may be repeated (its value is the list of what was
    sent, at most MAX_LIST_ITEMS); any other is given once.
    More than `max_files` file parts stop the parser at once (413), and more text parts than
    the form has fields (400): a body of a million tiny parts costs no more than its bytes.
    With `hold`, the body's bytes are taken from the worker's body budget first (503 when they
    would pass it).
    """
    check_length(request, max_bytes)  # a body over the limit is a 413 whatever its type
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise ClientError(415, unsupported_type(media_type, fields, images_required))
    body = await read_body(request, max_bytes, hold)

    async def stream():
        yield body

    try:
        form = await MultiPartParser(
            request.headers,
            stream(),
            max_files=max_files,
            max_fields=len(fields) + (MAX_LIST_ITEMS * len(lists)),
            max_part_size=len(body) + 1,
        ).parse()
    except (MultiPartException, ValueError) as e:
        if str(e).startswith("Too many files"):
            raise ClientError(
                413,
                f"more than {max_files} files in one request, over the limit of "
                f"{max_files - 1} images (max_images_per_request)",
                reason="max_images_per_request",
            ) from None
        raise ClientError(400, f"malformed multipart body: {e}") from None
    try:
        check_known(form.keys(), fields)
        images = []
        for i, value in enumerate(form.getlist("images")):
            if not isinstance(value, UploadFile):
                raise ClientError(
                    400,
                    f"images[{i}] is a text value, not a file: upload the image itself "
                    "(curl -F images=@photo.jpg); URLs are not fetched",
                )
            images.append((value.filename, await value.read()))
        if not images and images_required:
            raise ClientError(400, "missing field 'images': send one or more image files in it")
        values = {}
        for name in fields:
            if name == "images" or name not in form:
                continue
            given = form.getlist(name)
            if name in lists:
                if any(isinstance(g, UploadFile) for g in given):
                    raise ClientError(400, f"field {name!r} must be given as values, not files")
                values[name] = list(given)
            elif len(given) > 1 or isinstance(given[0], UploadFile):
                raise ClientError(400, f"field {name!r} must be given once, as a value")
            else:
                values[name] = given[0]
        return images, values
    finally:
        await form.close()


def unsupported_type(media: str, fields: tuple[str, ...], images_required: bool = True) -> str:
    """The 415 message for a body of type `media`: what the endpoint takes instead."""
    given = f"Content-Type {media or 'missing'}: send "
    if "images" not in fields:
        return (
            given + "a form (application/x-www-form-urlencoded or multipart/form-data) or "
            "application/json"
        )
    text = given + (
        "multipart/form-data with the images as files in the field 'images' (curl -F "
        "images=@photo.jpg), or application/json with them base64-encoded "
        '({"images": ["data:image/jpeg;base64,..."]})'
    )
    if not images_required:
        text += (
            "; to search by a stored item's id, application/x-www-form-urlencoded too "
            "(curl -d id=42)"
        )
    return text


def check_known(names: Any, fields: tuple[str, ...]) -> None:
    """400 naming every field sent that is not one of `fields`."""
    unknown = sorted(set(names) - set(fields))
    if unknown:
        raise ClientError(
            400,
            f"unknown field(s) {', '.join(repr(u[:100]) for u in unknown)}; this endpoint takes "
            + ", ".join(map(repr, fields)),
        )


async def read_urlencoded(
    request: Request,
    max_bytes: int,
    fields: tuple[str, ...],
    hold: BodyHold | None = None,
    lists: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The fields of an application/x-www-form-urlencoded body (no images: a URL-encoded form
    carries no files), checked as a multipart form's text fields are."""
    body = await read_body(request, max_bytes, hold)
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=len(fields) + MAX_LIST_ITEMS * len(lists),
        )
    except UnicodeDecodeError:
        raise ClientError(400, "the URL-encoded form is not UTF-8") from None
    except ValueError as e:  # more fields than allowed
        raise ClientError(400, f"malformed URL-encoded form: {e}") from None
    if any(name == "images" for name, _ in pairs):
        raise ClientError(
            400,
            "images cannot be sent in a URL-encoded form: upload them as files in a multipart "
            "form (curl -F images=@photo.jpg); URLs are not fetched",
        )
    check_known((name for name, _ in pairs), fields)
    values: dict[str, Any] = {}
    for name, value in pairs:
        if name in lists:
            values.setdefault(name, []).append(value)
        elif name in values:
            raise ClientError(400, f"field {name!r} must be given once, as a value")
        else:
            values[name] = value
    return values


async def read_images(
    request: Request,
    fields: tuple[str, ...],
    max_bytes: int,
    max_images: int,
    lists: tuple[str, ...] = (),
    images_required: bool = True,
) -> tuple[list[Upload], dict[str, Any]]:
    """`read_form`, or `read_json_form` for a JSON body, with the service's limits and the
    request's BodyHold (from RequestLimits), then at most `max_images` images. A form's
    values are strings (a list of them for a field of `lists`); a JSON body's are as sent (`k`
    a number, `metadata` an array). Without `images_required`, the images may be absent, and
    a URL-encoded form (no images at all) is read too."""
    hold = body_hold(request)
    if is_json(request):
        return await read_json_form(
            request, fields, max_bytes, max_images, hold, images_required=images_required
        )
    if not images_required and media_type(request) == URLENCODED:
        return [], await read_urlencoded(request, max_bytes, fields, hold, lists)
    # one file part over the limit is still counted exactly (a 413 that says how many)
    images, values = await read_form(
        request,
        max_bytes,
        fields,
        max_files=max_images + 1,
        hold=hold,
        lists=lists,
        images_required=images_required,
    )
    check_count(images, max_images)
    return images, values


def parse_k(raw: str | int, max_k: int) -> int:
    """The `k` field of /search (a form's text, or a JSON number): an integer in 1..max_k (400
    otherwise)."""
    try:
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise ValueError
        k = int(raw)
    except ValueError:
        raise ClientError(400, f"k must be an integer, not {raw!r}") from None
    if not 1 <= k <= max_k:
        raise ClientError(400, f"k must be between 1 and {max_k} (max_k), not {k}")
    return k


def clean_text(value: Any, what: str, limit: int) -> str | None:
    """A path or label to store: None, or a string of at most `limit` characters without
    control characters (400 otherwise)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ClientError(400, f"{what} must be a string or null, not {type(value).__name__}")
    if len(value) > limit:
        raise ClientError(400, f"{what} is {len(value)} characters, over the limit of {limit}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ClientError(400, f"{what} contains control characters")
    return value


def parse_metadata(
    raw: str | list | None, images: list[Upload]
) -> tuple[list[str | None], list[str | None]]:
    """Paths and labels of the images to add, from the `metadata` field (a JSON array with one
    {"path", "label"} object per image: a form's text, or the array itself in a JSON body) or,
    without it, the uploaded files' names (none for a JSON body's images)."""
    if raw is None:
        paths = [
            clean_text(name, f"images[{i}]'s file name", MAX_PATH_CHARS)
            for i, (name, _) in enumerate(images)
        ]
        return paths, [None] * len(images)
    try:
        items = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as e:
        raise ClientError(400, f"metadata is not valid JSON: {e}") from None
    if not isinstance(items, list) or len(items) != len(images):
        raise ClientError(
            400,
            f"metadata must be a JSON array with one object per image ({len(images)}), "
            '[{"path": ..., "label": ...}, ...]',
        )
    paths, labels = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"path", "label"}:
            raise ClientError(400, f'metadata[{i}] must be an object with only "path" and "label"')
        paths.append(clean_text(item.get("path"), f"metadata[{i}].path", MAX_PATH_CHARS))
        labels.append(clean_text(item.get("label"), f"metadata[{i}].label", MAX_LABEL_CHARS))
    return paths, labels
