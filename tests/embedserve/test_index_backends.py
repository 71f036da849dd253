"""One suite, both index backends (embedserve.index_backend): the FAISS folder and Milvus (Milvus
Lite, a *.db file). Add, delete, replace, filters, min_score, search by id, thumbnails, labels,
reopening and model binding answer the same, and a filtered search on Flat is the exact top-k
among the matching items (numpy brute force) on both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedserve import index_backend
from embedserve.index_format import IndexMismatchError, ItemNotFound, SearchIndexError
from embedserve.package import ModelPackage

DIM = 16
N = 60
BACKENDS = ["faiss", "milvus"]
# paths with what a Milvus expression or LIKE would misread: wildcards, quotes, a backslash
PATHS = [
    ["a%b/", "a_b/", 'q"x/', "a\\b/", "plain/", "plain/sub/"][i % 6] + f"{i}.png" for i in range(N)
]
LABELS = [["cat", "dog", "bird", None][i % 4] for i in range(N)]


def package(name: str = "m", sha: str = "a" * 64) -> ModelPackage:
    return ModelPackage(Path("."), {"name": name, "sha256": sha, "embedding_dim": DIM})


def vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def thumb(i: int) -> bytes | None:
    """Distinctive bytes standing in for a JPEG, on every other item."""
    if i % 2:
        return None
    return np.random.default_rng(1000 + i).integers(0, 256, 2000 + i, np.uint8).tobytes()


def location(tmp_path: Path, backend: str) -> str:
    return str(tmp_path / ("idx" if backend == "faiss" else "idx.db"))


def reopen(index, where: str, pkg: ModelPackage | None = None):
    """The index as a new process would find it: saved and loaded (FAISS), reopened (Milvus)."""
    index.save(where)
    if hasattr(index, "close"):
        index.close()
    return index_backend.open_index(where, pkg)


@pytest.fixture(params=BACKENDS)
def filled(request, tmp_path):
    """(index, its location, the ids of items 0..N-1 in order): N items with PATHS, LABELS
    and a thumbnail on every other one."""
    where = location(tmp_path, request.param)
    index = index_backend.create_index(where, package())
    added = index.add(vectors(N), PATHS, LABELS, thumbnails=[thumb(i) for i in range(N)])
    ids = [int(i) for i in added]
    yield index, where, ids
    if hasattr(index, "close"):
        index.close()


def hit_ids(row) -> list[int]:
    return [h["id"] for h in row]


def exact(query: np.ndarray, ids: list[int], keep, k: int) -> list[int]:
    """The exact top-k of the items i (positions 0..N-1) with keep(i), as ids."""
    x = vectors(N)
    order = [i for i in np.argsort(-(x @ query), kind="stable") if keep(int(i))]
    return [ids[i] for i in order[:k]]


def test_the_location_chooses_the_backend():
    assert index_backend.kind("indexes/photos") == "faiss"
    assert index_backend.kind("photos.db") == "milvus-lite"
    assert index_backend.kind("http://milvus:19530") == "milvus"
    assert index_backend.kind("https://x.zillizcloud.com") == "milvus"


def test_add_then_search_finds_each_item_first_with_its_row(filled):
    index, _, ids = filled
    assert len(index) == N and len(set(ids)) == N
    hits = index.search(vectors(N)[:5], 3)
    for i, row in enumerate(hits):
        assert row[0]["id"] == ids[i] and row[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert (row[0]["path"], row[0]["label"]) == (PATHS[i], LABELS[i])
        assert [h["score"] for h in row] == sorted((h["score"] for h in row), reverse=True)
    assert index.item(ids[7]) == {"id": ids[7], "path": PATHS[7], "label": LABELS[7]}


@pytest.mark.parametrize(
    "labels, prefix, keep",
    [
        (["cat"], None, lambda i: LABELS[i] == "cat"),
        (["cat", "bird"], None, lambda i: LABELS[i] in ("cat", "bird")),
        (None, "a%b/", lambda i: PATHS[i].startswith("a%b/")),
        (None, "a_", lambda i: PATHS[i].startswith("a_")),  # not a wildcard
        (None, 'q"', lambda i: PATHS[i].startswith('q"')),
        (None, "a\\", lambda i: PATHS[i].startswith("a\\")),
        (None, "plain/", lambda i: PATHS[i].startswith("plain/")),
        (["dog"], "plain/s", lambda i: LABELS[i] == "dog" and PATHS[i].startswith("plain/s")),
        (["nobody"], None, lambda i: False),
    ],
)
def test_filters_give_the_exact_top_k_among_the_matching_items(filled, labels, prefix, keep):
    index, _, ids = filled
    queries = vectors(3, seed=5)
    found = index.search(queries, 7, labels=labels, path_prefix=prefix)
    for q, row in zip(queries, found, strict=True):
        assert hit_ids(row) == exact(q, ids, keep, 7)


def test_min_score_keeps_the_top_k_that_score_enough(filled):
    index, _, ids = filled
    q = vectors(1, seed=9)
    everything = index.search(q, N)[0]
    cut = everything[5]["score"]
    row = index.search(q, 20, min_score=cut)[0]
    assert hit_ids(row) == hit_ids(everything)[: len(row)] and len(row) >= 6
    assert all(h["score"] >= cut for h in row)


def test_search_by_id_leaves_the_item_out_and_respects_filters(filled):
    index, _, ids = filled
    x = vectors(N)
    row = index.search_by_id(ids[4], 5)
    assert hit_ids(row) == exact(x[4], ids, lambda i: i != 4, 5)
    row = index.search_by_id(ids[4], 5, labels=["dog"])
    assert hit_ids(row) == exact(x[4], ids, lambda i: i != 4 and LABELS[i] == "dog", 5)
    with pytest.raises(ItemNotFound):
        index.search_by_id(10**15, 5)


def test_deleted_items_are_gone_and_missing_ones_reported(filled):
    index, where, ids = filled
    result = index.delete(ids=[ids[3], ids[3], 10**14], paths=[PATHS[8], "nowhere.png"])
    assert sorted(result.deleted) == sorted([ids[3], ids[8]])
    assert result.missing_ids == [10**14] and result.missing_paths == ["nowhere.png"]
    assert len(index) == N - 2
    current = index
    for reopened in (False, True):
        if reopened:
            current = reopen(index, where)
        everything = hit_ids(current.search(vectors(N)[[3, 8]], N)[0])
        assert ids[3] not in everything and ids[8] not in everything and len(everything) == N - 2
        assert current.item(ids[3]) is None and current.thumbnail(ids[8]) is None
        assert current.delete(ids=[ids[3]]).missing_ids == [ids[3]]


def test_replace_swaps_the_items_under_the_same_paths(filled):
    index, where, ids = filled
    new = vectors(2, seed=77)
    added = index.add(new, [PATHS[1], PATHS[2]], ["new", "new"], replace=True)
    new_ids = [int(i) for i in added]
    assert sorted(index.last_replaced) == sorted([ids[1], ids[2]])
    assert not set(new_ids) & set(ids)  # never reused
    current = reopen(index, where)
    assert len(current) == N
    assert current.item(ids[1]) is None and current.item(new_ids[0])["label"] == "new"
    assert hit_ids(current.search(new, 1, labels=["new"])[0]) == [new_ids[0]]


def test_thumbnails_and_labels_come_back_as_stored(filled):
    index, where, ids = filled
    current = reopen(index, where)
    for i in (0, 1, 2, 10):
        assert current.thumbnail(ids[i]) == thumb(i)
    counts = {v: LABELS.count(v) for v in ("cat", "dog", "bird")}
    assert current.labels() == dict(sorted(counts.items()))


def test_an_index_of_another_model_is_refused(filled):
    index, where, _ = filled
    index.save(where)
    if hasattr(index, "close"):
        index.close()
    with pytest.raises(IndexMismatchError, match="built with model 'm'"):
        index_backend.open_index(where, package("other", "b" * 64))
    assert len(index_backend.open_index(where, package())) == N


# -- Milvus only ----------------------------------------------------------------------------------


def test_milvus_ids_grow_and_stay_exact_in_javascript(tmp_path):
    from embedserve.index_milvus import new_ids

    first, later = new_ids(3), new_ids(3)
    assert (np.diff(first) == 1).all() and later[0] > first[0] - 4096
    assert first[-1] < 2**53 and first[0] > 10**12  # far above a migrated FAISS index's ids


def test_milvus_flushes_every_flush_rows_additions_and_on_save(tmp_path, monkeypatch):
    from embedserve import index_milvus

    monkeypatch.setattr(index_milvus, "FLUSH_ROWS", 10)
    index = index_backend.create_index(location(tmp_path, "milvus"), package())
    flushes = []
    real_flush = index._client.flush
    monkeypatch.setattr(index._client, "flush", lambda c: (flushes.append(c), real_flush(c)))
    ids = np.concatenate([index.add(vectors(8, seed=s)) for s in range(3)])  # 8, 16, 24 rows
    assert flushes == ["embedserve"] and index.unflushed == 8  # at 16; 8 since
    index.save("ignored")
    assert flushes == ["embedserve"] * 2 and index.unflushed == 0
    index.save("ignored")  # nothing new: no flush
    assert len(flushes) == 2 and len(index) == 24
    found = [
        row[0]["id"] for row in index.search(np.concatenate([vectors(8, s) for s in range(3)]), 1)
    ]
    assert found == ids.tolist()
    index.close()


def test_milvus_refuses_what_it_cannot_hold(tmp_path):
    where = location(tmp_path, "milvus")
    with pytest.raises(SearchIndexError, match="no Milvus equivalent"):
        index_backend.create_index(where, package(), factory="PQ4x4")
    index = index_backend.create_index(where, package(), factory="HNSW16")
    index.close()
    with pytest.raises(SearchIndexError, match="already has a collection"):
        index_backend.create_index(where, package())
    index_backend.create_index(where, package(), overwrite=True).close()
    with pytest.raises(SearchIndexError, match="no collection 'other'"):
        index_backend.open_index(where, collection="other")
    with pytest.raises(SearchIndexError, match="no such Milvus Lite file"):
        index_backend.open_index(str(tmp_path / "absent.db"))


def test_milvus_approximate_indexes_find_each_item(tmp_path):
    where = location(tmp_path, "milvus")
    for factory, params in [("HNSW16", {"efSearch": 32}), ("IVF4,Flat", {"nprobe": 4})]:
        index = index_backend.create_index(where, package(), factory, params, overwrite=True)
        ids = index.add(vectors(N))
        assert hit_ids(index.search(vectors(N)[:1], 20)[0])[0] == ids[0]
        index.close()
        assert index_backend.open_index(where).manifest["search_parameters"] == params


def test_an_unreachable_milvus_server_is_an_index_unavailable_error():
    from embedserve.index_format import IndexUnavailableError

    with pytest.raises(IndexUnavailableError, match="127.0.0.1:1"):
        index_backend.open_index("http://127.0.0.1:1")
    with pytest.raises(IndexUnavailableError, match="127.0.0.1:1"):  # the server's check
        index_backend.check_location("http://127.0.0.1:1", workers=4)


def test_a_milvus_lite_file_open_elsewhere_is_refused_saying_why(tmp_path):
    import subprocess
    import sys

    where = location(tmp_path, "milvus")
    index = index_backend.create_index(where, package())
    try:
        other = subprocess.run(
            [sys.executable, "-m", "embedserve.cli", "index", "info", "--index", where],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        index.close()
    assert other.returncode == 2 and "another process using this Milvus Lite file" in other.stderr


def test_a_milvus_lite_file_needs_one_worker(tmp_path):
    where = tmp_path / "idx.db"
    where.mkdir()
    index_backend.check_location(where, workers=1)
    with pytest.raises(SearchIndexError, match="milvus-lite server"):
        index_backend.check_location(where, workers=2)
    with pytest.raises(FileNotFoundError, match="no such Milvus Lite file"):
        index_backend.check_location(tmp_path / "absent.db", workers=1)
