"""The write-ahead log of a search index (INDEX_DIR/wal.log): durable additions between saves.

Additions that must be durable at once (a server acknowledging them) go to a write-ahead log
instead of a new version per request: `SearchIndex.open_log(path)` then `add_durable(...)`
appends one checksummed record per call, carrying its first id, and fsyncs it before returning.
`SearchIndex.load` replays the log over the live version, skipping records whose ids the
version already holds, and drops a torn last record (a writer killed mid-append; it was never
acknowledged). A save empties the log after its commit point; a crash in between only leaves
records that the next replay skips, so no id is ever duplicated.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import zlib
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

# A log record: magic, payload length, crc32 of the payload, then the payload:
# first id (u64), count n (u32), dim (u32), metadata length (u32), metadata as JSON
# [[path, label], ...], then the vectors, float32 [n, dim].
_RECORD_MAGIC = b"EWR1"
_RECORD_HEAD = struct.Struct("<4sII")
_PAYLOAD_HEAD = struct.Struct("<QIII")


def _encode_record(first: int, x: np.ndarray, items: Items) -> bytes:
    meta = json.dumps(items, ensure_ascii=False).encode()
    payload = _PAYLOAD_HEAD.pack(first, len(x), x.shape[1], len(meta)) + meta + x.tobytes()
    return _RECORD_HEAD.pack(_RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_log(path: str | os.PathLike, dim: int) -> tuple[list[tuple[int, np.ndarray, Items]], int]:
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
            fsync(folder)  # the new file's directory entry is durable too

    @property
    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def append(self, first: int, x: np.ndarray, items: Items) -> None:
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
