"""A FAISS similarity-search index with its metadata, persisted atomically.

    index = SearchIndex.create(package, factory="Flat")     # exact inner product
    ids = index.add(embeddings, paths, labels)              # ids 0, 1, 2, ... in order of addition
    index.save("indexes/photos")                            # atomic: old or new, never half
    index = SearchIndex.load("indexes/photos", package)     # refuses another model's index
    hits = index.search(query_embeddings, k=10)             # [[{"id", "score", "path", "label"}]]

Embeddings are L2-normalized, so the metric is the inner product (= cosine similarity). The
factory string is any FAISS index-factory string ("Flat", "IVF256,Flat", "HNSW32",
"IVF256,PQ32", ...); an index that needs training is trained on the first batch it is given.

On disk, an index is a folder:

    INDEX_DIR/
      CURRENT              one line: the name of the live version folder
      v000002-5f3a9c1e/    a complete version, never modified after it was written
        manifest.json      model name + sha256, dim, metric, factory, count, times
        index.faiss        faiss.write_index
        metadata.sqlite    items(id INTEGER PRIMARY KEY, path TEXT, label TEXT)
      .lock                held (flock) by a writer while it saves
      wal.log              additions since the live version (a server's POST /index/add)
      .wal.lock            held (flock) by the one process that appends to wal.log

A save writes a new version in a temporary folder, fsyncs it, renames it into place, then
replaces CURRENT atomically (os.replace) and removes the old version. A crash at any point
leaves CURRENT naming a complete version: the old one until the replace, the new one after.
Ids are the FAISS sequential ids; items are only ever appended, so an id never changes.

Additions that must be durable at once (a server acknowledging them) go to a write-ahead log
instead of a new version per request: `open_log(path)` then `add_durable(...)` appends one
checksummed record per call, carrying its first id, and fsyncs it before returning. `load`
replays the log over the live version, skipping records whose ids the version already holds,
and drops a torn last record (a writer killed mid-append; it was never acknowledged). A save
empties the log after its commit point; a crash in between only leaves records that the next
replay skips, so no id is ever duplicated.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embedserve import __version__
from embedserve.package import ModelPackage

FORMAT = "embedserve-index"
FORMAT_VERSION = 1
CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.sqlite"
LOG_FILE = "wal.log"
LOG_LOCK_FILE = ".wal.lock"
DEFAULT_FACTORY = "Flat"
METRIC = "inner_product"  # embeddings are L2-normalized: inner product = cosine similarity
_SQL_CHUNK = 900  # ids per SELECT ... IN (...), below SQLite's variable limit


class SearchIndexError(RuntimeError):
    """An index that cannot be built, loaded or searched; the message names the path and reason."""


class IndexMismatchError(SearchIndexError):
    """An index built with another model (or dimension) than the one it is used with."""


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


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class _ReadWriteLock:
    """Many concurrent readers (searches) or one writer (add, save)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class IndexBusyError(SearchIndexError):
    """Another process already appends to this index's write-ahead log."""


# A log record: magic, payload length, crc32 of the payload, then the payload:
# first id (u64), count n (u32), dim (u32), metadata length (u32), metadata as JSON
# [[path, label], ...], then the vectors, float32 [n, dim].
_RECORD_MAGIC = b"EWR1"
_RECORD_HEAD = struct.Struct("<4sII")
_PAYLOAD_HEAD = struct.Struct("<QIII")


