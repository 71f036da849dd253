"""A writer doing interleaved durable additions, replacements and deletions, SIGKILLed at random
moments, between a log record's write and its fsync, half-way through writing a record, and at
each step of a save (which compacts): after every reload, every acknowledged change is there,
nothing deleted comes back, and ids are never reused."""

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

from embedserve.index import SearchIndex
from tests.embedserve.test_index import DIM, ROOT, fake_package, filled_index, unit_rows

WRITER = textwrap.dedent(
    """
    import os, random, sys, time
    from pathlib import Path
    import numpy as np
    from embedserve import index as ix, index_log
    from embedserve.package import ModelPackage

    folder, start, seed, pause_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    package = ModelPackage(Path("."), {"name": "m", "sha256": "a" * 64, "embedding_dim": 8})

    def say(*parts):  # one write(2) of a whole line: a kill cannot tear it
        os.write(1, (" ".join(map(str, parts)) + "\\n").encode())

    index = ix.SearchIndex.load(folder, package)
    index.open_log(folder)
    live = [i for i in range(index.next_id) if index.item(i) is not None]
    say("loaded", len(index))
    op = ""

    def pause(step):
        if pause_at in (step, f"{step}:{op}"):
            say("paused", step)
            time.sleep(120)  # the parent kills us here

    index_log._log_checkpoint = pause
    ix._save_checkpoint = pause
    if pause_at.startswith("torn:"):  # write half of a record, then wait to be killed
        write = index_log.WriteAheadLog._write

        def torn(self, record):
            if pause_at == f"torn:{op}":
                import os
                os.write(self._fd, record[: len(record) // 2])
                pause(pause_at)
            write(self, record)

        index_log.WriteAheadLog._write = torn

    def vector(n):
        x = np.random.default_rng(n).normal(size=(1, 8)).astype(np.float32)
        return x / np.linalg.norm(x)

    rng = random.Random(seed)
    for n in range(start, start + 10_000):
        roll = rng.random()
        if roll < 0.3 and live:
            op = "del"
            victim = rng.choice(live)
            say("op del", victim)
            deleted = index.delete_durable(ids=[victim]).deleted
            live.remove(victim)
            say("ack del", victim, ",".join(map(str, deleted)))
        else:
            op = "add"
            old = index.item(rng.choice(live)) if roll > 0.8 and live else None
            path = old["path"] if old else f"item-{n}"
            say("op add", n, path)
            added = index.add_durable(vector(n), [path], replace=old is not None)
            new = int(added.ids[0])
            live = [i for i in live if i not in added.replaced] + [new]
            say("ack add", n, new, path, ",".join(map(str, added.replaced)))
        if n % 9 == 8:
            op = "save"
            index.save(folder)  # compacts, then empties the log
    """
)


def vector(n: int) -> np.ndarray:
    x = np.random.default_rng(n).normal(size=(1, DIM)).astype(np.float32)
    return x / np.linalg.norm(x)


