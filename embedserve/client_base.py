"""What embedserve.client's Client and AsyncClient share: the answers' types (Neighbour, Added,
Deleted, Item), APIError, the images as form files, the forms and bodies of the requests, and
the retry rule of a 503. See embedserve.client."""

from __future__ import annotations

import email.utils
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    """What `add` did: the new images' ids, in order, the index's size after it, and (with
    replace=True) the ids of the items replaced because they had a new image's path."""

    ids: list[int]
    index_size: int
    replaced: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Deleted:
    """What `delete` did: the ids deleted, the ids and paths that named no live item, and the
    index's size after it."""

    deleted: list[int]
    missing_ids: list[int]
    missing_paths: list[str]
    index_size: int


@dataclass(frozen=True)
class Item:
    """A stored item: its id, and the path and label stored with it."""

    id: int
    path: str | None
    label: str | None


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

    @staticmethod
    def _bytes(response: httpx.Response) -> bytes:
        if response.status_code >= 400:
            raise _error(response)
        return response.content

    def _model(self, model: str | None) -> dict[str, str]:
        """The form field that names the model: this call's, else the client's, else none."""
        model = model or self.model
        return {"model": model} if model else {}

    def _embed_form(self, images: Images, model: str | None) -> dict[str, Any]:
        return {"files": _files(images), "data": self._model(model)}

    def _search_fields(
        self,
        k: int,
        model: str | None,
        labels: str | Sequence[str] | None,
        path_prefix: str | None,
        min_score: float | None,
    ) -> dict[str, Any]:
        """The text fields of a search: `k`, the model, and the filters (a form repeats
        `label` once per label)."""
        data: dict[str, Any] = {"k": str(k), **self._model(model)}
        if labels is not None:
            data["label"] = [labels] if isinstance(labels, str) else list(labels)
            if not data["label"]:
                raise ValueError("labels is empty: give one or more labels, or None")
        if path_prefix is not None:
            data["path_prefix"] = path_prefix
        if min_score is not None:
            data["min_score"] = repr(float(min_score))
        return data

    def _search_form(
        self,
        images: Images,
        k: int,
        model: str | None = None,
        labels: str | Sequence[str] | None = None,
        path_prefix: str | None = None,
        min_score: float | None = None,
    ) -> dict[str, Any]:
        data = self._search_fields(k, model, labels, path_prefix, min_score)
        return {"files": _files(images), "data": data}

    def _by_id_form(
        self,
        item_id: int,
        k: int,
        model: str | None,
        labels: str | Sequence[str] | None,
        path_prefix: str | None,
        min_score: float | None,
    ) -> dict[str, Any]:
        """A URL-encoded form: search by a stored item's id, no images."""
        data = self._search_fields(k, model, labels, path_prefix, min_score)
        return {"data": {"id": str(_item_id(item_id)), **data}}

    @staticmethod
    def _delete_body(ids: int | Sequence[int] | None, paths: str | Sequence[str] | None) -> dict:
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        paths = [] if paths is None else [paths] if isinstance(paths, str) else list(paths)
        if not ids and not paths:
            raise ValueError("nothing to delete: give ids and/or paths")
        return {"json": {"ids": [_item_id(i) for i in ids], "paths": [str(p) for p in paths]}}

    def _add_form(
        self,
        images: Images,
        paths: Sequence[str | None] | None,
        labels: Sequence[str | None] | None,
        model: str | None = None,
        replace: bool = False,
    ) -> dict[str, Any]:
        items = [images] if _is_one(images) else list(images)
        if paths is None:  # a file's path as given; none for bytes, PIL images and arrays
            paths = [str(i) if isinstance(i, (str, os.PathLike)) else None for i in items]
        labels = [None] * len(items) if labels is None else labels
        if len(paths) != len(items) or len(labels) != len(items):
            raise ValueError(f"give one path and one label per image ({len(items)})")
        metadata = [{"path": p, "label": lb} for p, lb in zip(paths, labels, strict=True)]
        data = {"metadata": json.dumps(metadata), **self._model(model)}
        if replace:
            data["replace"] = "true"
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
        return Added(
            ids=[int(i) for i in body["ids"]],
            index_size=int(body["index_size"]),
            replaced=[int(i) for i in body.get("replaced", [])],
        )

    @staticmethod
    def _deleted(body: dict[str, Any]) -> Deleted:
        return Deleted(
            deleted=[int(i) for i in body["deleted"]],
            missing_ids=[int(i) for i in body["missing_ids"]],
            missing_paths=list(body["missing_paths"]),
            index_size=int(body["index_size"]),
        )

    @staticmethod
    def _item(body: dict[str, Any]) -> Item:
        return Item(int(body["id"]), body.get("path"), body.get("label"))


def _item_id(item_id: Any) -> int:
    """An item id as sent: a non-negative int (ValueError/TypeError before any request)."""
    if isinstance(item_id, bool) or not isinstance(item_id, int | np.integer):
        raise TypeError(f"an item id is an int, not {type(item_id).__name__}")
    if item_id < 0:
        raise ValueError(f"an item id is non-negative, not {item_id}")
    return int(item_id)