def _encode_record(first: int, x: np.ndarray, items: list[tuple[str | None, str | None]]) -> bytes:
    meta = json.dumps(items, ensure_ascii=False).encode()
    payload = _PAYLOAD_HEAD.pack(first, len(x), x.shape[1], len(meta)) + meta + x.tobytes()
    return _RECORD_HEAD.pack(_RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_log(
    path: str | os.PathLike, dim: int
) -> tuple[list[tuple[int, np.ndarray, list[tuple[str | None, str | None]]]], int]:
    """The records of a write-ahead log, [(first id, vectors [n, dim], [(path, label)])], and
    the byte length of its valid part. A torn last record (incomplete, or failing its checksum
    with nothing after it) ends the valid part; damage followed by more data is an error."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    records, offset = [], 0
    while offset < len(data):
        end_of_head = offset + _RECORD_HEAD.size
        if end_of_head > len(data):
            break  # a torn header
        magic, length, crc = _RECORD_HEAD.unpack_from(data, offset)
        end = end_of_head + length
        if magic != _RECORD_MAGIC:
            if not data[offset:].strip(b"\0"):
                break  # zeros where a record was being written (the file grew, data lost)
            raise SearchIndexError(f"{path}: no record starts at byte {offset}: damaged log")
        if end > len(data):
            break  # a torn record: the writer died mid-append, before acknowledging it
        if zlib.crc32(data[end_of_head:end]) != crc:
            if end == len(data):
                break  # the last record, torn (its tail never reached the disk)
            raise SearchIndexError(
                f"{path}: the record at byte {offset} fails its checksum and more records "
                "follow; refusing to guess which additions are valid"
            )
        first, n, rec_dim, meta_len = _PAYLOAD_HEAD.unpack_from(data, end_of_head)
        if rec_dim != dim:
            raise SearchIndexError(
                f"{path}: record at byte {offset} holds {rec_dim}-d vectors, not {dim}-d"
            )
        start = end_of_head + _PAYLOAD_HEAD.size
        items = [tuple(item) for item in json.loads(data[start : start + meta_len])]
        x = np.frombuffer(data, np.float32, n * dim, start + meta_len).reshape(n, dim)
        records.append((first, x, items))
        offset = end
    return records, offset


class WriteAheadLog:
    """The append side of INDEX_DIR/wal.log, held by one process (an flock) while it is open."""

    def __init__(self, folder: str | os.PathLike, dim: int) -> None:
        folder = Path(folder)
        self.path = folder / LOG_FILE
        self._lock_file = open(folder / LOG_LOCK_FILE, "a")  # noqa: SIM115 (closed in close)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise IndexBusyError(
                f"{folder}: another process is adding to this index (it holds {LOG_LOCK_FILE}); "
                "one writer at a time"
            ) from None
        _, valid = read_log(self.path, dim)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self._fd).st_size != valid:
            os.ftruncate(self._fd, valid)  # drop a torn last record
            os.fsync(self._fd)
        if created:
            _fsync(folder)  # the new file's directory entry is durable too

    @property
    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def append(self, first: int, x: np.ndarray, items: list[tuple[str | None, str | None]]) -> None:
        """Write one record and flush it to the disk: durable when this returns."""
        record = _encode_record(first, x, items)
        written = os.write(self._fd, record)
        if written != len(record):  # a full disk: remove the partial record, then fail
            os.ftruncate(self._fd, self.size - written)
            raise OSError(f"{self.path}: short write ({written} of {len(record)} bytes)")
        _log_checkpoint("record-written")
        os.fdatasync(self._fd)

    def empty(self) -> None:
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)
        self._lock_file.close()  # releases the flock


def _log_checkpoint(step: str) -> None:
    """Called inside a log append; tests replace it to kill a writer mid-record."""


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
        self._lock = _ReadWriteLock()
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
        dim = package.embedding_dim
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"name": package.name, "sha256": package.card["sha256"]},
            "dim": dim,
            "metric": METRIC,
            "factory": factory,
            "search_parameters": dict(search_parameters or {}),
            "count": 0,
            "created": _now(),
            "updated": _now(),
            "embedserve_version": __version__,
        }
        return cls(build_faiss_index(dim, factory), manifest)

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
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise SearchIndexError(
                f"{version / MANIFEST_FILE}: not an {FORMAT} v{FORMAT_VERSION} manifest"
            )
        if faiss_index.d != manifest["dim"] or faiss_index.ntotal != manifest["count"]:
            raise SearchIndexError(
                f"{version}: the FAISS index has {faiss_index.ntotal} vectors of dim "
                f"{faiss_index.d}, the manifest says {manifest['count']} of dim {manifest['dim']}"
            )
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
        model = self.manifest["model"]
        if model["sha256"] != package.card["sha256"] or model["name"] != package.name:
            raise IndexMismatchError(
                f"{where} was built with model {model['name']!r} (sha256 {model['sha256'][:12]}), "
                f"not {package.name!r} (sha256 {package.card['sha256'][:12]}): its embeddings are "
                f"not comparable; rebuild the index with this model or use the one it was built with"
            )
        if self.dim != package.embedding_dim:
            raise IndexMismatchError(
                f"{where} holds {self.dim}-d vectors, {package.name} makes {package.embedding_dim}-d"
            )

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
            self.manifest["updated"] = _now()
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
                _fsync(tmp / name)
            _fsync(tmp)
            _save_checkpoint("files-synced")
            version = path / f"v{sequence:06d}-{secrets.token_hex(4)}"
            os.rename(tmp, version)
            _fsync(path)
            _save_checkpoint("version-renamed")
            pointer_tmp = path / f".{CURRENT_FILE}.tmp"
            with open(pointer_tmp, "w") as f:
                f.write(version.name + "\n")
                f.flush()
                os.fsync(f.fileno())
            _save_checkpoint("pointer-written")
            os.replace(pointer_tmp, path / CURRENT_FILE)  # the commit point
            _fsync(path)
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