class Model:
    """What the parent knows was acknowledged: live ids (path, vector seed), deleted ids, the
    largest id ever given, and the operation in flight when the child was killed."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[str, int | None]] = {
            i: (f"img/{i}.png", None) for i in range(10)
        }
        self.deleted: set[int] = set()
        self.max_id = 9
        self.next_seed = 0
        self.in_flight: list[str] = []

    def line(self, line: str) -> None:
        assert not line or line.endswith("\n"), f"a torn line from the writer: {line!r}"
        parts = line.split()
        if not parts or parts[0] not in ("op", "ack"):
            return
        if parts[0] == "op":
            self.in_flight = parts[1:]
            if parts[1] == "add":
                self.next_seed = int(parts[2]) + 1
            return
        self.in_flight = []
        if parts[1] == "del":
            for i in map(int, filter(None, (parts[3] if len(parts) > 3 else "").split(","))):
                self.live.pop(i)
                self.deleted.add(i)
        else:
            seed, new, path = int(parts[2]), int(parts[3]), parts[4]
            assert new > self.max_id, f"id {new} given again"
            self.max_id = new
            for i in map(int, filter(None, (parts[5] if len(parts) > 5 else "").split(","))):
                self.live.pop(i)
                self.deleted.add(i)
            self.live[new] = (path, seed)

    def settle(self, index: SearchIndex) -> None:
        """An operation in flight when the child died may or may not be there: see which."""
        if not self.in_flight:
            return
        if self.in_flight[0] == "del":
            victim = int(self.in_flight[1])
            if index.item(victim) is None:
                self.live.pop(victim)
                self.deleted.add(victim)
        else:
            seed, path = int(self.in_flight[1]), self.in_flight[2]
            found = [i for i in range(self.max_id + 1, index.next_id) if index.item(i)]
            if found:
                assert len(found) == 1 and index.item(found[0])["path"] == path
                for i, (old_path, _) in list(self.live.items()):
                    if old_path == path:  # it replaced the item under its path
                        self.live.pop(i)
                        self.deleted.add(i)
                self.live[found[0]] = (path, seed)
            self.max_id = max(self.max_id, index.next_id - 1)
        self.in_flight = []

    def check(self, path: Path) -> SearchIndex:
        index = SearchIndex.load(path, fake_package())
        self.settle(index)
        for i, (item_path, _) in self.live.items():
            assert index.item(i) == {"id": i, "path": item_path, "label": None}, f"lost {i}"
        for i in self.deleted:
            assert index.item(i) is None, f"deleted id {i} came back"
        assert len(index) == len(self.live)
        assert index.next_id > self.max_id  # ids are never reused
        paths = [p for p, _ in self.live.values()]
        assert len(set(paths)) == len(paths), "a replaced item is still there"
        seeds = [s for s in self.live.values() if s[1] is not None][-5:]
        for _, seed in seeds:  # the newest items are found by their vectors
            assert index.search(vector(seed), 1)[0][0]["score"] > 0.999
        hits = index.search(np.vstack([unit_rows(10, 0), *map(vector, range(self.next_seed))]), 3)
        assert not self.deleted & {h["id"] for row in hits for h in row}
        return index


def run(path: Path, start: int, seed: int, pause_at: str, stderr) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(start), str(seed), pause_at],
        cwd=path.parent,  # nothing is written anywhere else
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


# random moments; a record written but not fsynced, and half-written, for an addition and a
# deletion; each step of a save (a compaction), including between the commit and the log's
# emptying
RANDOM_KILLS = 30

PAUSES = [""] * RANDOM_KILLS + [
    "record-written:add",
    "record-written:del",
    "torn:add",
    "torn:del",
    "index-written",
    "metadata-written",
    "version-renamed",
    "pointer-replaced",
    "log-emptied",
    "cleaned",
]


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])  # compaction: remove, rebuild
def test_interleaved_additions_and_deletions_survive_sigkill_at_any_point(tmp_path, factory):
    path = tmp_path / "idx"
    filled_index(10, factory).save(path)
    rng = random.Random(37)
    model = Model()
    kills = acks = 0
    paused: list[str] = []
    for attempt, pause_at in enumerate(PAUSES):
        log = tmp_path / f"child-{attempt}.err"
        with open(log, "w") as stderr:
            child = run(path, model.next_seed, 1000 + attempt, pause_at, stderr)
        assert child.stdout.readline().startswith("loaded")
        deadline = time.monotonic() + (rng.uniform(0.1, 1.0) if not pause_at else 60)
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if line.startswith("paused"):
                paused.append(pause_at)
                break
            if not line:
                break
            acks += line.startswith("ack")
            model.line(line)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        kills += 1
        for line in child.stdout:  # written before the kill: acknowledged too
            acks += line.startswith("ack")
            model.line(line)
        child.stdout.close()
        errors = [x for x in log.read_text().splitlines() if "Error" in x or "Traceback" in x]
        assert not errors, log.read_text()[-3000:]
        model.check(path)
    assert kills == len(PAUSES) and paused == PAUSES[RANDOM_KILLS:]
    assert acks > 60 and len(model.deleted) > 10
    print(
        f"{factory}: {kills} kills ({len(paused)} at chosen points), {acks} acknowledged changes, "
        f"{len(model.deleted)} deleted, {len(model.live)} live"
    )
