"""The index's write-ahead log: durable additions survive a reload without a save, replay never
duplicates an id, a torn last record is dropped, damage is refused, one writer at a time, and a
writer SIGKILLed at random moments (and mid-record, and mid-compaction) loses nothing it
acknowledged."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from embedserve import index as ix
from embedserve.index import IndexBusyError, SearchIndex, SearchIndexError
from tests.embedserve.test_index import DIM, ROOT, fake_package, filled_index, unit_rows


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "idx"
    filled_index(10).save(path)
    return path


def writer(path: Path) -> SearchIndex:
    index = SearchIndex.load(path, fake_package())
    index.open_log(path)
    return index


def test_durable_additions_are_there_after_a_reload_without_a_save(saved):
    index = writer(saved)
    ids = index.add_durable(unit_rows(3, 1), ["a", "b", None], ["x", None, "z"]).ids
    assert ids.tolist() == [10, 11, 12]
    assert index.search(unit_rows(3, 1)[[1]], 1)[0][0]["id"] == 11  # searchable at once
    index.close_log()
    again = SearchIndex.load(saved, fake_package())
    assert len(again) == 13 and again.replayed == 3
    assert again.metadata([10, 11, 12]) == [("a", "x"), ("b", None), (None, "z")]
    np.testing.assert_allclose(again.search(unit_rows(3, 1), 1)[2][0]["score"], 1.0, atol=1e-6)


def test_a_save_empties_the_log_and_a_crash_before_that_duplicates_nothing(saved, monkeypatch):
    index = writer(saved)
    index.add_durable(unit_rows(2, 1), ["a", "b"])

    def crash(step: str) -> None:
        if step == "pointer-replaced":  # the new version is live, the log not yet emptied
            raise KeyboardInterrupt

    monkeypatch.setattr(ix, "_save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        index.save(saved)
    index.close_log()
    assert (saved / ix.LOG_FILE).stat().st_size > 0
    again = SearchIndex.load(saved, fake_package())
    assert len(again) == 12 and again.replayed == 0  # the records were skipped: ids 10, 11 saved
    monkeypatch.setattr(ix, "_save_checkpoint", lambda step: None)
    again.open_log(saved)
    again.save(saved)
    assert (saved / ix.LOG_FILE).stat().st_size == 0
    assert again.add_durable(unit_rows(1, 2)).ids.tolist() == [12]


@pytest.mark.parametrize("cut", [1, 7, 12, 40, 100])
def test_a_torn_last_record_is_dropped_and_the_next_one_takes_its_id(saved, cut):
    index = writer(saved)
    index.add_durable(unit_rows(1, 1), ["kept"])
    index.add_durable(unit_rows(2, 2), ["torn", "torn"])
    index.close_log()
    log = saved / ix.LOG_FILE
    os.truncate(log, log.stat().st_size - cut)  # the second record lost its last `cut` bytes
    index = writer(saved)
    assert len(index) == 11 and index.metadata([10]) == [("kept", None)]
    assert index.add_durable(unit_rows(1, 3), ["next"]).ids.tolist() == [11]
    index.close_log()
    assert SearchIndex.load(saved).metadata([10, 11]) == [("kept", None), ("next", None)]


def test_zeros_after_the_last_record_are_a_torn_write(saved):
    index = writer(saved)
    index.add_durable(unit_rows(1, 1))
    index.close_log()
    with open(saved / ix.LOG_FILE, "ab") as f:
        f.write(b"\0" * 300)  # the file grew, its data never reached the disk
    assert len(SearchIndex.load(saved)) == 11


def test_a_damaged_record_followed_by_others_is_refused(saved):
    index = writer(saved)
    for seed in range(3):
        index.add_durable(unit_rows(1, seed))
    index.close_log()
    log = saved / ix.LOG_FILE
    data = bytearray(log.read_bytes())
    data[40] ^= 0xFF  # inside the first record's payload
    log.write_bytes(bytes(data))
    with pytest.raises(SearchIndexError, match="fails its checksum and more records follow"):
        SearchIndex.load(saved)


def test_one_writer_at_a_time(saved):
    first = writer(saved)
    with pytest.raises(IndexBusyError, match="another process is adding"):
        writer(saved)
    first.add_durable(unit_rows(1, 1))
    other = SearchIndex.load(saved)  # a reader sees the addition ...
    assert len(other) == 11
    other.add(unit_rows(1, 2))
    with pytest.raises(IndexBusyError):  # ... but cannot save over the writer's log
        other.save(saved)
    first.close_log()
    other.save(saved)  # now it can: the log's records are in its version, the log is emptied
    assert (saved / ix.LOG_FILE).stat().st_size == 0
    assert len(SearchIndex.load(saved)) == 12


# -- a writer SIGKILLed at random moments ------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from embedserve import index as ix, index_log
    from embedserve.package import ModelPackage

    path, start, pause_at = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    package = ModelPackage(Path("."), {"name": "m", "sha256": "a" * 64, "embedding_dim": 8})
    index = ix.SearchIndex.load(path, package)
    index.open_log(path)
    print("loaded", len(index), flush=True)

    def pause(step):
        if step == pause_at:
            print("paused", step, flush=True)
            time.sleep(120)  # the parent kills us here

    index_log._log_checkpoint = pause  # the log moved from embedserve.index
    ix._save_checkpoint = pause
    for n in range(start, start + 10_000):
        x = np.zeros((1, 8), np.float32)
        x[0, n % 8] = 1.0
        ids = index.add_durable(x, [f"item-{n}"]).ids
        print("ack", n, int(ids[0]), flush=True)  # acknowledged: durable from here
        if n % 7 == 6:
            index.save(path)  # compaction: a new version, then the log is emptied
    """
)


