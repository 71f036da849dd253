"""SearchIndex deletes, replace, thumbnails, compaction and format-1 indexes: deleted items never
come back, ids are never reused, a replacement is atomic for a concurrent searcher, compaction
removes vectors, rows and thumbnail bytes for good (filters: test_index_filters.py)."""

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
    SearchIndex,
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
