"""The search index in Milvus: one collection, shared by every worker and server that opens it.

    index = MilvusIndex.create("photos.db", package)            # Milvus Lite, a local file
    index = MilvusIndex.create("http://milvus:19530", package)  # a Milvus server
    index = MilvusIndex.open("http://milvus:19530", package)    # refuses another model's
    index.add(embeddings, paths, labels, thumbnails, replace=True)
    index.delete(ids=[3], paths=["img/9.png"])
    index.search(queries, k=10, labels=["cat"], path_prefix="2024/", min_score=0.3)
    index.search_by_id(7, k=10), index.item(7), index.thumbnail(7), index.labels()

It answers the same calls as the FAISS index (embedserve.index.SearchIndex), with the same
results, so the server and the command line use either (embedserve.index_backend chooses).
The collection (schema: embedserve.milvus_schema) records the model's name and sha256 in its
properties, and an index of another model is refused. Every read is at Strong consistency, so a
change acknowledged by one server is seen by the next search on any other.

Unlike the FAISS folder there is no log or save here: Milvus makes each insert and delete
durable itself. A replace inserts the new items, then deletes the old: a concurrent search may
see both for a moment, never neither, and a crash between the two leaves both (nothing is lost).
Ids are chosen by embedserve (see `new_ids`), so they stay exact in JavaScript's numbers.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from embedserve.config import DEFAULT_MILVUS_COLLECTION as DEFAULT_COLLECTION
from embedserve.index import AddResult, DeleteResult, resolve_delete
from embedserve.index_format import (
    DEFAULT_FACTORY,
    IndexUnavailableError,
    ItemNotFound,
    SearchIndexError,
    check_model,
    new_manifest,
)
from embedserve.index_search import check_embeddings, prepare_items
from embedserve.milvus_schema import (
    ID_EPOCH_MS,
    PROPERTY,
    collection_schema,
    filter_expression,
    index_parameters,
    search_parameters,
)
from embedserve.package import ModelPackage

CHUNK = 500  # rows per insert call (a row with its thumbnail is ~10 kB; gRPC allows 64 MB)
# Rows added by this process before it asks Milvus to flush them into a sealed segment. Milvus
# Lite keeps unflushed rows in a memtable that every search copies into Python: 10^5 of them
# cost 1.6 s per search, and after a flush 0.03-0.05 s (512-d; docs/benchmarks.md). A flush
# takes about 0.1 ms per row. Milvus asks for flushes to be rare: one per 4,096 rows is.
FLUSH_ROWS = 4096
THUMB_PART = 60_000  # base64 characters per element of the thumbnail array (VARCHAR <= 65,535)
OUTPUT = ["path", "label"]


def new_ids(n: int) -> np.ndarray:
    """n fresh ids: milliseconds since 2026-01-01 times 4096, plus a random start in 0..4095,
    then consecutive. They grow with time, stay below 2**53 (exact as JSON numbers in a
    browser) until 2095, and far above the ids of a migrated FAISS index (which count from 0).
    Two servers adding in the same millisecond collide only if their random starts overlap;
    `MilvusIndex.add` checks that no stored item holds them and draws again if one does."""
    ms = int(time.time() * 1000) - ID_EPOCH_MS
    start = ms * 4096 + secrets.randbelow(4096)
    return np.arange(start, start + n, dtype=np.int64)


def _pieces(jpeg: bytes | None) -> list[str]:
    if not jpeg:
        return []
    text = base64.b64encode(jpeg).decode("ascii")
    return [text[i : i + THUMB_PART] for i in range(0, len(text), THUMB_PART)]


class MilvusIndex:
    """One Milvus collection of one model's embeddings, with paths, labels and thumbnails."""

    replayed = 0  # no write-ahead log to replay: Milvus keeps its own
    replayed_deletions = 0
    log_size = 0

    def __init__(self, client: Any, uri: str, collection: str, manifest: dict[str, Any]) -> None:
        self._client, self.uri, self.collection, self.manifest = client, uri, collection, manifest
        self._search_params = search_parameters(manifest["factory"], manifest["search_parameters"])
        self.last_replaced: list[int] = []
        self.unflushed = 0  # rows this process added since its last flush

    # -- opening ------------------------------------------------------------------------------

    @staticmethod
    def _connect(uri: str, token: str | None) -> Any:
        from pymilvus import MilvusClient  # imported only when a Milvus index is used

        # Milvus Lite has no server-side snapshot time for iterators: pymilvus warns at each
        # one and uses the client's clock, which is what a scan of the labels needs anyway.
        logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)

        try:
            with _reached(uri):
                return MilvusClient(uri=uri, token=token or "")
        except IndexUnavailableError as e:
            if not uri.endswith(".db"):
                raise
            raise IndexUnavailableError(
                f"{e}: is another process using this Milvus Lite file (a server)? A file opens "
                "in one process only: stop it, or serve it with `milvus-lite server --data-dir "
                f"{uri}` and use that server's http:// URI from every process"
            ) from e

    @classmethod
    def create(
        cls,
        uri: str,
        package: ModelPackage,
        factory: str = DEFAULT_FACTORY,
        search_parameters: dict[str, int] | None = None,
        collection: str = DEFAULT_COLLECTION,
        token: str | None = None,
        overwrite: bool = False,
    ) -> MilvusIndex:
        """A new, empty collection for `package`'s embeddings. `factory` is a FAISS factory
        string with a Milvus equivalent (Flat, HNSW32, IVF1024,Flat, IVF1024,SQ8,
        IVF1024,PQ64); an existing collection is refused unless `overwrite`."""
        manifest = new_manifest(package, factory, search_parameters)
        return cls.create_like(uri, manifest, collection, token, overwrite)

    @classmethod
    def create_like(
        cls,
        uri: str,
        manifest: dict[str, Any],
        collection: str = DEFAULT_COLLECTION,
        token: str | None = None,
        overwrite: bool = False,
    ) -> MilvusIndex:
        """A new, empty collection described by an index manifest (model, dim, factory,
        search parameters): `create`'s, or a FAISS index's being migrated."""
        manifest = {**manifest, "backend": "milvus", "uri": uri, "collection": collection}
        index_params = index_parameters(manifest["factory"], manifest["dim"])  # before connecting
        client = cls._connect(uri, token)
        with _reached(uri):
            if client.has_collection(collection):
                if not overwrite:
                    client.close()
                    raise SearchIndexError(
                        f"{uri} already has a collection {collection!r}: pass --overwrite to "
                        "replace it, or add to it with `embedserve index add`"
                    )
                client.drop_collection(collection)
            client.create_collection(
                collection,
                schema=collection_schema(manifest["dim"]),
                index_params=index_params(client),
                consistency_level="Strong",
                properties=PROPERTY.write(manifest),
            )
        return cls(client, uri, collection, manifest)

    @classmethod
    def open(
        cls,
        uri: str,
        package: ModelPackage | None = None,
        collection: str = DEFAULT_COLLECTION,
        token: str | None = None,
    ) -> MilvusIndex:
        """Open an existing collection (loaded for search); with `package`, refuse one built
        with another model."""
        client = cls._connect(uri, token)
        with _reached(uri):
            if not client.has_collection(collection):
                client.close()
                raise SearchIndexError(
                    f"{uri} has no collection {collection!r}: build one with `embedserve index "
                    f"build --images DIR --out {uri}`"
                )
            properties = client.describe_collection(collection).get("properties", {})
            manifest = PROPERTY.read(properties, f"{uri} collection {collection!r}")
            client.load_collection(collection)
        manifest.update(backend="milvus", uri=uri, collection=collection)
        index = cls(client, uri, collection, manifest)
        if package is not None:
            index.check_model(package, where=f"{uri} collection {collection!r}")
        return index

    def close(self) -> None:
        self._client.close()

    def check_model(self, package: ModelPackage, where: str = "index") -> None:
        """Raise IndexMismatchError unless the collection was built with `package`'s model."""
        check_model(self.manifest, package, where)

    # -- properties ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    def __len__(self) -> int:
        """The number of items in the collection (all servers' additions, less deletions)."""
        with _reached(self.uri):
            rows = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"MilvusIndex({self.uri!r}, collection {self.collection!r}, {m['factory']!r}, "
            f"{m['dim']}-d, model {m['model']['name']!r})"
        )

    # -- reading ------------------------------------------------------------------------------

    def search(
        self,
        embeddings: np.ndarray,
        k: int = 10,
        labels: Sequence[str] | None = None,
        path_prefix: str | None = None,
        min_score: float | None = None,
        exclude_ids: Sequence[int] | None = None,
    ) -> list[list[dict[str, Any]]]:
        """The k nearest items of each query [N, D], best first, as SearchIndex.search: only
        those with a label in `labels`, a path starting with `path_prefix`, a score of at
        least `min_score`, and none of `exclude_ids` (the filter goes to Milvus, which searches
        the matching items only: on a FLAT collection the exact top k of them)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        x = check_embeddings(embeddings, self.dim)
        if len(x) == 0:
            return []
        expression = filter_expression(labels, path_prefix, exclude_ids)
        with _reached(self.uri):
            found = self._client.search(
                self.collection,
                data=x.tolist(),
                limit=k,
                filter=expression,
                output_fields=OUTPUT,
                search_params={"metric_type": "IP", "params": self._search_params(k)},
                consistency_level="Strong",
            )
        return [
            [
                {
                    "id": int(hit["id"]),
                    "score": float(hit["distance"]),
                    "path": hit["entity"].get("path"),
                    "label": hit["entity"].get("label"),
                }
                for hit in hits
                if min_score is None or hit["distance"] >= min_score
            ]
            for hits in found
        ]

    def search_by_id(
        self,
        item_id: int,
        k: int = 10,
        labels: Sequence[str] | None = None,
        path_prefix: str | None = None,
        min_score: float | None = None,
    ) -> list[dict[str, Any]]:
        """ "More like this": the k nearest items of a stored item, itself excluded;
        ItemNotFound (a KeyError) when no item has this id."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        rows = self._get([int(item_id)], ["vector"])
        if not rows:
            raise ItemNotFound(f"no item with id {item_id} in the index")
        x = np.asarray([rows[0]["vector"]], np.float32)
        return self.search(x, k, labels, path_prefix, min_score, [int(item_id)])[0]

    def _get(self, ids: list[int], fields: list[str]) -> list[dict[str, Any]]:
        ids = [i for i in ids if 0 <= i < 2**63]  # no other id can be stored
        if not ids:
            return []
        with _reached(self.uri):
            return list(self._client.get(self.collection, ids=ids, output_fields=fields))

    def item(self, item_id: int) -> dict[str, Any] | None:
        """{"id", "path", "label"} of an item; None if no item has this id."""
        rows = self._get([int(item_id)], OUTPUT)
        if not rows:
            return None
        return {"id": int(item_id), "path": rows[0].get("path"), "label": rows[0].get("label")}

    def thumbnail(self, item_id: int) -> bytes | None:
        """The thumbnail (JPEG bytes) of an item; None if none is stored or no such item."""
        rows = self._get([int(item_id)], ["thumbnail"])
        if not rows or not rows[0].get("thumbnail"):
            return None
        return base64.b64decode("".join(rows[0]["thumbnail"]))

    def labels(self) -> dict[str, int]:
        """The number of items of each label (items without one not counted). Reads every
        item's label: a scan of the collection."""
        counts: Counter[str] = Counter()
        with _reached(self.uri):
            batches = self._client.query_iterator(
                self.collection,
                batch_size=4096,
                filter="label is not null",
                output_fields=["label"],
            )
            try:
                while rows := batches.next():
                    counts.update(r["label"] for r in rows)
            finally:
                batches.close()
        return dict(sorted(counts.items()))

    def ids_by_path(self, paths: Sequence[str]) -> dict[str, list[int]]:
        """The ids stored under each path (every path a key)."""
        found: dict[str, list[int]] = {p: [] for p in paths}
        unique = list(found)
        for i in range(0, len(unique), 1000):
            expression = filter_expression(paths=unique[i : i + 1000])
            with _reached(self.uri):
                rows = self._client.query(
                    self.collection, filter=expression, output_fields=["path"]
                )
            for row in rows:
                found[row["path"]].append(int(row["id"]))
        return {p: sorted(ids) for p, ids in found.items()}

    # -- changing -----------------------------------------------------------------------------

    def add(
        self,
        embeddings: np.ndarray,
        paths: Sequence[str | None] | None = None,
        labels: Sequence[str | None] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        replace: bool = False,
        ids: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Insert vectors [N, D] with their paths, labels and thumbnails; returns their ids
        (int64 [N]). With `replace`, the items stored under the same paths are deleted after
        the insert (their ids: `last_replaced`). `ids` (a migration's) are used as given
        instead of fresh ones."""
        x, paths, labels, thumbs = prepare_items(embeddings, self.dim, paths, labels, thumbnails)
        n = len(x)
        old = self.ids_by_path([p for p in paths if p is not None]) if replace else {}
        replaced = sorted({i for found in old.values() for i in found})
        new = np.asarray(ids, np.int64) if ids is not None else self._fresh_ids(n)
        rows = [
            {
                "id": int(new[i]),
                "vector": x[i].tolist(),
                "path": paths[i],
                "label": labels[i],
                "thumbnail": _pieces(thumbs[i]),
            }
            for i in range(n)
        ]
        with _reached(self.uri):
            for i in range(0, n, CHUNK):
                self._client.insert(self.collection, rows[i : i + CHUNK])
            if replaced:
                self._client.delete(self.collection, ids=replaced)
        self.unflushed += n
        if self.unflushed >= FLUSH_ROWS:
            self.flush()
        self.last_replaced = replaced
        return new

    def _fresh_ids(self, n: int) -> np.ndarray:
        for _ in range(5):
            ids = new_ids(n)
            taken = self._get(ids[:: max(1, n // 64)].tolist() + [int(ids[-1])] if n else [], [])
            if not taken:
                return ids
        raise SearchIndexError("could not draw unused ids in 5 tries")  # not seen in practice

    def add_durable(
        self,
        embeddings: np.ndarray,
        paths: Sequence[str | None] | None = None,
        labels: Sequence[str | None] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        replace: bool = False,
    ) -> AddResult:
        """`add`, as the server calls it (Milvus makes every insert durable itself): the ids
        and the replaced ids."""
        ids = self.add(embeddings, paths, labels, thumbnails, replace)
        return AddResult(ids, self.last_replaced)

    def delete(self, ids: Sequence[int] = (), paths: Sequence[str] = ()) -> DeleteResult:
        """Delete items by id and by path (a path: every item stored with it)."""
        live = lambda wanted: {int(r["id"]) for r in self._get(wanted, [])}  # noqa: E731
        result = resolve_delete(ids, paths, live, self.ids_by_path)
        if result.deleted:
            with _reached(self.uri):
                self._client.delete(self.collection, ids=result.deleted)
        return result

    delete_durable = delete

    # -- what a FAISS folder needs and a collection does not ------------------------------------

    def open_log(self, folder: Any) -> None:
        """Nothing to open: Milvus logs every change itself."""

    def flush(self) -> None:
        """Seal the rows added since the last flush into a segment (searched fast)."""
        with _reached(self.uri):
            self._client.flush(self.collection)
        self.unflushed = 0

    def save(self, path: Any = None) -> None:
        """Every change is durable in Milvus when its call returns; this flushes the rows
        added since the last flush (FLUSH_ROWS), as the command line does when it is done."""
        if self.unflushed:
            self.flush()


@contextmanager
def _reached(uri: str) -> Iterator[None]:
    """Milvus's own errors as IndexUnavailableError (a 503 from the server, exit 2 from the
    command line), naming the URI; other errors pass."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as e:
        raise IndexUnavailableError(f"Milvus at {uri}: {e.message}") from e
