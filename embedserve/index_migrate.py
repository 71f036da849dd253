"""Copy a FAISS index folder into Milvus, then check the copy.

    report = migrate("indexes/photos", "http://milvus:19530")   # or "photos.db"
    embedserve index migrate --from indexes/photos --to http://milvus:19530

Every live item goes over with its id, vector, path, label and thumbnail, in batches, into a new
collection bound to the same model (name, sha256) with the Milvus equivalent of the folder's
factory (or `factory`). Then the copy is checked: the counts are equal, a sample of items has
the same path, label and thumbnail on both sides, and the same sample's searches (each item's
vector as the query, k=10) find the same neighbours (`overlap`: the mean share of the FAISS
top 10 that Milvus returns too; a migration below `min_overlap` fails). Vectors of a
compressed FAISS index (PQ, SQ) go over as FAISS reconstructs them. The folder is only read.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedserve.index import SearchIndex
from embedserve.index_format import SearchIndexError
from embedserve.index_milvus import MilvusIndex


@dataclass
class MigrationReport:
    source: str
    target: str
    collection: str
    factory: str
    items: int  # copied
    target_items: int  # counted in Milvus afterwards
    thumbnails: int  # copied
    sampled: int  # items checked
    rows_equal: int  # sampled items with the same path, label and thumbnail on both sides
    overlap: float  # mean share of FAISS's top 10 found by Milvus too, over the sample
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def migrate(
    source: str | Path,
    target: str,
    collection: str,
    token: str | None = None,
    factory: str | None = None,
    overwrite: bool = False,
    batch: int = 1000,
    sample: int = 50,
    min_overlap: float = 0.9,
    progress: bool = True,
) -> MigrationReport:
    """Copy the FAISS index at `source` into a new collection at `target`, then check it
    (module docstring); SearchIndexError when the check fails."""
    from tqdm import tqdm

    start = time.perf_counter()
    src = SearchIndex.load(source)
    manifest = {**src.manifest, "factory": factory or src.manifest["factory"]}
    dst = MilvusIndex.create_like(target, manifest, collection, token, overwrite)
    try:
        ids = src.live_ids()
        thumbs = 0
        bar = tqdm(
            total=len(ids), unit="item", desc="migrate", disable=not progress, file=sys.stderr
        )
        with bar:
            for i in range(0, len(ids), batch):
                chunk = ids[i : i + batch].tolist()
                rows = src.metadata(chunk)
                jpegs = [src.thumbnail(j) for j in chunk]
                thumbs += sum(j is not None for j in jpegs)
                paths, labels = zip(*rows, strict=True) if rows else ((), ())
                dst.add(src.vectors(chunk), list(paths), list(labels), jpegs, ids=chunk)
                bar.update(len(chunk))
        dst.save()  # the last rows flushed: the checks and the first searches run on segments
        report = MigrationReport(
            str(source),
            target,
            collection,
            manifest["factory"],
            len(ids),
            len(dst),
            thumbs,
            0,
            0,
            1.0,
            0.0,
        )
        _check(src, dst, ids, sample, report)
        report.seconds = round(time.perf_counter() - start, 2)
    finally:
        dst.close()
    if report.target_items != report.items:
        raise SearchIndexError(
            f"migration to {target}: {report.items} items copied, but the collection holds "
            f"{report.target_items}"
        )
    if report.rows_equal != report.sampled:
        raise SearchIndexError(
            f"migration to {target}: {report.sampled - report.rows_equal} of {report.sampled} "
            "sampled items differ (path, label or thumbnail)"
        )
    if report.overlap < min_overlap:
        raise SearchIndexError(
            f"migration to {target}: the sampled searches agree on {report.overlap:.0%} of their "
            f"top 10, below {min_overlap:.0%} (an approximate target index? see --factory)"
        )
    return report


def _check(src: SearchIndex, dst: MilvusIndex, ids: np.ndarray, n: int, report: Any) -> None:
    """Compare `n` random items (rows, thumbnails) and their searches on both sides."""
    if not len(ids):
        return
    rng = np.random.default_rng(0)
    chosen = rng.choice(ids, size=min(n, len(ids)), replace=False).tolist()
    report.sampled = len(chosen)
    for item_id, (path, label) in zip(chosen, src.metadata(chosen), strict=True):
        there = dst.item(item_id)
        same = there is not None and (there["path"], there["label"]) == (path, label)
        report.rows_equal += bool(same and dst.thumbnail(item_id) == src.thumbnail(item_id))
    queries = src.vectors(chosen)
    k = min(10, len(ids))
    faiss_hits = src.search(queries, k)
    milvus_hits = dst.search(queries, k)
    shares = [
        len({h["id"] for h in a} & {h["id"] for h in b}) / max(1, len(a))
        for a, b in zip(faiss_hits, milvus_hits, strict=True)
    ]
    report.overlap = round(float(np.mean(shares)), 4)
