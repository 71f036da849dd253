"""SearchIndex deletes, replace, filters, "more like this", min_score, thumbnails, compaction, and
format-1 indexes: deleted items never come back, ids are never reused, a filtered Flat search is
the exact top-k among the matching items (numpy brute force), a replacement is atomic for a
concurrent searcher, compaction removes vectors, rows and thumbnail bytes for good."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import faiss
import numpy as np
import pytest

from embedserve import index_format
from embedserve.index import (
    AddResult,
    DeleteResult,
    ItemNotFound,
    SearchIndex,
    SearchIndexError,
)
from tests.embedserve.test_index import DIM, fake_package, filled_index, unit_rows

FACTORIES = ["Flat", "IVF4,Flat", "HNSW16", "IVF4,PQ4x4", "PQ4x4", "SQ8"]


def ids_of(row: list[dict]) -> list[int]:
    return [h["id"] for h in row]


def thumb(i: int, size: int = 3000) -> bytes:
    """Distinctive bytes standing in for a JPEG (the index stores what it is given)."""
    return np.random.default_rng(10_000 + i).integers(0, 256, size, np.uint8).tobytes()


# -- deletes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", FACTORIES)
def test_deleted_items_are_never_returned_and_counts_are_live_items(tmp_path, factory):
    index = filled_index(300, factory)
    result = index.delete(ids=[3, 4, 4, 999], paths=["img/7.png", "img/nope.png"])
    assert result == DeleteResult([3, 4, 7], [999], ["img/nope.png"])
    assert len(index) == index.ntotal == 297 and index.next_id == 300
    gallery = unit_rows(300, 0)
    for where in ("memory", "saved"):
        hits = index.search(gallery[[3, 4, 7, 8]], 300)
        assert all({3, 4, 7}.isdisjoint(ids_of(row)) for row in hits), where
        assert index.item(3) is None and index.item(8)["path"] == "img/8.png"
        assert index.labels() == {"c0": 99, "c1": 98, "c2": 100}
        with pytest.raises(KeyError):
            index.metadata([3])
        index.save(tmp_path / "idx")
        index = SearchIndex.load(tmp_path / "idx", fake_package())
        assert len(index) == 297 and index.index.ntotal == 297
    # deleting again: missing
    assert index.delete(ids=[3]) == DeleteResult([], [3], [])


def test_a_path_deletes_every_live_item_stored_with_it_and_ids_are_never_reused(tmp_path):
    index = filled_index(10)
    index.add(unit_rows(2, 5), ["dup", "dup"])
    assert index.delete(paths=["dup"]).deleted == [10, 11]
    assert index.delete(ids=[9]).deleted == [9]  # the highest saved id
    index.save(tmp_path / "idx")
    index = SearchIndex.load(tmp_path / "idx")
    manifest = json.loads(next((tmp_path / "idx").glob("v*/manifest.json")).read_text())
    assert (manifest["format_version"], manifest["count"], manifest["next_id"]) == (2, 9, 12)
    assert index.next_id == 12
    assert index.add(unit_rows(1, 6)).tolist() == [12]  # not 9, 10 or 11
    index.compact()
    assert index.add(unit_rows(1, 7)).tolist() == [13]


def test_delete_refuses_ids_that_are_not_integers():
    index = filled_index(5)
    with pytest.raises(ValueError):
        index.delete(ids=[1.5])
    assert len(index) == 5
    assert index.delete(ids=2, paths="img/3.png").deleted == [2, 3]  # one id, one path


def test_durable_deletes_survive_a_reload_and_an_empty_one_writes_nothing(tmp_path):
    path = tmp_path / "idx"
    filled_index(10).save(path)
    index = SearchIndex.load(path)
    index.open_log(path)
    added = index.add_durable(unit_rows(2, 1), ["a", "b"], None, [thumb(1), None])
    assert isinstance(added, AddResult) and added.ids.tolist() == [10, 11]
    assert index.delete_durable(ids=[2, 10]).deleted == [2, 10]
    size = index.log_size
    assert index.delete_durable(ids=[2], paths=["zzz"]) == DeleteResult([], [2], ["zzz"])
    assert index.log_size == size
    index.close_log()
    again = SearchIndex.load(path)
    assert len(again) == 10 and again.replayed == 2 and again.replayed_deletions == 2
    assert again.item(2) is None and again.item(10) is None and again.thumbnail(10) is None
    assert again.item(11) == {"id": 11, "path": "b", "label": None}
    assert again.next_id == 12
    again.save(path)  # compacts; the log is emptied
    assert SearchIndex.load(path).index.ntotal == 10


# -- replace ----------------------------------------------------------------------------------


def test_replace_deletes_the_items_stored_under_the_new_paths(tmp_path):
    path = tmp_path / "idx"
    filled_index(10).save(path)
    index = SearchIndex.load(path)
    index.open_log(path)
    result = index.add_durable(unit_rows(2, 3), ["img/1.png", "new"], ["x", "y"], replace=True)
    assert result.ids.tolist() == [10, 11] and result.replaced == [1]
    assert index.add_durable(unit_rows(1, 4), ["img/2.png"]).replaced == []  # not asked
    assert ids_of(index.search(unit_rows(10, 0)[[1]], 10)[0]).count(1) == 0
    index.close_log()
    again = SearchIndex.load(path)
    assert again.item(1) is None and again.item(10)["path"] == "img/1.png"
    assert len(again) == 12  # 10 - 1 replaced + 3 added
    ids = again.add(unit_rows(1, 5), ["img/1.png"], replace=True)
    assert ids.tolist() == [13] and again.last_replaced == [10]


def test_a_concurrent_searcher_sees_the_old_item_or_the_new_never_both_or_neither():
    index = filled_index(200)
    index.add(unit_rows(1, 50), ["target"], ["t"])
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def searcher() -> None:
        try:
            while not stop.is_set():
                for hits in (
                    index.search(unit_rows(1, 50), 5, labels=["t"])[0],
                    index.search(unit_rows(1, 50), 5, path_prefix="targ")[0],
                ):
                    seen.append(len(hits))
                    assert len(hits) == 1, hits
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    i, deadline = 0, time.monotonic() + 60
    while (i < 200 or len(seen) < 200) and time.monotonic() < deadline and not errors:
        index.add(unit_rows(1, 51 + i), ["target"], ["t"], replace=True)
        i += 1
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(seen) >= 200 and len(index) == 201


# -- filters ----------------------------------------------------------------------------------


def labelled(n: int, factory: str = "Flat", dim: int = DIM, **params) -> SearchIndex:
    index = SearchIndex.create(fake_package(dim=dim), factory, params or None)
    paths = [f"{'a' if i % 4 else 'b'}/{i % 7}/{i}.png" for i in range(n)]
    index.add(unit_rows(n, 0, dim), paths, [f"c{i % 10}" for i in range(n)])
    return index


def brute_force(queries, gallery, allowed: np.ndarray, k: int):
    scores = queries @ gallery.T
    scores[:, ~allowed] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[i for i in row if allowed[i]] for row in order], scores


@pytest.mark.parametrize(
    "labels, prefix",
    [
        (["c3"], None),
        (["c1", "c7", "nope"], None),
        (None, "a/2/"),
        (["c0", "c5"], "b/"),
        (None, None),
    ],
)
def test_a_filtered_flat_search_is_the_exact_top_k_among_the_matching_items(labels, prefix):
    n = 3000
    index = labelled(n)
    deleted = np.random.default_rng(1).choice(n, 300, replace=False)
    index.delete(ids=deleted.tolist())
    index.add(unit_rows(50, 9), [f"a/2/new{i}" for i in range(50)], ["c3"] * 50)  # pending rows
    gallery = np.vstack([unit_rows(n, 0), unit_rows(50, 9)])
    paths = [f"{'a' if i % 4 else 'b'}/{i % 7}/{i}.png" for i in range(n)]
    paths += [f"a/2/new{i}" for i in range(50)]
    label_of = [f"c{i % 10}" for i in range(n)] + ["c3"] * 50
    allowed = np.ones(n + 50, bool)
    allowed[deleted] = False
    if labels:
        allowed &= np.isin(label_of, labels)
    if prefix:
        allowed &= np.array([p.startswith(prefix) for p in paths])
    assert allowed.sum() > 40
    queries = unit_rows(20, 3)
    hits = index.search(queries, 25, labels=labels, path_prefix=prefix)
    expected, scores = brute_force(queries, gallery, allowed, 25)
    for q, row in enumerate(hits):
        assert len(row) == 25  # not fewer when enough match
        assert ids_of(row) == expected[q]
        np.testing.assert_allclose([h["score"] for h in row], scores[q, expected[q]], atol=1e-5)
        assert all(allowed[h["id"]] and h["path"] == paths[h["id"]] for h in row)


def test_a_filter_matching_fewer_than_k_returns_all_of_them_and_no_match_returns_none():
    index = labelled(100)
    hits = index.search(unit_rows(2, 1), 50, labels=["c4"], path_prefix="a/")
    expected = {i for i in range(100) if i % 10 == 4 and i % 4}
    assert [set(ids_of(row)) for row in hits] == [expected, expected]
    assert index.search(unit_rows(2, 1), 5, labels=["none"]) == [[], []]
    assert index.search(unit_rows(1, 1), 50, labels="c4") == index.search(
        unit_rows(1, 1), 50, labels=["c4"]
    )
    assert list(index.labels()) == [f"c{i}" for i in range(10)]
    assert index.search(unit_rows(1, 1), 5, path_prefix="zzz") == [[]]
    assert (
        index.search(unit_rows(1, 1), 5, path_prefix="a/3/3")[0]
        == index.search(unit_rows(1, 1), 5, path_prefix="a/3/3")[0]
    )


def test_path_prefix_is_literal_and_works_before_and_after_a_save(tmp_path):
    index = SearchIndex.create(fake_package())
    names = ["p_x/1", "p%x/2", "p_x/3", "pax/4", "p_x", "p_\U0001f600/5", "q/6"]
    index.add(unit_rows(len(names), 0), names)
    for _ in range(2):
        hits = index.search(unit_rows(1, 0), 10, path_prefix="p_x")[0]
        assert sorted(h["path"] for h in hits) == ["p_x", "p_x/1", "p_x/3"]
        hits = index.search(unit_rows(1, 0), 10, path_prefix="p_\U0001f600")[0]
        assert [h["path"] for h in hits] == ["p_\U0001f600/5"]
        index.save(tmp_path / "idx")
        index = SearchIndex.load(tmp_path / "idx")


@pytest.mark.parametrize(
    "factory, params", [("IVF32,Flat", {"nprobe": 8}), ("HNSW16", {"efSearch": 64})]
)
def test_filtered_recall_of_approximate_indexes_is_sane(factory, params):
    dim = 32
    index = labelled(4000, factory, dim, **params)
    gallery, queries = unit_rows(4000, 0, dim), unit_rows(50, 1, dim)

    def recall(hits, expected) -> float:
        return np.mean(
            [len(set(ids_of(r)) & set(e)) / 10 for r, e in zip(hits, expected, strict=True)]
        )

    unfiltered = recall(
        index.search(queries, 10), brute_force(queries, gallery, np.ones(4000, bool), 10)[0]
    )
    index.delete(ids=list(range(0, 4000, 10)))  # 10% deleted
    allowed = np.array([i % 10 == 3 for i in range(4000)])  # a 10% label filter
    expected, _ = brute_force(queries, gallery, allowed, 10)
    hits = index.search(queries, 10, labels=["c3"])
    assert all(allowed[h["id"]] for row in hits for h in row)
    assert all(len(row) == 10 for row in hits)
    # random 32-d data: IVF32 nprobe 8 finds 0.71 of the top 10; with the filter the search
    # is widened (nprobe 8 / sqrt(0.1) = 26 lists) and finds 0.98 of the filtered top 10
    # (without widening, 0.59: they lie farther away, in more lists); HNSW 0.99 and 0.99
    assert recall(hits, expected) >= unfiltered - 0.05 and recall(hits, expected) >= 0.9
    # the index's own nprobe / efSearch are carried into the filtered search
    core = faiss.try_extract_index_ivf(index.index)
    if core is not None:
        core.nprobe = 32  # every list: exact
        hits = index.search(queries, 10, labels=["c3"])
        assert [ids_of(r) for r in hits] == expected


# -- more like this, min_score ----------------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW16"])
def test_search_by_id_uses_the_stored_vector_and_excludes_the_item(factory):
    index = filled_index(300, factory, nprobe=4) if "IVF" in factory else filled_index(300, factory)
    gallery = unit_rows(300, 0)
    hits = index.search_by_id(17, k=5)
    assert 17 not in ids_of(hits) and len(hits) == 5
    expected = index.search(gallery[[17]], 6)[0]
    assert ids_of(hits) == [i for i in ids_of(expected) if i != 17][:5]
    filtered = index.search_by_id(17, k=5, labels=["c1"])
    assert all(h["label"] == "c1" and h["id"] != 17 for h in filtered) and len(filtered) == 5
    index.delete(ids=[17])
    with pytest.raises(ItemNotFound, match="no item with id 17"):
        index.search_by_id(17)
    with pytest.raises(KeyError):
        index.search_by_id(12345)
    assert issubclass(ItemNotFound, SearchIndexError)


def test_min_score_keeps_only_hits_at_or_above_it():
    index = filled_index(500)
    queries = unit_rows(5, 2)
    full = index.search(queries, 50)
    for threshold in (0.2, 0.6, 1.01):
        hits = index.search(queries, 50, min_score=threshold)
        for row, all_row in zip(hits, full, strict=True):
            assert row == [h for h in all_row if h["score"] >= threshold]
    assert len(index.search_by_id(3, 500, min_score=-1.0)) == 499


# -- thumbnails -------------------------------------------------------------------------------


def test_thumbnails_round_trip_in_memory_after_a_save_and_through_the_log(tmp_path):
    path = tmp_path / "idx"
    index = SearchIndex.create(fake_package())
    index.add(unit_rows(3, 0), ["a", "b", "c"], None, [thumb(0), None, thumb(2)])
    assert index.thumbnail(0) == thumb(0) and index.thumbnail(1) is None
    assert index.thumbnail(99) is None
    index.save(path)
    index = SearchIndex.load(path)
    assert [index.thumbnail(i) for i in range(3)] == [thumb(0), None, thumb(2)]
    index.open_log(path)
    index.add_durable(unit_rows(1, 1), ["d"], None, [thumb(3)])
    index.add_durable(unit_rows(1, 2), ["a"], None, [thumb(4)], replace=True)
    index.close_log()
    again = SearchIndex.load(path)
    assert again.thumbnail(3) == thumb(3) and again.thumbnail(4) == thumb(4)
    assert again.thumbnail(0) is None and again.item(0) is None  # replaced
    with pytest.raises(ValueError, match="thumbnails"):
        again.add(unit_rows(2, 1), ["x", "y"], None, [thumb(1)])


# -- compaction -------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", FACTORIES)
def test_compaction_removes_vectors_rows_and_thumbnail_bytes_for_good(tmp_path, factory):
    path = tmp_path / "idx"
    index = filled_index(300, factory)
    index.save(path)
    index = SearchIndex.load(path)
    index.add(unit_rows(2, 7), ["p/0", "p/1"], None, [thumb(900), thumb(901)])
    index.save(path)
    index = SearchIndex.load(path)
    index.add(unit_rows(1, 8), ["p/2"], None, [thumb(902)])  # pending, deleted before a save
    queries = unit_rows(5, 3)
    assert index.delete(ids=[5, 300, 302], paths=["img/9.png"]).deleted == [5, 300, 302, 9]
    before = index.search(queries, 20)
    assert index.compact() == 4 and index.index.ntotal == 299
    after = index.search(queries, 20)
    if factory != "HNSW16":  # HNSW is rebuilt: a new graph, not the same answers
        assert after == before
    index.save(path)
    version = next(path.glob("v*"))
    data = (version / index_format.METADATA_FILE).read_bytes()
    assert thumb(900) not in data and thumb(902) not in data and thumb(901) in data
    assert b"img/9.png" not in data and b"img/8.png" in data
    with sqlite3.connect(version / index_format.METADATA_FILE) as db:
        assert db.execute("SELECT count(*) FROM items").fetchone()[0] == 299
        assert db.execute("SELECT id FROM thumbnails").fetchall() == [(301,)]
    loaded = SearchIndex.load(path)
    assert loaded.index.ntotal == len(loaded) == 299 and loaded.next_id == 303
    assert loaded.thumbnail(301) == thumb(901) and loaded.search_by_id(301, 3)
    got = loaded.search(queries, 20)
    if factory != "HNSW16":
        assert got == before


def test_compaction_waits_for_searches_and_no_search_sees_a_deleted_item():
    index = filled_index(400, "HNSW16")
    gallery = unit_rows(400, 0)
    gone = set(range(0, 400, 3))
    index.delete(ids=sorted(gone))
    stop, errors, done = threading.Event(), [], []

    def searcher() -> None:
        try:
            while not stop.is_set():
                hits = index.search(gallery[:20], 10)
                assert not gone & {h["id"] for row in hits for h in row}
                done.append(1)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 60
        while len(done) < n and time.monotonic() < deadline and not errors:
            time.sleep(0.01)

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(5)  # searching while the compaction waits for the write lock, and after it
    assert index.compact() == len(gone) and index.index.ntotal == 400 - len(gone)
    wait_for(len(done) + 5)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# -- format-1 indexes -------------------------------------------------------------------------


def write_v1_index(path, factory: str, n: int = 300) -> np.ndarray:
    """An index folder as the previous format wrote it: sequential FAISS ids (no IDMap, no
    direct map), a manifest of format_version 1, items without a path index or thumbnails."""
    x = unit_rows(n, 0)
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(x)
    index.add(x)
    version = path / "v000001-0badcafe"
    version.mkdir(parents=True)
    faiss.write_index(index, str(version / "index.faiss"))
    with sqlite3.connect(version / "metadata.sqlite") as db:
        db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT, label TEXT)")
        db.executemany(
            "INSERT INTO items VALUES (?, ?, ?)",
            [(i, f"img/{i}.png", f"c{i % 3}") for i in range(n)],
        )
    manifest = {
        "format": "embedserve-index",
        "format_version": 1,
        "model": {"name": "m", "sha256": "a" * 64},
        "dim": DIM,
        "metric": "inner_product",
        "factory": factory,
        "search_parameters": {},
        "count": n,
        "created": "2026-01-01T00:00:00+00:00",
        "updated": "2026-01-01T00:00:00+00:00",
        "embedserve_version": "0.1.0",
    }
    (version / "manifest.json").write_text(json.dumps(manifest))
    (path / "CURRENT").write_text(version.name + "\n")
    return x


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat", "IVF4,PQ4x4", "PQ4x4"])
def test_a_format_1_index_loads_searches_the_same_and_is_saved_as_format_2(tmp_path, factory):
    path = tmp_path / "idx"
    x = write_v1_index(path, factory)
    plain = faiss.read_index(str(next(path.glob("v*")) / "index.faiss"))
    queries = unit_rows(6, 4)
    ref_scores, ref_ids = plain.search(queries, 8)
    index = SearchIndex.load(path, fake_package())
    assert len(index) == 300 and index.next_id == 300
    hits = index.search(queries, 8)
    assert [ids_of(r) for r in hits] == ref_ids.tolist()
    np.testing.assert_allclose([[h["score"] for h in r] for r in hits], ref_scores, atol=1e-5)
    assert index.item(5) == {"id": 5, "path": "img/5.png", "label": "c2"}
    assert index.delete(paths=["img/5.png"]).deleted == [5]
    assert 4 not in ids_of(index.search_by_id(4, 5))
    assert index.add(x[:1], ["again"], None, [thumb(1)], replace=False).tolist() == [300]
    assert index.search(queries, 8, labels=["c1"])[0]
    index.save(path)
    manifest = json.loads(next(path.glob("v*/manifest.json")).read_text())
    assert (manifest["format_version"], manifest["next_id"], manifest["count"]) == (2, 301, 300)
    again = SearchIndex.load(path, fake_package())
    assert again.item(5) is None and again.thumbnail(300) == thumb(1)
    assert len(again) == 300 and again.index.ntotal == 300


def test_a_format_1_log_record_is_still_replayed(tmp_path):
    import struct
    import zlib

    path = tmp_path / "idx"
    write_v1_index(path, "Flat", 10)
    x = unit_rows(2, 8)
    meta = json.dumps([["old/a", "x"], ["old/b", None]]).encode()
    payload = struct.pack("<QIII", 10, 2, DIM, len(meta)) + meta + x.tobytes()
    record = struct.pack("<4sII", b"EWR1", len(payload), zlib.crc32(payload)) + payload
    (path / "wal.log").write_bytes(record)
    index = SearchIndex.load(path)
    assert index.replayed == 2 and len(index) == 12
    assert index.item(11) == {"id": 11, "path": "old/b", "label": None}
    index.open_log(path)  # new records after the old one
    index.delete_durable(ids=[10])
    index.close_log()
    again = SearchIndex.load(path)
    assert again.item(10) is None and len(again) == 11 and again.next_id == 12


def test_an_index_whose_search_refuses_selectors_is_filtered_after_searching():
    index = labelled(2000, "PQ4x4")  # IndexPQ's search takes no selector
    index.delete(ids=list(range(0, 2000, 10)))
    hits = index.search(unit_rows(10, 1), 10, labels=["c3"], path_prefix="a/")
    assert all(len(row) == 10 for row in hits)
    assert all(h["label"] == "c3" and h["path"].startswith("a/") for row in hits for h in row)
    assert index.search(unit_rows(1, 1), 10, labels=["nope"]) == [[]]


def test_the_search_parameters_travel_with_the_selector():
    from embedserve import index_ids

    hnsw = SearchIndex.create(fake_package(), "HNSW16", {"efSearch": 77})
    ivf = SearchIndex.create(fake_package(), "IVF4,Flat", {"nprobe": 3})
    selector = faiss.IDSelectorAll()
    assert index_ids._params(hnsw.index, selector).efSearch == 77
    assert index_ids._params(ivf.index, selector).nprobe == 3
    # a selector keeping a share s of the vectors widens the search by 1 / sqrt(s)
    assert index_ids._params(hnsw.index, selector, 0.25).efSearch == 154
    assert index_ids._params(hnsw.index, selector, 1e-9).efSearch == index_ids.MAX_EF_SEARCH
    assert index_ids._params(ivf.index, selector, 0.25).nprobe == 4  # every list, no more
    assert index_ids._params(ivf.index, selector, 1.0).nprobe == 3
    assert isinstance(hnsw.index, faiss.IndexIDMap2)  # not IVF: an IDMap2 holds the ids
    assert faiss.extract_index_ivf(ivf.index).direct_map.type == faiss.DirectMap.Hashtable


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_searches_go_on_while_a_save_writes_and_never_see_a_deleted_item(
    tmp_path, monkeypatch, factory
):
    from embedserve import index as ix

    index = filled_index(300, factory)
    gallery = unit_rows(300, 0)
    gone = set(range(0, 300, 3))
    index.delete(ids=sorted(gone))
    reached, go = threading.Event(), threading.Event()

    def checkpoint(step: str) -> None:
        if step == "metadata-written":  # compacted, files half-written
            reached.set()
            go.wait(30)

    monkeypatch.setattr(ix, "_save_checkpoint", checkpoint)
    saver = threading.Thread(target=index.save, args=(tmp_path / "idx",))
    saver.start()
    try:
        assert reached.wait(30)
        hits = index.search(gallery[:30], 10)  # answered while the save waits
        assert not gone & {h["id"] for row in hits for h in row}
        assert index.index.ntotal == len(index) == 200 and index.item(3) is None
    finally:
        go.set()
        saver.join(30)
    assert SearchIndex.load(tmp_path / "idx").search(gallery[:30], 10) == hits
