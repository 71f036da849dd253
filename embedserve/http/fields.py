"""The index's request fields, checked: search filters (`label`, `path_prefix`, `min_score`), a
stored item's `id`, `replace`, and what to delete (`id`/`path`, `ids`/`paths` in JSON).

A form's value is text (a repeatable field's, a list of texts); a JSON body's is as sent. Each
problem is a 400 that names the field and what it takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from embedserve.http.errors import ClientError
from embedserve.http.forms import MAX_LABEL_CHARS, MAX_LIST_ITEMS, MAX_PATH_CHARS, clean_text
from embedserve.http.jsonbody import json_kind

MAX_ID = 2**63 - 1  # ids are int64


@dataclass(frozen=True)
class Filters:
    """What a search keeps: items whose label is one of `labels`, whose path starts with
    `path_prefix`, with a score of at least `min_score` (None: no such condition)."""

    labels: list[str] | None = None
    path_prefix: str | None = None
    min_score: float | None = None

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of SearchIndex.search / search_by_id."""
        return {"labels": self.labels, "path_prefix": self.path_prefix, "min_score": self.min_score}


def as_list(value: Any, name: str) -> list[Any]:
    """A repeatable field's values: a form's list, or a JSON value or array (400 when more than
    MAX_LIST_ITEMS)."""
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_LIST_ITEMS:
        raise ClientError(
            400, f"{name} is given {len(items)} times, over the limit of {MAX_LIST_ITEMS}"
        )
    return items


def parse_item_id(raw: Any, name: str = "id") -> int:
    """A stored item's id: a non-negative integer (a form's text, a JSON number, a path's
    segment); 400 otherwise."""
    if isinstance(raw, bool):
        raise ClientError(400, f"{name} must be an integer id, not {json_kind(raw)}")
    if isinstance(raw, str):
        text = raw.strip()
        if not (text.isascii() and text.isdigit()):
            raise ClientError(400, f"{name} must be a non-negative integer id, not {raw[:50]!r}")
        value = int(text)
    elif isinstance(raw, int):
        value = raw
    else:
        raise ClientError(400, f"{name} must be an integer id, not {json_kind(raw)}")
    if not 0 <= value <= MAX_ID:
        raise ClientError(400, f"{name} must be an id between 0 and {MAX_ID}, not {value}")
    return value


def parse_min_score(raw: Any) -> float:
    """`min_score`: a number in [-1, 1] (cosine similarity); 400 otherwise."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ClientError(400, f"min_score must be a number, not {json_kind(raw)}")
    try:
        value = float(raw)
    except OverflowError:  # an integer too large for a float: out of range anyway
        value = math.inf
    except ValueError:
        raise ClientError(400, f"min_score must be a number, not {raw[:50]!r}") from None
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        shown = raw[:50] if isinstance(raw, str) else value
        raise ClientError(
            400, f"min_score must be between -1 and 1 (a cosine similarity), not {shown!r}"
        )
    return value


def parse_filters(values: dict[str, Any]) -> Filters:
    """The filters of a /search request: `label` (repeatable in a form; a string or an array
    in JSON), `path_prefix` (text), `min_score` (a number in [-1, 1])."""
    labels = None
    if values.get("label") is not None:
        items = as_list(values["label"], "label")
        if not items:
            raise ClientError(400, "label is an empty list: give one or more labels, or none")
        labels = []
        for i, value in enumerate(items):
            name = "label" if len(items) == 1 else f"label[{i}]"
            if not isinstance(value, str):
                raise ClientError(400, f"{name} must be a string, not {json_kind(value)}")
            labels.append(clean_text(value, name, MAX_LABEL_CHARS))
    prefix = values.get("path_prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise ClientError(400, f"path_prefix must be a string, not {json_kind(prefix)}")
    prefix = clean_text(prefix, "path_prefix", MAX_PATH_CHARS) or None
    min_score = None if values.get("min_score") is None else parse_min_score(values["min_score"])
    return Filters(labels, prefix, min_score)


def parse_bool(raw: Any, name: str) -> bool:
    """A yes/no field: a JSON boolean, or a form's text true/false (also 1/0, yes/no, on/off)."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", ""):
            return False
        raise ClientError(400, f"{name} must be true or false, not {raw[:50]!r}")
    raise ClientError(400, f"{name} must be true or false, not {json_kind(raw)}")


@dataclass(frozen=True)
class Targets:
    """What a delete request names: ids and paths."""

    ids: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def parse_targets(values: dict[str, Any]) -> Targets:
    """The ids and paths of POST /index/delete: a form's `id` and `path` (each repeatable), or
    JSON `ids` and `paths` (arrays; `id` and `path` are read the same way). 400 when it names
    none, or an id or a path is not one."""
    ids: list[int] = []
    paths: list[str] = []
    for name in ("id", "ids"):
        if values.get(name) is not None:
            items = as_list(values[name], name)
            ids += [parse_item_id(v, f"{name}[{i}]") for i, v in enumerate(items)]
    for name in ("path", "paths"):
        if values.get(name) is not None:
            for i, v in enumerate(as_list(values[name], name)):
                if not isinstance(v, str):
                    raise ClientError(400, f"{name}[{i}] must be a string, not {json_kind(v)}")
                paths.append(clean_text(v, f"{name}[{i}]", MAX_PATH_CHARS))
    if not ids and not paths:
        raise ClientError(
            400,
            "nothing to delete: send the ids (form field `id`, repeatable; JSON `ids`) and/or "
            "the stored paths (`path`; JSON `paths`) of the items",
        )
    return Targets(list(dict.fromkeys(ids)), list(dict.fromkeys(paths)))
