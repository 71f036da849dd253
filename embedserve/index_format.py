"""The on-disk format of a search index: its files, its manifest, and the errors about them.

On disk, an index is a folder:

    INDEX_DIR/
      CURRENT              one line: the name of the live version folder
      v000002-5f3a9c1e/    a complete version, never modified after it was written
        manifest.json      model name + sha256, dim, metric, factory, count, next_id, times
        index.faiss        faiss.write_index: "IDMap2,<factory>", or an IVF index holding the
                           ids itself (with a hash-table direct map)
        metadata.sqlite    items(id INTEGER PRIMARY KEY, path TEXT, label TEXT), an index on
                           path, thumbnails(id INTEGER PRIMARY KEY, jpeg BLOB)
      .lock                held (flock) by a writer while it saves
      wal.log              additions and deletions since the live version (a server's writes)
      .wal.lock            held (flock) by the one process that appends to wal.log

A save writes a new version in a temporary folder, fsyncs it, renames it into place, then
replaces CURRENT atomically (os.replace) and removes the old version (embedserve.index). The
write-ahead log's record format is in embedserve.index_log.

A version holds only live items: a save compacts first. `count` is the number of items (= the
FAISS index's ntotal = the rows), `next_id` the id the next addition gets; ids are never
reused, so ids below next_id that no row holds were deleted. Format version 1 (before deletes:
sequential FAISS ids, next_id = count, no thumbnails) still loads and is converted in memory
(embedserve.index_ids.convert_v1); the next save writes version 2.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedserve import __version__

if TYPE_CHECKING:  # a type only: the index's modules load no model (nor onnxruntime)
    from embedserve.package import ModelPackage

FORMAT = "embedserve-index"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.sqlite"
LOG_FILE = "wal.log"
LOG_LOCK_FILE = ".wal.lock"
DEFAULT_FACTORY = "Flat"
METRIC = "inner_product"  # embeddings are L2-normalized: inner product = cosine similarity


class SearchIndexError(RuntimeError):
    """An index that cannot be built, loaded or searched; the message names the path and reason."""


class IndexMismatchError(SearchIndexError):
    """An index built with another model (or dimension) than the one it is used with."""


class IndexBusyError(SearchIndexError):
    """Another process already appends to this index's write-ahead log."""


class IndexUnavailableError(SearchIndexError):
    """A Milvus index that could not be reached or refused a call (a 503 from the server)."""


class ItemNotFound(SearchIndexError, KeyError):
    """No live item has this id (never added, or deleted). Also a KeyError."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now() -> str:
    """The time for a manifest: UTC, ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_manifest(
    package: ModelPackage, factory: str, search_parameters: dict[str, int] | None = None
) -> dict[str, Any]:
    """The manifest of an empty index of `package`'s embeddings."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": package.name, "sha256": package.card["sha256"]},
        "dim": package.embedding_dim,
        "metric": METRIC,
        "factory": factory,
        "search_parameters": dict(search_parameters or {}),
        "count": 0,
        "next_id": 0,
        "created": now(),
        "updated": now(),
        "embedserve_version": __version__,
    }


def check_manifest(manifest: dict[str, Any], version: Path, dim: int, count: int) -> None:
    """Raise SearchIndexError unless `manifest` (of the version folder `version`) is of this
    format and version, and describes a FAISS index of `count` vectors of dimension `dim`."""
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise SearchIndexError(
            f"{version / MANIFEST_FILE}: not an {FORMAT} manifest of a version this program "
            f"reads ({', '.join(f'v{v}' for v in READABLE_VERSIONS)})"
        )
    if dim != manifest["dim"] or count != manifest["count"]:
        raise SearchIndexError(
            f"{version}: the FAISS index has {count} vectors of dim "
            f"{dim}, the manifest says {manifest['count']} of dim {manifest['dim']}"
        )


def check_model(manifest: dict[str, Any], package: ModelPackage, where: str = "index") -> None:
    """Raise IndexMismatchError unless the index of `manifest` was built with `package`'s model."""
    model = manifest["model"]
    if model["sha256"] != package.card["sha256"] or model["name"] != package.name:
        raise IndexMismatchError(
            f"{where} was built with model {model['name']!r} (sha256 {model['sha256'][:12]}), "
            f"not {package.name!r} (sha256 {package.card['sha256'][:12]}): its embeddings are "
            f"not comparable; rebuild the index with this model or use the one it was built with"
        )
    if manifest["dim"] != package.embedding_dim:
        raise IndexMismatchError(
            f"{where} holds {manifest['dim']}-d vectors, {package.name} makes "
            f"{package.embedding_dim}-d"
        )
