"""A search index's metadata: each id's path, label and thumbnail, which ids are live, and the
masks that filters and deletions search with.

    store = MetadataStore()
    store.open(version / "metadata.sqlite")     # the saved rows (read-only)
    store.add(ids, paths, labels, thumbnails)   # pending rows, in memory until a save
    store.delete(ids)                           # tombstones: no longer live
    flt = store.filter(["cat"], "photos/2024/") # a mask over the id space, or None for "all"
    store.write(tmp / "metadata.sqlite")        # the next version's file: compacted

Saved rows live in the version's SQLite file (items with an index on path, thumbnails), opened
read-only; rows added since are in memory (thumbnails spooled to an anonymous temporary file)
until the next save writes them into the next version's file. Which ids are live, and each id's
label (as a small integer code), are numpy arrays over the id space, so a label filter is a
vectorised comparison; a path prefix is a range query on the saved rows plus a scan of the
pending ones. Deleted rows are removed when the next version's file is written, with SQLite's
secure_delete on so their bytes (a thumbnail of a photo whose removal was asked for) are
overwritten, not only unlinked.

Not thread-safe for writers: the SearchIndex serialises changes and holds its readers-writer
lock around them; any number of readers may call the read methods at once.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Row = tuple[str | None, str | None]  # (path, label)

_SQL_CHUNK = 900  # ids per SELECT ... IN (...), below SQLite's variable limit
_PREFIX_END = "\U0010ffff"  # sorts after every character: [prefix, prefix + this) holds them all


@dataclass
class Filter:
    """The ids a search may return: mask[id] (bool over the id space), its bitmap, the count."""

    mask: np.ndarray
    bits: np.ndarray
    count: int


class _Spool:
    """Thumbnails not saved yet, in an anonymous temporary file (not in memory): id -> bytes."""

    def __init__(self) -> None:
        self._file = None
        self._end = 0
        self._where: dict[int, tuple[int, int]] = {}

    def put(self, item_id: int, data: bytes) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 (closed in clear)
        os.pwrite(self._file.fileno(), data, self._end)
        self._where[item_id] = (self._end, len(data))
        self._end += len(data)

    def get(self, item_id: int) -> bytes | None:
        where = self._where.get(item_id)
        return None if where is None else os.pread(self._file.fileno(), where[1], where[0])

    def __contains__(self, item_id: int) -> bool:
        return item_id in self._where

    def drop(self, item_id: int) -> None:
        self._where.pop(item_id, None)

    def ids(self) -> list[int]:
        return list(self._where)

    def clear(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._end, self._where = None, 0, {}


class MetadataStore:
    """Paths, labels, thumbnails and liveness of every id of one index (module docstring)."""

    def __init__(self) -> None:
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()  # one connection, shared by the search threads
        self._db_has_thumbnails = False
        self.next_id = 0
        self.count = 0  # live items
        self._live = np.zeros(0, bool)
        self._codes = np.zeros(0, np.int32)  # label code per id; -1: no label
        self._label_names: list[str] = []
        self._label_codes: dict[str, int] = {}
        self._pending: dict[int, Row] = {}
        self._pending_paths: dict[str, list[int]] = {}
        self._thumbs = _Spool()
        self._dead_saved: set[int] = set()  # deleted ids whose rows the saved file still holds
        self.tombstones: set[int] = set()  # deleted ids whose vectors FAISS still holds
        self._filters: dict[tuple, Filter | None] = {}

    # -- the saved rows ---------------------------------------------------------------------

    def open(self, db_path: Path) -> int:
        """Read the saved rows of a version (read-only); returns how many there are."""
        if self._db is not None:
            self._db.close()
        self._db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, check_same_thread=False)
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
        self._db_has_thumbnails = "thumbnails" in tables
        rows = self._db.execute("SELECT id, label FROM items").fetchall()
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        self.next_id = max(self.next_id, int(ids.max()) + 1 if len(ids) else 0)
        self._grow(self.next_id)
        self._live[:] = False
        self._live[ids] = True
        self._codes[ids] = [self._code(label) for _, label in rows]
        self.count = len(rows)
        self._changed()
        return len(rows)

    def saved(self, db_path: Path) -> None:
        """The pending rows are in the file `db_path` now (the new version's): read from it."""
        if self._db is not None:
            self._db.close()
        self._db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, check_same_thread=False)
        self._db_has_thumbnails = True
        self._pending, self._pending_paths = {}, {}
        self._thumbs.clear()
        self._dead_saved = set()

    def write(self, db_path: Path) -> None:
        """The next version's file: the saved rows without the deleted ones (their bytes
        overwritten: secure_delete), plus the live pending rows and thumbnails."""
        db = sqlite3.connect(db_path)
        try:
            db.execute("PRAGMA journal_mode=OFF")  # a new file: no journal holding old pages
            if self._db is not None:
                with self._db_lock:
                    self._db.backup(db)
            db.execute("PRAGMA secure_delete=ON")
            db.execute(
                "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, path TEXT, label TEXT)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS items_path ON items (path)")
            db.execute("CREATE TABLE IF NOT EXISTS thumbnails (id INTEGER PRIMARY KEY, jpeg BLOB)")
            dead = sorted(self._dead_saved)
            for start in range(0, len(dead), _SQL_CHUNK):
                chunk = dead[start : start + _SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                db.execute(f"DELETE FROM items WHERE id IN ({marks})", chunk)
                db.execute(f"DELETE FROM thumbnails WHERE id IN ({marks})", chunk)
            live = [i for i in sorted(self._pending) if self._live[i]]
            db.executemany(
                "INSERT INTO items (id, path, label) VALUES (?, ?, ?)",
                ((i, *self._pending[i]) for i in live),
            )
            db.executemany(
                "INSERT INTO thumbnails (id, jpeg) VALUES (?, ?)",
                ((i, self._thumbs.get(i)) for i in live if i in self._thumbs),
            )
            db.commit()
        finally:
            db.close()

    # -- changes ----------------------------------------------------------------------------

    def add(
        self,
        ids: np.ndarray,
        paths: Sequence[str | None],
        labels: Sequence[str | None],
        thumbnails: Sequence[bytes | None],
    ) -> None:
        if not len(ids):
            return
        self.next_id = max(self.next_id, int(ids[-1]) + 1)
        self._grow(self.next_id)
        self._live[ids] = True
        self._codes[ids] = [self._code(label) for label in labels]
        for i, path, label, thumb in zip(ids.tolist(), paths, labels, thumbnails, strict=True):
            self._pending[i] = (path, label)
            if path is not None:
                self._pending_paths.setdefault(path, []).append(i)
            if thumb is not None:
                self._thumbs.put(i, thumb)
        self.count += len(ids)
        self._changed()

    def delete(self, ids: Iterable[int]) -> None:
        """Tombstones for live ids: no longer searchable or readable, removed at compaction."""
        for i in ids:
            if not self.is_live(i):
                continue
            self._live[i] = False
            self.count -= 1
            self.tombstones.add(i)
            if i not in self._pending:
                self._dead_saved.add(i)
        self._changed()

    def compacted(self, ids: Iterable[int]) -> None:
        """The vectors of these deleted ids are gone from FAISS: drop their pending rows too."""
        for i in ids:
            self.tombstones.discard(i)
            row = self._pending.pop(i, None)
            if row is not None and row[0] is not None:
                self._pending_paths[row[0]].remove(i)
            self._thumbs.drop(i)
        self._changed()

    def reserve(self, next_id: int) -> None:
        """Ids below `next_id` are taken (a manifest's next_id: deleted ids are not reused)."""
        self.next_id = max(self.next_id, next_id)
        self._grow(self.next_id)

    def _grow(self, size: int) -> None:
        if size > len(self._live):
            capacity = max(size, 2 * len(self._live), 1024)
            self._live = np.concatenate([self._live, np.zeros(capacity - len(self._live), bool)])
            self._codes = np.concatenate(
                [self._codes, np.full(capacity - len(self._codes), -1, np.int32)]
            )

    def _code(self, label: str | None) -> int:
        if label is None:
            return -1
        code = self._label_codes.get(label)
        if code is None:
            code = self._label_codes[label] = len(self._label_names)
            self._label_names.append(label)
        return code

    def _changed(self) -> None:
        self._filters = {}

    # -- reading ----------------------------------------------------------------------------

    def is_live(self, item_id: int) -> bool:
        return 0 <= item_id < self.next_id and bool(self._live[item_id])

    def live_ids(self) -> np.ndarray:
        return np.flatnonzero(self._live[: self.next_id]).astype(np.int64)

    def rows(self, ids: Iterable[int]) -> dict[int, Row]:
        """(path, label) by id, fetching only these ids from the saved rows."""
        rows: dict[int, Row] = {}
        saved = []
        for i in ids:
            i = int(i)
            if i in self._pending:
                rows[i] = self._pending[i]
            else:
                saved.append(i)
        if saved and self._db is not None:
            with self._db_lock:
                for start in range(0, len(saved), _SQL_CHUNK):
                    chunk = saved[start : start + _SQL_CHUNK]
                    query = f"SELECT id, path, label FROM items WHERE id IN ({','.join('?' * len(chunk))})"
                    for i, path, label in self._db.execute(query, chunk):
                        rows[i] = (path, label)
        return rows

    def thumbnail(self, item_id: int) -> bytes | None:
        if item_id in self._thumbs:
            return self._thumbs.get(item_id)
        if item_id in self._pending or self._db is None or not self._db_has_thumbnails:
            return None
        with self._db_lock:
            row = self._db.execute(
                "SELECT jpeg FROM thumbnails WHERE id = ?", (item_id,)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def live_ids_by_path(self, paths: Iterable[str]) -> dict[str, list[int]]:
        """The live ids stored with each path (an empty list for none)."""
        found: dict[str, list[int]] = {}
        for path in paths:
            ids = list(self._pending_paths.get(path, ()))
            if self._db is not None:
                with self._db_lock:
                    ids += [
                        r[0]
                        for r in self._db.execute("SELECT id FROM items WHERE path = ?", (path,))
                    ]
            found[path] = sorted(i for i in set(ids) if self.is_live(i))
        return found

    def label_counts(self) -> dict[str, int]:
        """Live items per label, by label."""
        n = self.next_id
        codes = self._codes[:n][self._live[:n]]
        counts = np.bincount(codes[codes >= 0], minlength=len(self._label_names))
        named = zip(self._label_names, counts.tolist(), strict=True)
        return {name: c for name, c in sorted(named) if c}

    def filter(
        self, labels: Sequence[str] | None = None, prefix: str | None = None
    ) -> Filter | None:
        """The live ids whose label is one of `labels` and whose path starts with `prefix`
        (either may be None/empty: no condition); None when that is every id FAISS holds."""
        if isinstance(labels, str):
            labels = [labels]
        labels = tuple(sorted(set(labels))) if labels else None
        prefix = prefix or None
        key = (labels, prefix)
        if key in self._filters:
            return self._filters[key]
        if labels is None and prefix is None and not self.tombstones:
            return None
        n = self.next_id
        mask = self._live[:n].copy()
        if labels is not None:
            wanted = [self._label_codes[v] for v in labels if v in self._label_codes]
            mask &= np.isin(self._codes[:n], np.asarray(wanted, np.int32))
        if prefix is not None:
            has_prefix = np.zeros(n, bool)
            has_prefix[self._ids_with_prefix(prefix)] = True
            mask &= has_prefix
        result = Filter(mask, np.packbits(mask, bitorder="little"), int(mask.sum()))
        if len(self._filters) > 32:
            self._filters = {}
        self._filters[key] = result
        return result

    def _ids_with_prefix(self, prefix: str) -> list[int]:
        ids = [i for i, (path, _) in self._pending.items() if path and path.startswith(prefix)]
        if self._db is not None:
            query = "SELECT id FROM items WHERE path >= ? AND path < ? AND substr(path, 1, ?) = ?"
            with self._db_lock:
                cursor = self._db.execute(
                    query, (prefix, prefix + _PREFIX_END, len(prefix), prefix)
                )
                ids += [r[0] for r in cursor]
        return ids
