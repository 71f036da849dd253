"""A FAISS similarity-search index with its metadata, persisted atomically.

    index = SearchIndex.create(package, factory="Flat")     # exact inner product
    ids = index.add(embeddings, paths, labels)              # ids 0, 1, 2, ... in order of addition
    index.save("indexes/photos")                            # atomic: old or new, never half
    index = SearchIndex.load("indexes/photos", package)     # refuses another model's index
    hits = index.search(query_embeddings, k=10)             # [[{"id", "score", "path", "label"}]]

Embeddings are L2-normalized, so the metric is the inner product (= cosine similarity). The
factory string is any FAISS index-factory string ("Flat", "IVF256,Flat", "HNSW32",
"IVF256,PQ32", ...); an index that needs training is trained on the first batch it is given.

An index is a folder of immutable versions and a pointer to the live one (the format:
embedserve.index_format). A save writes a new version in a temporary folder, fsyncs it, renames
it into place, then replaces CURRENT atomically (os.replace) and removes the old version. A
crash at any point leaves CURRENT naming a complete version: the old one until the replace, the
new one after. Ids are the FAISS sequential ids; items are only ever appended, so an id never
changes. Additions that must be durable at once go to a write-ahead log (embedserve.index_log),
replayed by `load` and emptied by a save.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

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
    SearchIndexError,
    check_manifest,
    check_model,
    fsync,
    new_manifest,
    now,
)
from embedserve.index_log import WriteAheadLog, read_log
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
    "IndexBusyError",
    "IndexMismatchError",
    "SearchIndex",
    "SearchIndexError",
    "WriteAheadLog",
    "build_faiss_index",
    "read_log",
    "set_search_parameters",
]

_SQL_CHUNK = 900  # ids per SELECT ... IN (...), below SQLite's variable limit


def _save_checkpoint(step: str) -> None:
    """Called between the steps of a save; tests replace it to kill a save half-way."""


def build_faiss_index(dim: int, factory: str = DEFAULT_FACTORY) -> faiss.Index:
    """An empty inner-product FAISS index from an index-factory string."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise SearchIndexError(f"invalid FAISS factory string {factory!r}: {e}") from e


