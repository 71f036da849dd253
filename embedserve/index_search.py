"""The read side of a search index: searches (filtered, by a stored item) and item lookups.

`IndexReads` is a base of `embedserve.index.SearchIndex`, split out to keep each module to one
job. Its methods run under the index's read lock, so any number run at once and each sees the
index before or after a change, never during one. Deleted items are never returned: every
search passes FAISS a selector of the live (and, with a filter, matching) ids, unless every id
FAISS holds is live and matches (embedserve.index_ids.search, embedserve.index_meta.filter).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from embedserve import index_ids
from embedserve.index_format import ItemNotFound
from embedserve.index_meta import MetadataStore
from embedserve.rwlock import ReadWriteLock


def check_embeddings(embeddings: np.ndarray, dim: int) -> np.ndarray:
    """Query or stored vectors as float32 [N, dim], C-contiguous (a copy only when needed;
    never mutated); ValueError for another shape or a non-finite value."""
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"embeddings must be [N, {dim}], got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings must be finite")
    return np.ascontiguousarray(x, dtype=np.float32)


def prepare_items(
    embeddings: np.ndarray, dim: int, paths: Any, labels: Any, thumbnails: Any
) -> tuple[np.ndarray, list, list, list]:
    """The vectors (check_embeddings) and one path, label and thumbnail per vector (text or
    None, bytes or None; None for all when not given); ValueError when the counts differ."""
    x = check_embeddings(embeddings, dim)
    n = len(x)
    paths = [None] * n if paths is None else [None if p is None else str(p) for p in paths]
    labels = [None] * n if labels is None else [None if v is None else str(v) for v in labels]
    thumbs = (
        [None] * n if thumbnails is None else [None if t is None else bytes(t) for t in thumbnails]
    )
    if not len(paths) == len(labels) == len(thumbs) == n:
        raise ValueError(
            f"{n} embeddings but {len(paths)} paths, {len(labels)} labels and "
            f"{len(thumbs)} thumbnails"
        )
    return x, paths, labels, thumbs


class IndexReads:
    """Searches and lookups over `self.index` (FAISS) and `self._meta` (MetadataStore)."""

    index: faiss.Index
    _meta: MetadataStore
    _lock: ReadWriteLock
    dim: int

    def search(
        self,
        embeddings: np.ndarray,
        k: int = 10,
        labels: Sequence[str] | None = None,
        path_prefix: str | None = None,
        min_score: float | None = None,
        exclude_ids: Sequence[int] | None = None,
    ) -> list[list[dict[str, Any]]]:
        """The k nearest live items of each query [N, D], best first: {"id", "score", "path",
        "label"}; only items whose label is in `labels` and whose path starts with
        `path_prefix` (None or empty: no such condition; on a Flat index the answer is the
        exact top-k among the matching items), with a score of at least `min_score`, and none
        of `exclude_ids`.

        Fewer than k hits come back when fewer match (no placeholder ids).
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        x = check_embeddings(embeddings, self.dim)
        with self._lock.read():
            return self._search(x, k, labels, path_prefix, min_score, exclude_ids)

    def _search(self, x, k, labels, path_prefix, min_score, exclude_ids):
        exclude = {int(i) for i in exclude_ids or ()}
        flt = self._meta.filter(labels, path_prefix)
        matching = self._meta.count if flt is None else flt.count
        if len(x) == 0 or matching == 0:
            return [[] for _ in range(len(x))]
        kk = min(k + len(exclude), matching)
        scores, ids = (
            self.index.search(x, kk)
            if flt is None
            else index_ids.search(self.index, x, kk, flt.mask, flt.bits, flt.count)
        )
        keep = [
            [
                (float(s), int(i))
                for s, i in zip(score_row, id_row, strict=True)
                if i >= 0
                and i not in exclude
                and self._meta.is_live(int(i))
                and (min_score is None or s >= min_score)
            ][:k]
            for score_row, id_row in zip(scores, ids, strict=True)
        ]
        rows = self._meta.rows({i for row in keep for _, i in row})
        return [
            [{"id": i, "score": s, "path": rows[i][0], "label": rows[i][1]} for s, i in row]
            for row in keep
        ]

    def search_by_id(
        self,
        item_id: int,
        k: int = 10,
        labels: Sequence[str] | None = None,
        path_prefix: str | None = None,
        min_score: float | None = None,
    ) -> list[dict[str, Any]]:
        """ "More like this": the k nearest items of a stored item (its stored vector as the
        query; approximate for compressed indexes), the item itself excluded. ItemNotFound (a
        KeyError) when no live item has this id."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        with self._lock.read():
            if not self._meta.is_live(int(item_id)):
                raise ItemNotFound(f"no item with id {item_id} in the index")
            x = index_ids.reconstruct(self.index, int(item_id))
            return self._search(x, k, labels, path_prefix, min_score, [int(item_id)])[0]

    def search_ids(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw FAISS answer among the live items: scores float32 [N, k], ids int64 [N, k]
        (-1 where none)."""
        x = check_embeddings(embeddings, self.dim)
        with self._lock.read():
            flt = self._meta.filter()
            if flt is None:
                return self.index.search(x, k)
            return index_ids.search(self.index, x, k, flt.mask, flt.bits, flt.count)

    def item(self, item_id: int) -> dict[str, Any] | None:
        """{"id", "path", "label"} of a live item; None if no live item has this id."""
        with self._lock.read():
            if not self._meta.is_live(int(item_id)):
                return None
            path, label = self._meta.rows([int(item_id)])[int(item_id)]
        return {"id": int(item_id), "path": path, "label": label}

    def thumbnail(self, item_id: int) -> bytes | None:
        """The thumbnail (JPEG bytes) of a live item; None if none is stored or no such item."""
        with self._lock.read():
            return self._meta.thumbnail(int(item_id)) if self._meta.is_live(int(item_id)) else None

    def labels(self) -> dict[str, int]:
        """The number of live items of each label (items without one not counted)."""
        with self._lock.read():
            return self._meta.label_counts()

    def live_ids(self) -> np.ndarray:
        """The ids of the live items, ascending (int64)."""
        with self._lock.read():
            return self._meta.live_ids()

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of live items, float32 [N, D] (as FAISS reconstructs them:
        approximate for compressed indexes); KeyError for an id of no live item."""
        with self._lock.read():
            dead = [int(i) for i in ids if not self._meta.is_live(int(i))]
            if dead:
                raise ItemNotFound(f"no live items with ids {dead[:10]}")
            rows = [index_ids.reconstruct(self.index, int(i)) for i in ids]
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)

    def metadata(self, ids: Sequence[int]) -> list[tuple[str | None, str | None]]:
        """(path, label) of each id; KeyError for an id of no live item."""
        ids = [int(i) for i in ids]
        with self._lock.read():
            dead = [i for i in ids if not self._meta.is_live(i)]
            if dead:
                raise ItemNotFound(f"no live items with ids {dead[:10]}")
            rows = self._meta.rows(set(ids))
        return [rows[i] for i in ids]
