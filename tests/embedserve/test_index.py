"""SearchIndex: exact search against numpy, hits and ids, save/load round trips, refusal of another
model's index, stable ids when adding, concurrent searches, and saves killed half-way (SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from embedserve import index as ix
from embedserve.index import IndexMismatchError, SearchIndex, SearchIndexError
from embedserve.package import ModelPackage

ROOT = Path(__file__).resolve().parents[2]
DIM = 8


def fake_package(name: str = "m", sha: str = "a" * 64, dim: int = DIM) -> ModelPackage:
    """A package with only what an index looks at: name, sha256, embedding size."""
    return ModelPackage(Path("."), {"name": name, "sha256": sha, "embedding_dim": dim})


def unit_rows(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def filled_index(n: int = 50, factory: str = "Flat", seed: int = 0, **params) -> SearchIndex:
    index = SearchIndex.create(fake_package(), factory, params or None)
    index.add(
        unit_rows(n, seed), [f"img/{i}.png" for i in range(n)], [f"c{i % 3}" for i in range(n)]
    )
    return index


def test_search_equals_numpy_brute_force_with_paths_and_labels():
    index = filled_index(200)
    gallery, queries = unit_rows(200, 0), unit_rows(7, 1)
    hits = index.search(queries, k=5)
    reference = queries @ gallery.T
    for q, row in enumerate(hits):
        expected = np.argsort(-reference[q])[:5]
        assert [h["id"] for h in row] == expected.tolist()
        np.testing.assert_allclose([h["score"] for h in row], reference[q, expected], atol=1e-5)
        assert [h["path"] for h in row] == [f"img/{i}.png" for i in expected]
        assert [h["label"] for h in row] == [f"c{i % 3}" for i in expected]
    json.dumps(hits)  # JSON-serialisable as it is


def test_k_larger_than_the_index_returns_only_real_hits():
    index = filled_index(4)
    hits = index.search(unit_rows(2, 1), k=10)
    assert [len(row) for row in hits] == [4, 4]
    assert all(h["id"] >= 0 for row in hits for h in row)
    assert SearchIndex.create(fake_package()).search(unit_rows(1, 1), k=3) == [[]]


def test_an_approximate_index_that_finds_fewer_than_k_returns_no_placeholders():
    index = filled_index(300, "IVF16,Flat", nprobe=1)  # one list of ~20 vectors is searched
    hits = index.search(unit_rows(3, 1), k=100)
    assert all(0 < len(row) < 100 for row in hits)
    assert all(h["id"] >= 0 and h["path"] is not None for row in hits for h in row)


def test_search_refuses_wrong_shapes_and_bad_k():
    index = filled_index(4)
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        index.search(np.zeros((1, 5), np.float32), 1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(unit_rows(1, 1), 0)


def test_search_does_not_modify_the_callers_array():
    index = filled_index(10)
    queries = unit_rows(3, 1).astype(np.float64)
    before = queries.copy()
    index.search(queries, 2)
    np.testing.assert_array_equal(queries, before)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW16", "IVF4,PQ4x4"])
def test_save_load_round_trip_gives_the_same_answers(tmp_path, factory):
    index = filled_index(300, factory)
    queries = unit_rows(5, 1)
    before = index.search(queries, 6)
    index.save(tmp_path / "idx")
    loaded = SearchIndex.load(tmp_path / "idx", fake_package())
    assert loaded.search(queries, 6) == before
    assert len(loaded) == loaded.ntotal == 300 and loaded.dim == DIM
    manifest = loaded.manifest
    assert manifest["model"] == {"name": "m", "sha256": "a" * 64}
    assert (manifest["factory"], manifest["metric"], manifest["count"]) == (
        factory,
        "inner_product",
        300,
    )
    assert {"created", "updated"} <= set(manifest)
    on_disk = json.loads(next((tmp_path / "idx").glob("v*/manifest.json")).read_text())
    assert on_disk == manifest


def test_search_parameters_are_saved_and_set_on_load(tmp_path):
    index = filled_index(300, "IVF8,Flat", nprobe=8)  # nprobe = nlist: exact
    index.save(tmp_path / "idx")
    loaded = SearchIndex.load(tmp_path / "idx")
    exact = filled_index(300).search(unit_rows(4, 2), 5)
    assert [[h["id"] for h in row] for row in loaded.search(unit_rows(4, 2), 5)] == [
        [h["id"] for h in row] for row in exact
    ]
    with pytest.raises(SearchIndexError, match="do not apply"):
        SearchIndex.create(fake_package(), "Flat", {"efSearch": 10})


def test_loading_with_another_model_is_refused(tmp_path):
    filled_index(10).save(tmp_path / "idx")
    with pytest.raises(IndexMismatchError, match="built with model 'm'"):
        SearchIndex.load(tmp_path / "idx", fake_package(sha="b" * 64))
    with pytest.raises(IndexMismatchError, match="built with model 'm'"):
        SearchIndex.load(tmp_path / "idx", fake_package(name="other"))
    with pytest.raises(IndexMismatchError, match="8-d"):
        SearchIndex.load(tmp_path / "idx", fake_package(dim=16))
    assert issubclass(IndexMismatchError, SearchIndexError)


def test_loading_what_is_not_an_index_says_so(tmp_path):
    with pytest.raises(SearchIndexError, match="no search index here"):
        SearchIndex.load(tmp_path)
    (tmp_path / "CURRENT").write_text("v000009-gone\n")
    with pytest.raises(SearchIndexError, match="does not exist"):
        SearchIndex.load(tmp_path)


def test_invalid_factory_and_untrainable_data_are_clear_errors():
    with pytest.raises(SearchIndexError, match="factory string 'Nonsense42'"):
        SearchIndex.create(fake_package(), "Nonsense42")
    index = SearchIndex.create(fake_package(), "IVF64,Flat")
    with pytest.raises(SearchIndexError, match="cannot train"):
        index.add(unit_rows(10, 0))


def test_adding_keeps_existing_ids_and_new_items_get_the_next_ones(tmp_path):
    index = filled_index(20)
    index.save(tmp_path / "idx")
    index = SearchIndex.load(tmp_path / "idx")
    before = index.metadata(range(20))
    ids = index.add(unit_rows(5, 9), [f"new/{i}.png" for i in range(5)], None)
    assert ids.tolist() == list(range(20, 25))
    index.save(tmp_path / "idx")
    index = SearchIndex.load(tmp_path / "idx")
    assert index.metadata(range(20)) == before
    assert index.metadata([22]) == [("new/2.png", None)]
    # an old vector still finds itself under its old id; a new one under its new id
    assert index.search(unit_rows(20, 0)[[7]], 1)[0][0]["id"] == 7
    assert index.search(unit_rows(5, 9)[[3]], 1)[0][0]["id"] == 23
    # one live version remains after the save
    assert len(list((tmp_path / "idx").glob("v*"))) == 1


def test_pending_and_saved_rows_are_both_found_before_a_save(tmp_path):
    index = filled_index(10)
    index.save(tmp_path / "idx")
    index.add(unit_rows(2, 5), ["p/a", "p/b"], ["x", "y"])
    assert index.metadata([0, 11]) == [("img/0.png", "c0"), ("p/b", "y")]


def test_concurrent_searches_while_adding_stay_consistent():
    index = filled_index(100)
    queries = unit_rows(8, 3)
    errors: list[BaseException] = []

    def searcher() -> None:
        try:
            for _ in range(30):
                hits = index.search(queries, 3)
                assert all(len(row) == 3 for row in hits)
                assert all(h["path"] is not None or h["id"] >= 100 for row in hits for h in row)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(10):
        index.add(unit_rows(5, 100 + i))  # no paths: ids >= 100 have none
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(index) == 150


# -- a save killed half-way -------------------------------------------------------------------

SAVE_STEPS = [
    "temp-dir-created",
    "index-written",
    "metadata-written",
    "manifest-written",
    "files-synced",
    "version-renamed",
    "pointer-written",
    "pointer-replaced",
    "cleaned",
]
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from embedserve import index as ix
    from embedserve.package import ModelPackage

    step, path = sys.argv[1], sys.argv[2]
    package = ModelPackage(Path("."), {"name": "m", "sha256": "a" * 64, "embedding_dim": 8})
    index = ix.SearchIndex.load(path, package)
    index.add(np.eye(8, dtype=np.float32)[:5], [f"new/{i}" for i in range(5)])

    def checkpoint(name):
        if name == step:
            print(name, flush=True)
            time.sleep(120)  # the parent kills us here

    ix._save_checkpoint = checkpoint
    index.save(path)
    """
)


@pytest.mark.parametrize("step", SAVE_STEPS)
def test_a_save_killed_at_any_step_leaves_a_complete_index(tmp_path, step):
    path = tmp_path / "idx"
    filled_index(10).save(path)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, step, str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == step  # the save is paused at this step
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    index = SearchIndex.load(path, fake_package())
    committed = SAVE_STEPS.index(step) >= SAVE_STEPS.index("pointer-replaced")
    assert len(index) == (15 if committed else 10)
    assert index.metadata([0]) == [("img/0.png", "c0")]
    assert index.search(unit_rows(10, 0)[[4]], 1)[0][0]["id"] == 4
    # the next save succeeds and clears what the killed one left behind
    index.add(unit_rows(1, 7))
    index.save(path)
    assert sorted(p.name for p in path.iterdir() if p.name != ".lock")[0] == "CURRENT"
    assert len(list(path.iterdir())) == 3  # CURRENT, .lock, one version
    assert len(SearchIndex.load(path)) == len(index)


def test_the_save_checkpoints_cover_every_step(monkeypatch, tmp_path):
    seen: list[str] = []
    monkeypatch.setattr(ix, "_save_checkpoint", seen.append)
    filled_index(3).save(tmp_path / "idx")
    assert seen == SAVE_STEPS