def set_search_parameters(index: faiss.Index, **params: int) -> None:
    """Set search-time parameters (nprobe for IVF, efSearch for HNSW) on any FAISS index."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


class SearchIndex:
    """A FAISS index over one model's embeddings, with each vector's path and label.

    Build one with `create` + `add`, or `load` a saved one. `search` may run in several threads
    at once; `add` and `save` wait for running searches and block new ones while they run.
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
        self._db_lock = threading.Lock()  # one sqlite connection, shared by the search threads
        # Saved rows live in a read-only SQLite file; rows added since are in memory until saved.
        self._db: sqlite3.Connection | None = None
        self._saved_count = 0
        self._pending: list[tuple[str | None, str | None]] = []
        self._log: WriteAheadLog | None = None  # open_log: add_durable appends here
        self._log_folder: Path | None = None
        self._append_lock = threading.Lock()  # one durable writer: ids in log order
        self.replayed = 0  # vectors added from the write-ahead log by load
        if metadata_db is not None:
            self._open_db(metadata_db)
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
        return cls(build_faiss_index(package.embedding_dim, factory), manifest)

    @classmethod
    def load(cls, path: str | os.PathLike, package: ModelPackage | None = None) -> SearchIndex:
        """Open a saved index; with `package`, refuse one built with another model."""
        path = Path(path)
        for _ in range(5):  # a concurrent save may remove the version CURRENT named a moment ago
            version = cls._current_version(path)
            if not version.is_dir():
                time.sleep(0.05)
                continue
            try:
                manifest = json.loads((version / MANIFEST_FILE).read_text())
                faiss_index = faiss.read_index(str(version / INDEX_FILE))
            except (OSError, json.JSONDecodeError, RuntimeError) as e:
                if not version.is_dir():
                    continue
                raise SearchIndexError(f"{version}: cannot read the index: {e}") from e
            break
        else:
            raise SearchIndexError(
                f"{path}: {CURRENT_FILE} names a version folder that does not exist"
            )
        check_manifest(manifest, version, faiss_index.d, faiss_index.ntotal)
        index = cls(faiss_index, manifest, version / METADATA_FILE)
        if index._saved_count != manifest["count"]:
            raise SearchIndexError(
                f"{version / METADATA_FILE}: {index._saved_count} rows, the manifest says "
                f"{manifest['count']}"
            )
        if package is not None:
            index.check_model(package, where=str(path))
        index._replay(path)
        return index

    def _replay(self, folder: Path) -> None:
        """Add the log's records that the loaded version does not hold yet."""
        records, _ = read_log(folder / LOG_FILE, self.dim)
        for first, x, items in records:
            have = self.ntotal
            if first + len(x) <= have:
                continue  # saved in the live version already (a crash before the log was emptied)
            if first > have:
                raise SearchIndexError(
                    f"{folder / LOG_FILE}: a record starts at id {first}, but the index holds "
                    f"only {have} items: additions are missing"
                )
            skip = have - first
            paths, labels = zip(*items[skip:], strict=True)
            self.add(x[skip:], paths, labels)
            self.replayed += len(x) - skip

    @staticmethod
    def _current_version(path: Path) -> Path:
        pointer = path / CURRENT_FILE
        if not pointer.is_file():
            raise SearchIndexError(
                f"{path}: no search index here ({CURRENT_FILE} is missing; build one with "
                f"`embedserve index build`)"
            )
        name = pointer.read_text().strip()
        if not name or "/" in name or name.startswith("."):
            raise SearchIndexError(f"{pointer}: does not name a version folder ({name!r})")
        return path / name

    def check_model(self, package: ModelPackage, where: str = "index") -> None:
        """Raise IndexMismatchError unless the index was built with `package`'s model."""
        check_model(self.manifest, package, where)

    def _open_db(self, db_path: Path) -> None:
        if self._db is not None:
            self._db.close()
        self._db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, check_same_thread=False)
        self._saved_count = self._db.execute("SELECT count(*) FROM items").fetchone()[0]

    # -- properties -------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        m = self.manifest
        return f"SearchIndex({m['factory']!r}, {self.ntotal} x {self.dim}, model {m['model']['name']!r})"

    # -- adding and searching ---------------------------------------------------------------

    def _check_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [N, {self.dim}], got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise ValueError("embeddings must be finite")
        return np.ascontiguousarray(x, dtype=np.float32)  # a copy only when needed; never mutated

    def add(
        self,
        embeddings: np.ndarray,
        paths: Sequence[str | os.PathLike | None] | None = None,
        labels: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """Append vectors [N, D] with their paths and labels; returns their ids (int64 [N]).

        An index that needs training (IVF, PQ) is trained on the first vectors it is given.
        """
        x = self._check_embeddings(embeddings)
        n = len(x)
        paths = [None] * n if paths is None else [None if p is None else str(p) for p in paths]
        labels = [None] * n if labels is None else [None if v is None else str(v) for v in labels]
        if len(paths) != n or len(labels) != n:
            raise ValueError(f"{n} embeddings but {len(paths)} paths and {len(labels)} labels")
        with self._lock.write():
            if not self.index.is_trained:
                try:
                    self.index.train(x)
                except RuntimeError as e:
                    raise SearchIndexError(
                        f"cannot train a {self.manifest['factory']!r} index on {n} vectors: {e}"
                    ) from e
            first = self.index.ntotal
            self.index.add(x)
            self._pending += zip(paths, labels, strict=True)
            self.manifest["count"] = self.index.ntotal
            self.manifest["updated"] = now()
        return np.arange(first, first + n, dtype=np.int64)

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

    def add_durable(
        self,
        embeddings: np.ndarray,
        paths: Sequence[str | None] | None = None,
        labels: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """`add`, durably: the vectors are in the fsynced write-ahead log when this returns
        their ids, and searchable at once. Searches run meanwhile see the index before or after
        the addition, never half of it."""
        if self._log is None:
            raise SearchIndexError("no write-ahead log is open (open_log first)")
        x = self._check_embeddings(embeddings)
        n = len(x)
        paths = [None] * n if paths is None else list(paths)
        labels = [None] * n if labels is None else list(labels)
        if len(paths) != n or len(labels) != n:
            raise ValueError(f"{n} embeddings but {len(paths)} paths and {len(labels)} labels")
        if not self.index.is_trained:
            raise SearchIndexError("the index is not trained yet: build it with images first")
        with self._append_lock:
            first = self.ntotal
            self._log.append(first, x, list(zip(paths, labels, strict=True)))
            self.add(x, paths, labels)
        return np.arange(first, first + n, dtype=np.int64)

    def search(self, embeddings: np.ndarray, k: int = 10) -> list[list[dict[str, Any]]]:
        """The k nearest items of each query [N, D], best first: {"id", "score", "path", "label"}.

        Fewer than k hits come back when the index holds fewer (no placeholder ids).
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        x = self._check_embeddings(embeddings)
        with self._lock.read():
            if len(x) == 0 or self.ntotal == 0:
                return [[] for _ in range(len(x))]
            scores, ids = self.index.search(x, min(k, self.ntotal))  # NxK each
            rows = self._rows(np.unique(ids[ids >= 0]))
        return [
            [
                {"id": int(i), "score": float(s), "path": rows[i][0], "label": rows[i][1]}
                for s, i in zip(score_row, id_row, strict=True)
                if i >= 0
            ]
            for score_row, id_row in zip(scores, ids, strict=True)
        ]

    def search_ids(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw FAISS answer: scores float32 [N, k] and ids int64 [N, k] (-1 where none)."""
        x = self._check_embeddings(embeddings)
        with self._lock.read():
            return self.index.search(x, k)

    def metadata(self, ids: Sequence[int]) -> list[tuple[str | None, str | None]]:
        """(path, label) of each id."""
        ids = np.asarray(ids, np.int64)
        with self._lock.read():
            rows = self._rows(np.unique(ids))
        return [rows[int(i)] for i in ids]

    def _rows(self, ids: np.ndarray) -> dict[int, tuple[str | None, str | None]]:
        """(path, label) by id, fetching only these ids from the saved rows."""
        if len(ids) and (ids.min() < 0 or ids.max() >= self.ntotal):
            raise KeyError(f"ids outside 0..{self.ntotal - 1}")
        rows: dict[int, tuple[str | None, str | None]] = {}
        saved = [int(i) for i in ids if i < self._saved_count]
        for i in ids[ids >= self._saved_count]:
            rows[int(i)] = self._pending[int(i) - self._saved_count]
        if saved:
            with self._db_lock:
                for start in range(0, len(saved), _SQL_CHUNK):
                    chunk = saved[start : start + _SQL_CHUNK]
                    query = f"SELECT id, path, label FROM items WHERE id IN ({','.join('?' * len(chunk))})"
                    for i, path, label in self._db.execute(query, chunk):
                        rows[i] = (path, label)
        return rows

    # -- saving -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to the folder `path` atomically; returns the new version's folder.

        Readers see the old version until the new one is complete; a crash at any point leaves
        one of them live. One writer at a time per folder (an flock on INDEX_DIR/.lock).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with self._append_lock, self._log_for_save(path) as log:
            return self._save(path, log)

    @contextmanager
    def _log_for_save(self, path: Path) -> Iterator[WriteAheadLog | None]:
        """The log that this save empties: the open one, or the folder's, held while we save
        (a save must not empty a log that a server is still appending to)."""
        if self._log is not None and self._log_folder == path:
            yield self._log
        elif (path / LOG_FILE).exists():
            log = WriteAheadLog(path, self.dim)  # IndexBusyError if a server is writing
            try:
                yield log
            finally:
                log.close()
        else:
            yield None

    def _save(self, path: Path, log: WriteAheadLog | None) -> Path:
        with self._lock.write(), open(path / LOCK_FILE, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            live = self._live_version_name(path)
            sequence = int(live[1:7]) + 1 if live and live[1:7].isdigit() else 1
            tmp = path / f".tmp-{secrets.token_hex(4)}"
            tmp.mkdir()
            _save_checkpoint("temp-dir-created")
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            _save_checkpoint("index-written")
            self._write_metadata(tmp / METADATA_FILE)
            _save_checkpoint("metadata-written")
            (tmp / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2) + "\n")
            _save_checkpoint("manifest-written")
            for name in (INDEX_FILE, METADATA_FILE, MANIFEST_FILE):
                fsync(tmp / name)
            fsync(tmp)
            _save_checkpoint("files-synced")
            version = path / f"v{sequence:06d}-{secrets.token_hex(4)}"
            os.rename(tmp, version)
            fsync(path)
            _save_checkpoint("version-renamed")
            pointer_tmp = path / f".{CURRENT_FILE}.tmp"
            with open(pointer_tmp, "w") as f:
                f.write(version.name + "\n")
                f.flush()
                os.fsync(f.fileno())
            _save_checkpoint("pointer-written")
            os.replace(pointer_tmp, path / CURRENT_FILE)  # the commit point
            fsync(path)
            _save_checkpoint("pointer-replaced")
            self._open_db(version / METADATA_FILE)
            self._pending = []
            if log is not None:
                # Everything in the log is in the new version now (this process replayed it or
                # added it). A crash before this line leaves records the next load skips.
                log.empty()
                _save_checkpoint("log-emptied")
            for entry in path.iterdir():  # the old version and any leftovers of crashed saves
                if entry.name not in (
                    version.name,
                    CURRENT_FILE,
                    LOCK_FILE,
                    LOG_FILE,
                    LOG_LOCK_FILE,
                ):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            _save_checkpoint("cleaned")
        return version

    @staticmethod
    def _live_version_name(path: Path) -> str | None:
        pointer = path / CURRENT_FILE
        return pointer.read_text().strip() if pointer.is_file() else None

    def _write_metadata(self, db_path: Path) -> None:
        """The saved rows (copied page by page) plus the pending ones, into a new SQLite file."""
        db = sqlite3.connect(db_path)
        try:
            if self._db is not None:
                with self._db_lock:
                    self._db.backup(db)
            else:
                db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT, label TEXT)")
            db.executemany(
                "INSERT INTO items (id, path, label) VALUES (?, ?, ?)",
                ((self._saved_count + i, p, label) for i, (p, label) in enumerate(self._pending)),
            )
            db.commit()
        finally:
            db.close()
