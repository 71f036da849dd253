"""How the search index is laid out in Milvus: the collection's schema, its properties (the
manifest: model name and sha256, dimension, factory), the vector index that a FAISS factory
string stands for, and the filter expressions of a search.

    id         INT64, primary key (chosen by embedserve: embedserve.index_milvus.new_ids)
    vector     FLOAT_VECTOR(dim), metric IP (embeddings are L2-normalized: cosine similarity)
    path       VARCHAR(4096), nullable
    label      VARCHAR(1024), nullable
    thumbnail  ARRAY<VARCHAR(65535)>: the JPEG's base64 text in pieces (empty: none)

Filters are Milvus boolean expressions: `label in [...]`, and a path prefix as the range
`path >= "p" and path < "q"` (q: p with its last character's code point plus one), which
needs no escaping of LIKE's wildcards; string literals escape backslashes and quotes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from embedserve.index_format import FORMAT, SearchIndexError

ID_EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, the origin of embedserve's Milvus ids
PATH_BYTES = 4096
LABEL_BYTES = 1024
THUMB_PIECES = 64  # up to 64 x 60,000 base64 characters: a 2.8 MB JPEG


def collection_schema(dim: int) -> Any:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("path", DataType.VARCHAR, max_length=PATH_BYTES, nullable=True)
    schema.add_field("label", DataType.VARCHAR, max_length=LABEL_BYTES, nullable=True)
    schema.add_field(
        "thumbnail",
        DataType.ARRAY,
        element_type=DataType.VARCHAR,
        max_capacity=THUMB_PIECES,
        max_length=65535,
    )
    return schema


class _Properties:
    """The manifest as the collection's properties: `embedserve.manifest` (JSON) and, for
    people browsing the collection, `embedserve.model` and `embedserve.model_sha256`."""

    KEY = "embedserve.manifest"
    KEPT = (
        "format",
        "format_version",
        "model",
        "dim",
        "metric",
        "factory",
        "search_parameters",
        "created",
        "embedserve_version",
    )

    def write(self, manifest: dict[str, Any]) -> dict[str, str]:
        kept = {k: manifest[k] for k in self.KEPT}
        return {
            self.KEY: json.dumps(kept, sort_keys=True),
            "embedserve.model": manifest["model"]["name"],
            "embedserve.model_sha256": manifest["model"]["sha256"],
        }

    def read(self, properties: dict[str, str], where: str) -> dict[str, Any]:
        try:
            manifest = json.loads(properties[self.KEY])
        except (KeyError, ValueError):
            raise SearchIndexError(
                f"{where} was not made by embedserve (no {self.KEY} property): build one with "
                "`embedserve index build` or migrate a FAISS index with `embedserve index migrate`"
            ) from None
        if manifest.get("format") != FORMAT:
            raise SearchIndexError(f"{where}: not an {FORMAT} collection")
        return manifest


PROPERTY = _Properties()

_FACTORY = re.compile(r"^(?:(Flat)|HNSW(\d+)|IVF(\d+),(Flat|SQ8|PQ(\d+)))$")


def index_parameters(factory: str, dim: int) -> Callable[[Any], Any]:
    """The Milvus vector index of a FAISS factory string (a function of the client that makes
    its IndexParams); SearchIndexError for a factory with no Milvus equivalent."""
    m = _FACTORY.match(factory.replace(" ", ""))
    if m is None:
        raise SearchIndexError(
            f"factory {factory!r} has no Milvus equivalent here: use Flat, HNSW<M>, "
            "IVF<nlist>,Flat, IVF<nlist>,SQ8 or IVF<nlist>,PQ<m>"
        )
    flat, hnsw_m, nlist, ivf_kind, pq_m = m.groups()
    if flat:
        kind, params = "FLAT", {}
    elif hnsw_m:
        kind, params = "HNSW", {"M": int(hnsw_m), "efConstruction": 40}  # FAISS's default
    elif ivf_kind == "Flat":
        kind, params = "IVF_FLAT", {"nlist": int(nlist)}
    elif ivf_kind == "SQ8":
        kind, params = "IVF_SQ8", {"nlist": int(nlist)}
    else:
        if dim % int(pq_m):
            raise SearchIndexError(f"factory {factory!r}: PQ{pq_m} must divide the dimension {dim}")
        kind, params = "IVF_PQ", {"nlist": int(nlist), "m": int(pq_m), "nbits": 8}

    def make(client: Any) -> Any:
        index_params = client.prepare_index_params()
        index_params.add_index("vector", index_type=kind, metric_type="IP", params=params)
        return index_params

    return make


def search_parameters(factory: str, saved: dict[str, int]) -> Callable[[int], dict[str, int]]:
    """The search parameters for k results: nprobe (IVF, FAISS's default 1) or ef (HNSW,
    FAISS's default efSearch 16; Milvus needs ef >= k), as the manifest saved them."""
    if factory.startswith("IVF"):
        nprobe = int(saved.get("nprobe", 1))
        return lambda k: {"nprobe": nprobe}
    if factory.startswith("HNSW"):
        ef = int(saved.get("efSearch", 16))
        return lambda k: {"ef": max(ef, k)}
    return lambda k: {}


def literal(text: str) -> str:
    """A Milvus string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def filter_expression(
    labels: Sequence[str] | None = None,
    path_prefix: str | None = None,
    exclude_ids: Sequence[int] | None = None,
    paths: Sequence[str] | None = None,
) -> str:
    """The Milvus filter of a search or query ("" for none): a label among `labels`, a path
    starting with `path_prefix` or among `paths`, an id not in `exclude_ids`."""
    terms = []
    if labels:
        terms.append(f"label in [{', '.join(literal(str(v)) for v in labels)}]")
    if path_prefix:
        after = min(ord(path_prefix[-1]) + 1, 0x10FFFF)
        after = 0xE000 if 0xD800 <= after < 0xE000 else after  # past the surrogates
        upper = path_prefix[:-1] + chr(after)
        terms.append(f"(path >= {literal(path_prefix)} and path < {literal(upper)})")
    if paths is not None:
        terms.append(f"path in [{', '.join(literal(str(p)) for p in paths)}]")
    if exclude_ids:
        terms.append(f"id not in [{', '.join(str(int(i)) for i in exclude_ids)}]")
    return " and ".join(terms)
