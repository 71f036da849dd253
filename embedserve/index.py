"""A FAISS similarity-search index with its metadata, persisted atomically.

    index = SearchIndex.create(package, factory="Flat")     # exact inner product
    ids = index.add(embeddings, paths, labels, thumbnails)  # ids 0, 1, 2, ... never reused
    index.delete(ids=[3], paths=["img/9.png"])              # tombstones: gone from every search
    index.add(embeddings, paths, replace=True)              # the items stored under these paths
                                                            # are replaced, atomically
    index.save("indexes/photos")                            # compacts, then atomic: old or new
    index = SearchIndex.load("indexes/photos", package)     # refuses another model's index
    hits = index.search(query_embeddings, k=10, labels=["cat"], path_prefix="2024/",
                        min_score=0.3)                      # [[{"id", "score", "path", "label"}]]
    hits = index.search_by_id(7, k=10)                      # "more like this": 7 excluded
    index.item(7), index.thumbnail(7), index.labels()       # a row, JPEG bytes, counts per label

Embeddings are L2-normalized, so the metric is the inner product (= cosine similarity). The
factory string is any FAISS index-factory string ("Flat", "IVF256,Flat", "HNSW32",
"IVF256,PQ32", ...); an index that needs training is trained on the first batch it is given.

An index is a folder of immutable versions and a pointer to the live one (the format:
embedserve.index_format). A save writes a new version in a temporary folder, fsyncs it, renames
it into place, then replaces CURRENT atomically (os.replace) and removes the old version. A
crash at any point leaves CURRENT naming a complete version: the old one until the replace, the
new one after. Ids are explicit FAISS ids (embedserve.index_ids), given in order of addition
and never reused; deletions are tombstones excluded from every search by a FAISS selector until
a compaction (every save) removes the vectors, rows and thumbnails for good. Filters are
selectors too, so a filtered search on a Flat index is the exact top-k among the matching
items. Metadata (paths, labels, thumbnails, liveness): embedserve.index_meta. Changes that must
be durable at once go to a write-ahead log (embedserve.index_log), replayed by `load` and
emptied by a save.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embedserve import index_ids
from embedserve.index_format import (
    CURRENT_FILE,
    DEFAULT_FACTORY,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    LOCK_FILE,
    LOG_FILE,
    LOG_LOCK_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    METRIC,
    IndexBusyError,
    IndexMismatchError,
    ItemNotFound,
    SearchIndexError,
    check_manifest,
    check_model,
    new_manifest,
    now,
)
from embedserve.index_ids import build_faiss_index, set_search_parameters
from embedserve.index_log import DELETE, WriteAheadLog, log_for_save, read_log
from embedserve.index_meta import MetadataStore
from embedserve.index_search import IndexReads, prepare_items
from embedserve.index_versions import read_version, write_version
from embedserve.package import ModelPackage
from embedserve.rwlock import ReadWriteLock

# Re-exported: the names of the format and the log were defined here before they moved.
__all__ = [
    "CURRENT_FILE",
    "DEFAULT_FACTORY",
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "LOCK_FILE",
    "LOG_FILE",
    "LOG_LOCK_FILE",
    "MANIFEST_FILE",
    "METADATA_FILE",
    "METRIC",
    "AddResult",
    "DeleteResult",
    "IndexBusyError",
    "IndexMismatchError",
    "ItemNotFound",
    "SearchIndex",
    "SearchIndexError",
    "WriteAheadLog",
    "build_faiss_index",
    "read_log",
    "set_search_parameters",
]


def _save_checkpoint(step: str) -> None:
    """Called between the steps of a save; tests replace it to kill a save half-way."""


@dataclass
class AddResult:
    """The ids given to the added items, and the ids of the items they replaced."""

    ids: np.ndarray
    replaced: list[int] = field(default_factory=list)


@dataclass
class DeleteResult:
    """The ids deleted; the ids and paths asked for that named no live item."""

    deleted: list[int] = field(default_factory=list)
    missing_ids: list[int] = field(default_factory=list)
    missing_paths: list[str] = field(default_factory=list)


def resolve_delete(
    ids: Sequence[int] | int,
    paths: Sequence[str] | str,
    live: Callable[[list[int]], set[int]],
    by_path: Callable[[list[str]], dict[str, list[int]]],
) -> DeleteResult:
    """What deleting `ids` and `paths` deletes (each live id, every live item of each path; in
    order, once) and what names nothing, given the backend's `live` (the live ones of some
    ids) and `by_path` (the live ids of each path); ValueError for an id that is no integer."""
    ids = [ids] if isinstance(ids, int) else list(ids)
    paths = [paths] if isinstance(paths, str) else [str(p) for p in paths]
    for i in ids:
        if isinstance(i, bool) or int(i) != i:
            raise ValueError(f"ids are integers, not {i!r}")
    alive = live(list(dict.fromkeys(int(i) for i in ids)))
    result = DeleteResult()
    chosen: dict[int, None] = {}  # ordered, unique
    for i in map(int, ids):
        if i in alive:
            chosen.setdefault(i)
        else:
            result.missing_ids.append(i)
    found = by_path(paths)
    for path in paths:
        if not found[path]:
            result.missing_paths.append(path)
        for i in found[path]:
            chosen.setdefault(i)
    result.deleted = list(chosen)
    return result


class SearchIndex(IndexReads):
    """A FAISS index over one model's embeddings, with each vector's path, label and thumbnail.

    Build one with `create` + `add`, or `load` a saved one. `search` may run in several threads
    at once; changes (add, delete, compact, save) run one at a time, wait for running searches
    and block new ones while they change the index in memory (a search sees the index before
    or after a change, never during one; a save's file writing and an HNSW rebuild do not
    block searches).
    """

    def __init__(
        self,
        faiss_index: faiss.Index,
        manifest: dict[str, Any],
        metadata_db: Path | None = None,
    ) -> None:
        self.index = faiss_index
        self.manifest = manifest
        self._lock = ReadWriteLock()
        self._writer = threading.RLock()  # one change at a time: ids and log in one order
        self._meta = MetadataStore()
        self._log: WriteAheadLog | None = None  # open_log: add_durable appends here
        self._log_folder: Path | None = None
        self.replayed = 0  # vectors added from the write-ahead log by load
        self.replayed_deletions = 0  # items deleted by the write-ahead log's records
        self.last_replaced: list[int] = []  # the ids the last add(replace=True) replaced
        self._saved_rows = 0
        if metadata_db is not None:
            self._saved_rows = self._meta.open(metadata_db)
        self._meta.reserve(manifest.get("next_id", manifest["count"]))
        try:
            set_search_parameters(self.index, **manifest.get("search_parameters", {}))
        except RuntimeError as e:
            raise SearchIndexError(
                f"search parameters {manifest['search_parameters']} do not apply to a "
                f"{manifest['factory']!r} index: {e}"
            ) from e

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        package: ModelPackage,
        factory: str = DEFAULT_FACTORY,
        search_parameters: dict[str, int] | None = None,
    ) -> SearchIndex:
        """An empty index for `package`'s embeddings.

        `search_parameters` (e.g. {"nprobe": 16} for IVF, {"efSearch": 64} for HNSW) are saved in
        the manifest and set whenever the index is loaded, so every searcher gets the same answer.
        """
        manifest = new_manifest(package, factory, search_parameters)
        return cls(index_ids.build_id_index(package.embedding_dim, factory), manifest)

    @classmethod
    def load(cls, path: str | os.PathLike, package: ModelPackage | None = None) -> SearchIndex:
        """Open a saved index; with `package`, refuse one built with another model. A version
        written before deletes existed (format 1) is converted in memory; the next save
        writes the current format."""
        path = Path(path)
        version, manifest, faiss_index = read_version(path)
        check_manifest(manifest, version, faiss_index.d, faiss_index.ntotal)
        if manifest["format_version"] == 1:
            faiss_index = index_ids.convert_v1(faiss_index)
            manifest = {**manifest, "format_version": FORMAT_VERSION, "next_id": manifest["count"]}
        index = cls(faiss_index, manifest, version / METADATA_FILE)
        if index._saved_rows != manifest["count"]:
            raise SearchIndexError(
                f"{version / METADATA_FILE}: {index._saved_rows} rows, the manifest says "
                f"{manifest['count']}"
            )
        if package is not None:
            index.check_model(package, where=str(path))
        index._replay(path)
        return index

    def _replay(self, folder: Path) -> None:
        """Apply the log's records that the loaded version does not hold yet: additions beyond
        its next_id, and every deletion (deleting a deleted id changes nothing)."""
        records, _ = read_log(folder / LOG_FILE, self.dim)
        for record in records:
            if record.kind == DELETE:
                ids = [i for i in record.ids if self._meta.is_live(i)]
                self._apply_delete(ids)
                self.replayed_deletions += len(ids)
                continue
            n, have = len(record.x), self.next_id
            if record.first + n <= have:
                continue  # saved in the live version already (a crash before the log was emptied)
            if record.first > have:
                raise SearchIndexError(
                    f"{folder / LOG_FILE}: a record starts at id {record.first}, but the index "
                    f"gives ids only up to {have - 1}: additions are missing"
                )
            skip = have - record.first
            paths, labels = zip(*record.items[skip:], strict=True)
            thumbs = record.thumbnails[skip:] or [None] * (n - skip)
            replaced = [i for i in record.replaced if self._meta.is_live(i)]
            self._apply_add(record.x[skip:], list(paths), list(labels), thumbs, replaced)
            self.replayed += n - skip
            self.replayed_deletions += len(replaced)

    def check_model(self, package: ModelPackage, where: str = "index") -> None:
        """Raise IndexMismatchError unless the index was built with `package`'s model."""
        check_model(self.manifest, package, where)

    # -- properties -------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def ntotal(self) -> int:
        """The number of live items (deleted ones not counted, even before a compaction)."""
        return self._meta.count

    @property
    def next_id(self) -> int:
        """The id the next item added gets; ids are never reused."""
        return self._meta.next_id

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        m = self.manifest
        return f"SearchIndex({m['factory']!r}, {self.ntotal} x {self.dim}, model {m['model']['name']!r})"

    # -- adding and deleting ----------------------------------------------------------------

    def _replaced_by(self, paths: Sequence[str | None]) -> list[int]:
        found = self._meta.live_ids_by_path({p for p in paths if p is not None})
        return sorted({i for ids in found.values() for i in ids})

    def add(
        self,
        embeddings: np.ndarray,
        paths: Sequence[str | os.PathLike | None] | None = None,
        labels: Sequence[str | None] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        replace: bool = False,
    ) -> np.ndarray:
        """Append vectors [N, D] with their paths, labels and thumbnails (JPEG bytes or None);
        returns their ids (int64 [N]). With `replace`, the live items stored under any of these
        paths are deleted at the same moment (their ids: `last_replaced`).

        An index that needs training (IVF, PQ) is trained on the first vectors it is given.
        """
        x, paths, labels, thumbs = prepare_items(embeddings, self.dim, paths, labels, thumbnails)
        with self._writer:
            replaced = self._replaced_by(paths) if replace else []
            ids = self._apply_add(x, paths, labels, thumbs, replaced)
            self.last_replaced = replaced
        return ids

    def _apply_add(self, x, paths, labels, thumbs, replaced: list[int]) -> np.ndarray:
        first = self.next_id
        ids = np.arange(first, first + len(x), dtype=np.int64)
        with self._lock.write():
            if len(x):
                index_ids.add_with_ids(self.index, x, ids, self.manifest["factory"])
                self._meta.add(ids, paths, labels, thumbs)
            self._meta.delete(replaced)
            self._touch()
        return ids

    def _touch(self) -> None:
        self.manifest["count"] = self._meta.count
        self.manifest["next_id"] = self._meta.next_id
        self.manifest["updated"] = now()

    def delete(self, ids: Sequence[int] = (), paths: Sequence[str] = ()) -> DeleteResult:
        """Delete items by id and by path (a path: every live item stored with it). They are
        never returned again from this call on; compact/save removes them for good."""
        with self._writer:
            result = self._resolve_delete(ids, paths)
            self._apply_delete(result.deleted)
        return result

    def _resolve_delete(self, ids: Sequence[int], paths: Sequence[str]) -> DeleteResult:
        live = lambda wanted: {i for i in wanted if self._meta.is_live(i)}  # noqa: E731
        return resolve_delete(ids, paths, live, self._meta.live_ids_by_path)

    def _apply_delete(self, ids: list[int]) -> None:
        if ids:
            with self._lock.write():
                self._meta.delete(ids)
                self._touch()

    def compact(self) -> int:
        """Remove the vectors and pending rows and thumbnails of deleted items for good (the
        saved rows go at the next save, which compacts anyway); returns how many."""
        with self._writer:
            return self._compact()

    def _compact(self) -> int:
        """(Holding self._writer.) Searches go on while an index is rebuilt (HNSW: from the
        old one, which nothing changes meanwhile); they wait only for the swap or the in-place
        removal, and never see a deleted item: its tombstone stays until its vector is gone."""
        ids = np.asarray(sorted(self._meta.tombstones), np.int64)
        if not len(ids):
            return 0
        factory = self.manifest["factory"]
        if index_ids.needs_rebuild(self.index):
            fresh = index_ids.rebuild(self.index, ids, factory)
            with self._lock.write():
                self.index = fresh
                self._meta.compacted(ids.tolist())
        else:
            with self._lock.write():
                self.index = index_ids.remove(self.index, ids, factory)
                self._meta.compacted(ids.tolist())
        return len(ids)

    # -- the write-ahead log ----------------------------------------------------------------

    def open_log(self, folder: str | os.PathLike) -> None:
        """Become the one process that appends to `folder`'s write-ahead log (add_durable)."""
        if self._log is not None:
            raise SearchIndexError(f"the log of {self._log_folder} is open already")
        self._log = WriteAheadLog(folder, self.dim)
        self._log_folder = Path(folder)

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = self._log_folder = None

    @property
    def log_size(self) -> int:
        """Bytes in the open write-ahead log (0 without one)."""
        return 0 if self._log is None else self._log.size

    def _need_log(self) -> WriteAheadLog:
        if self._log is None:
            raise SearchIndexError("no write-ahead log is open (open_log first)")
        return self._log

    def add_durable(
        self,
        embeddings: np.ndarray,
        paths: Sequence[str | None] | None = None,
        labels: Sequence[str | None] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        replace: bool = False,
    ) -> AddResult:
        """`add`, durably: the items (and the replacement) are in the fsynced write-ahead log
        when this returns, and searchable at once. Searches run meanwhile see the index before
        or after the change (the old items or the new), never half of it."""
        log = self._need_log()
        x, paths, labels, thumbs = prepare_items(embeddings, self.dim, paths, labels, thumbnails)
        if not self.index.is_trained:
            raise SearchIndexError("the index is not trained yet: build it with images first")
        with self._writer:
            replaced = self._replaced_by(paths) if replace else []
            items = list(zip(paths, labels, strict=True))
            size = log.size
            log.append(self.next_id, x, items, thumbs, replaced)
            try:
                ids = self._apply_add(x, paths, labels, thumbs, replaced)
            except BaseException:
                log.truncate(size)  # not added: the record must not be replayed either
                raise
        return AddResult(ids, replaced)

    def delete_durable(self, ids: Sequence[int] = (), paths: Sequence[str] = ()) -> DeleteResult:
        """`delete`, durably: the deletion is in the fsynced write-ahead log when this returns."""
        log = self._need_log()
        with self._writer:
            result = self._resolve_delete(ids, paths)
            if result.deleted:
                log.append_delete(result.deleted)
            self._apply_delete(result.deleted)
        return result

    # -- saving -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to the folder `path` atomically; returns the new version's folder.

        Deleted items are compacted away first (their vectors, rows and thumbnails). Searches in
        this process go on meanwhile. Readers of the folder see the old version until the new
        one is complete; a crash at any point leaves one of them live. One writer at a time per
        folder (an flock on INDEX_DIR/.lock).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        open_log = self._log if self._log_folder == path else None
        with self._writer, log_for_save(path, self.dim, open_log) as log:
            return self._save(path, log)

    def _save(self, path: Path, log: WriteAheadLog | None) -> Path:
        # Holding self._writer: nothing changes the index meanwhile, so searches go on while
        # the files are written; they wait only while the new version's metadata is swapped in.
        with open(path / LOCK_FILE, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            self._compact()  # a version never holds a deleted item
            self.manifest["format_version"] = FORMAT_VERSION
            self._touch()
            if self.index.ntotal != self._meta.count:
                raise SearchIndexError(
                    f"the FAISS index holds {self.index.ntotal} vectors, {self._meta.count} items "
                    "are live: not saved"
                )

            def committed(version: Path) -> None:
                with self._lock.write():
                    self._meta.saved(version / METADATA_FILE)
                if log is not None:
                    # Everything in the log is in the new version now (this process replayed it
                    # or added it). A crash before this line leaves records the next load skips
                    # (additions) or repeats harmlessly (deletions).
                    log.empty()
                    _save_checkpoint("log-emptied")

            return write_version(
                path,
                self.index,
                self.manifest,
                self._meta.write,
                committed,
                lambda step: _save_checkpoint(step),  # looked up at each call: tests replace it
            )
