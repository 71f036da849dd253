"""Which index a location names, following pymilvus's own convention, and opening it.

    folder (anything else)      the FAISS index on disk (embedserve.index.SearchIndex)
    path ending in .db          a Milvus Lite file (embedserve.index_milvus.MilvusIndex)
    http:// or https:// URI     a Milvus server (embedserve.index_milvus.MilvusIndex)

Both answer the same calls (add, add_durable, delete, delete_durable, search, search_by_id,
item, thumbnail, labels, check_model, save, len, manifest), so the server (EMBEDSERVE_INDEX)
and the command line (--out, --index) take either. Milvus's collection and token come from
EMBEDSERVE_MILVUS_COLLECTION and EMBEDSERVE_MILVUS_TOKEN (or the --collection option).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedserve.config import DEFAULT_MILVUS_COLLECTION as DEFAULT_COLLECTION
from embedserve.index_format import DEFAULT_FACTORY, SearchIndexError

if TYPE_CHECKING:  # a type only: the index's modules load no model (nor onnxruntime)
    from embedserve.package import ModelPackage

COLLECTION_ENV = "EMBEDSERVE_MILVUS_COLLECTION"
TOKEN_ENV = "EMBEDSERVE_MILVUS_TOKEN"


def kind(location: str | os.PathLike) -> str:
    """ "faiss", "milvus-lite" or "milvus" (a server)."""
    text = str(location)
    if text.startswith(("http://", "https://", "tcp://", "grpc://")):
        return "milvus"
    if text.endswith(".db"):
        return "milvus-lite"
    return "faiss"


def is_milvus(location: str | os.PathLike) -> bool:
    return kind(location) != "faiss"


def milvus_settings(collection: str | None = None, token: str | None = None) -> dict[str, Any]:
    """The collection and token: as given, else from the environment, else the defaults."""
    return {
        "collection": collection or os.environ.get(COLLECTION_ENV) or DEFAULT_COLLECTION,
        "token": token if token is not None else os.environ.get(TOKEN_ENV),
    }


def check_location(
    location: str | os.PathLike,
    workers: int,
    collection: str | None = None,
    token: str | None = None,
) -> None:
    """What the server checks before its workers start, so that a wrong setting stops it with
    the reason instead of failing in every worker: a folder or a Milvus Lite file exists (not
    opened: only the worker that serves may hold the file), a Milvus server answers and has
    the collection."""
    match kind(location):
        case "milvus":
            from embedserve.index_milvus import MilvusIndex

            MilvusIndex.open(str(location), **milvus_settings(collection, token)).close()
        case "faiss" if not Path(location).is_dir():
            raise FileNotFoundError(
                f"EMBEDSERVE_INDEX={location}: no such index directory (build one with "
                "`embedserve index build --images DIR --out INDEX_DIR`)"
            )
        case "milvus-lite" if not Path(location).exists():
            raise FileNotFoundError(
                f"EMBEDSERVE_INDEX={location}: no such Milvus Lite file (build one with "
                f"`embedserve index build --images DIR --out {location}`)"
            )
        case "milvus-lite" if workers != 1:
            raise SearchIndexError(
                f"EMBEDSERVE_INDEX={location} is a Milvus Lite file, which only one process can "
                f"open, and EMBEDSERVE_WORKERS={workers}: serve it with one worker, or run "
                f"`milvus-lite server --data-dir {location}` and set "
                "EMBEDSERVE_INDEX=http://HOST:19530 (any number of workers and servers share it)"
            )


def create_index(
    location: str | os.PathLike,
    package: ModelPackage,
    factory: str = DEFAULT_FACTORY,
    search_parameters: dict[str, int] | None = None,
    overwrite: bool = False,
    **milvus: Any,
) -> Any:
    """An empty index at `location` (a FAISS index is written by its first save; a Milvus
    collection is created now)."""
    if not is_milvus(location):
        from embedserve.index import SearchIndex

        return SearchIndex.create(package, factory, search_parameters)
    from embedserve.index_milvus import MilvusIndex

    return MilvusIndex.create(
        str(location),
        package,
        factory,
        search_parameters,
        overwrite=overwrite,
        **milvus_settings(**milvus),
    )


def open_index(
    location: str | os.PathLike, package: ModelPackage | None = None, **milvus: Any
) -> Any:
    """Open the index at `location`; with `package`, refuse one built with another model."""
    if not is_milvus(location):
        from embedserve.index import SearchIndex

        return SearchIndex.load(location, package)
    if kind(location) == "milvus-lite" and not Path(location).exists():
        raise SearchIndexError(
            f"{location}: no such Milvus Lite file (build one with `embedserve index build "
            f"--images DIR --out {location}`)"
        )
    from embedserve.index_milvus import MilvusIndex

    return MilvusIndex.open(str(location), package, **milvus_settings(**milvus))
