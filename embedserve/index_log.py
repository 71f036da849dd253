"""The write-ahead log of a search index (INDEX_DIR/wal.log): durable changes between saves.

Changes that must be durable at once (a server acknowledging them) go to a write-ahead log
instead of a new version per request: `SearchIndex.open_log(path)` then `add_durable(...)` or
`delete_durable(...)` appends one checksummed record per call and fsyncs it before returning.
An addition's record carries its first id, its items' paths, labels and thumbnails, and the ids
it replaces; a deletion's, the ids deleted. `SearchIndex.load` replays the log over the live
version: additions whose ids the version holds already (below its next_id) are skipped,
deletions are applied again (deleting a deleted id changes nothing; ids are never reused). A
torn last record (a writer killed mid-append; never acknowledged) is dropped. A save empties the
log after its commit point; a crash in between only leaves records that the next replay skips
or repeats harmlessly. Records of the first version (additions only) are still read.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedserve.index_format import (
    LOG_FILE,
    LOG_LOCK_FILE,
    IndexBusyError,
    SearchIndexError,
    fsync,
)

# A record's items: the (path, label) of each of its vectors.
Items = list[tuple[str | None, str | None]]

ADD, DELETE = 1, 2  # the kinds of record

# A record: magic, payload length, crc32 of the payload, then the payload.
_RECORD_HEAD = struct.Struct("<4sII")
# Version 2 ("EWR2"), written now: kind (u8), first id (u64), count n (u32), dim (u32), metadata
# length (u32), metadata as JSON, then (ADD) the vectors, float32 [n, dim], then the thumbnails'
# bytes one after the other. ADD's metadata: {"items": [[path, label], ...], "replaced": [ids
# deleted by this addition], "thumbnails": [byte length or -1 for none, per item]}; DELETE's:
# {"ids": [...]} (n = their number, first = 0, no vectors).
_MAGIC = b"EWR2"
_HEAD = struct.Struct("<BQIII")
# Version 1 ("EWR1", before deletes; still read): first id (u64), count n (u32), dim (u32),
# metadata length (u32), metadata as JSON [[path, label], ...], then the vectors, float32 [n, dim].
_MAGIC_V1 = b"EWR1"
_HEAD_V1 = struct.Struct("<QIII")


@dataclass
class LogRecord:
    """One record: an addition (ids first .. first + n - 1, deleting `replaced` at the same
    moment) or a deletion of `ids`."""

    kind: int
    first: int = 0
    x: np.ndarray | None = None
    items: Items = field(default_factory=list)
    thumbnails: list[bytes | None] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


def _frame(payload: bytes, magic: bytes = _MAGIC) -> bytes:
    return _RECORD_HEAD.pack(magic, len(payload), zlib.crc32(payload)) + payload


def encode_add(
    first: int,
    x: np.ndarray,
    items: Items,
    thumbnails: Sequence[bytes | None] | None = None,
    replaced: Sequence[int] = (),
) -> bytes:
    thumbs = list(thumbnails) if thumbnails is not None else [None] * len(x)
    meta = {
        "items": items,
        "replaced": [int(i) for i in replaced],
        "thumbnails": [-1 if t is None else len(t) for t in thumbs],
    }
    raw = json.dumps(meta, ensure_ascii=False).encode()
    head = _HEAD.pack(ADD, first, len(x), x.shape[1], len(raw))
    return _frame(b"".join([head, raw, x.tobytes(), *(t for t in thumbs if t)]))


def encode_delete(ids: Sequence[int], dim: int) -> bytes:
    raw = json.dumps({"ids": [int(i) for i in ids]}).encode()
    return _frame(_HEAD.pack(DELETE, 0, len(ids), dim, len(raw)) + raw)


def _decode(magic: bytes, data: bytes, start: int, dim: int, where: str) -> LogRecord:
    """The record whose payload starts at byte `start` of `data`."""
    if magic == _MAGIC_V1:
        first, n, rec_dim, meta_len = _HEAD_V1.unpack_from(data, start)
        kind, start = ADD, start + _HEAD_V1.size
    else:
        kind, first, n, rec_dim, meta_len = _HEAD.unpack_from(data, start)
        start += _HEAD.size
    if rec_dim != dim:
        raise SearchIndexError(f"{where} holds {rec_dim}-d vectors, not {dim}-d")
    meta = json.loads(data[start : start + meta_len])
    start += meta_len
    if magic == _MAGIC_V1:
        meta = {"items": meta}
    if kind == DELETE:
        return LogRecord(DELETE, ids=[int(i) for i in meta["ids"]])
    if kind != ADD:
        raise SearchIndexError(f"{where} is of an unknown kind ({kind})")
    x = np.frombuffer(data, np.float32, n * dim, start).reshape(n, dim)
    start += n * dim * 4
    thumbnails: list[bytes | None] = []
    for length in meta.get("thumbnails", [-1] * n):
        thumbnails.append(None if length < 0 else data[start : start + length])
        start += max(length, 0)
    items = [tuple(item) for item in meta["items"]]
    return LogRecord(ADD, first, x, items, thumbnails, [int(i) for i in meta.get("replaced", [])])


def read_log(path: str | os.PathLike, dim: int) -> tuple[list[LogRecord], int]:
    """The records of a write-ahead log (both record versions) and the byte length of its valid
    part. A torn last record (incomplete, or failing its checksum with nothing after it) ends
    the valid part; damage followed by more data is an error."""
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
        if magic not in (_MAGIC, _MAGIC_V1):
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
                "follow; refusing to guess which changes are valid"
            )
        records.append(_decode(magic, data, end_of_head, dim, f"{path}: record at byte {offset}"))
        offset = end
    return records, offset


class WriteAheadLog:
    """The append side of INDEX_DIR/wal.log, held by one process (an flock) while it is open."""

    def __init__(self, folder: str | os.PathLike, dim: int) -> None:
        folder = Path(folder)
        self.path = folder / LOG_FILE
        self.dim = dim
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
            fsync(folder)  # the new file's directory entry is durable too

    @property
    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def append(
        self,
        first: int,
        x: np.ndarray,
        items: Items,
        thumbnails: Sequence[bytes | None] | None = None,
        replaced: Sequence[int] = (),
    ) -> None:
        """Write an addition's record and flush it to the disk: durable when this returns."""
        self._write(encode_add(first, x, items, thumbnails, replaced))

    def append_delete(self, ids: Sequence[int]) -> None:
        """Write a deletion's record and flush it to the disk: durable when this returns."""
        self._write(encode_delete(ids, self.dim))

    def _write(self, record: bytes) -> None:
        written = os.write(self._fd, record)
        if written != len(record):  # a full disk: remove the partial record, then fail
            os.ftruncate(self._fd, self.size - written)
            raise OSError(f"{self.path}: short write ({written} of {len(record)} bytes)")
        _log_checkpoint("record-written")
        os.fdatasync(self._fd)

    def empty(self) -> None:
        self.truncate(0)

    def truncate(self, size: int) -> None:
        """Drop everything after byte `size` (a record whose change failed in memory)."""
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)
        self._lock_file.close()  # releases the flock


def _log_checkpoint(step: str) -> None:
    """Called inside a log append; tests replace it to kill a writer mid-record."""


@contextmanager
def log_for_save(
    folder: Path, dim: int, open_log: WriteAheadLog | None
) -> Iterator[WriteAheadLog | None]:
    """The log that a save of `folder` empties: this process's open one, or the folder's, held
    while the save runs (a save must not empty a log that a server is still appending to)."""
    if open_log is not None:
        yield open_log
    elif (folder / LOG_FILE).exists():
        log = WriteAheadLog(folder, dim)  # IndexBusyError if a server is writing
        try:
            yield log
        finally:
            log.close()
    else:
        yield None