def run_writer(path: Path, start: int, pause_at: str = "") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(start), pause_at],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def check_index(path: Path, acked: dict[str, int]) -> SearchIndex:
    """Every acknowledged item is there with its id, and no id or path is duplicated."""
    index = SearchIndex.load(path, fake_package())
    paths = [p for p, _ in index.metadata(range(len(index)))]
    assert len(set(paths)) == len(paths), "an item was added twice"
    for name, item_id in acked.items():
        assert paths[item_id] == name, f"acknowledged {name} (id {item_id}) is missing"
    return index


def test_a_writer_killed_at_random_moments_loses_no_acknowledged_addition(saved):
    rng = random.Random(1234)
    acked: dict[str, int] = {}
    start = 0
    kills = 0
    # random moments, then mid-record (written, not fsynced) and inside a compaction's save
    pauses = [""] * 6 + ["record-written", "index-written", "pointer-replaced", "log-emptied"]
    for pause_at in pauses:
        child = run_writer(saved, start, pause_at)
        assert child.stdout.readline().startswith("loaded")
        deadline = time.monotonic() + (rng.uniform(0.05, 0.6) if not pause_at else 30)
        line = ""
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if line.startswith("ack"):
                _, n, item_id = line.split()
                acked[f"item-{n}"] = int(item_id)
                start = int(n) + 1
            elif line.startswith("paused") or not line:
                break
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        kills += 1
        # lines already written by the child before the kill were acknowledged too
        for line in child.stdout:
            if line.startswith("ack"):
                _, n, item_id = line.split()
                acked[f"item-{n}"] = int(item_id)
                start = int(n) + 1
        child.stdout.close()
        start += 1  # an item in flight when killed may or may not be there: never reuse it
        check_index(saved, acked)
    index = check_index(saved, acked)
    assert kills == len(pauses) and len(acked) > 20
    assert len(index) >= 10 + len(acked)
    one = np.zeros((1, DIM), np.float32)
    one[0, 3] = 1.0
    assert index.search(one, 1)[0][0]["score"] == pytest.approx(1.0)


def test_an_addition_that_fails_in_memory_leaves_no_record(saved, monkeypatch):
    index = writer(saved)
    index.add_durable(unit_rows(1, 1), ["kept"])
    size = index.log_size

    def broken(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(ix.index_ids, "add_with_ids", broken)
    with pytest.raises(MemoryError):
        index.add_durable(unit_rows(1, 2), ["failed"])
    assert index.log_size == size
    monkeypatch.undo()
    assert index.add_durable(unit_rows(1, 3), ["next"]).ids.tolist() == [11]
    index.close_log()
    again = SearchIndex.load(saved)
    assert again.metadata([10, 11]) == [("kept", None), ("next", None)] and len(again) == 12
