"""`embedserve index migrate`: a FAISS folder (with deletions, thumbnails, labels) copied into
Milvus Lite keeps every live item's id, vector, path, label and thumbnail, and the same
searches; the command checks the copy and refuses what it cannot do."""

from __future__ import annotations

import json

import pytest

from embedserve import cli
from embedserve.index import SearchIndex
from embedserve.index_backend import open_index
from embedserve.index_format import SearchIndexError
from embedserve.index_migrate import migrate
from tests.embedserve.test_index_backends import package, thumb, vectors

N = 80


@pytest.fixture
def folder(tmp_path):
    """A saved FAISS index of N items, ids 5, 17 and 40 deleted, with a log record pending."""
    index = SearchIndex.create(package(), "Flat")
    paths = [f"photos/{i % 3}/{i}.jpg" for i in range(N)]
    labels = [["cat", "dog", None][i % 3] for i in range(N)]
    index.add(vectors(N), paths, labels, thumbnails=[thumb(i) for i in range(N)])
    index.delete(ids=[5, 17])
    index.save(tmp_path / "faiss")
    index.open_log(tmp_path / "faiss")
    index.delete_durable(ids=[40])  # in the log only: migrate sees what a load sees
    index.close_log()
    return tmp_path / "faiss"


def test_every_live_item_goes_over_with_its_id_row_thumbnail_and_searches(folder, tmp_path):
    report = migrate(folder, str(tmp_path / "m.db"), "photos", progress=False)
    assert report.items == report.target_items == N - 3
    assert report.sampled == report.rows_equal == 50 and report.overlap == 1.0
    src = SearchIndex.load(folder)
    dst = open_index(tmp_path / "m.db", package(), collection="photos")
    assert len(dst) == N - 3 and dst.item(40) is None and dst.item(5) is None
    for i in (0, 1, 2, 79):
        assert dst.item(i) == src.item(i) and dst.thumbnail(i) == thumb(i)
    assert dst.labels() == src.labels()
    q = vectors(5, seed=3)
    assert [[h["id"] for h in r] for r in dst.search(q, 10, labels=["dog"])] == [
        [h["id"] for h in r] for r in src.search(q, 10, labels=["dog"])
    ]
    # new additions get fresh ids above every migrated one
    assert dst.add(vectors(1, seed=9))[0] > N
    dst.close()


def test_the_command_reports_and_refuses(folder, tmp_path, capsys):
    out = str(tmp_path / "m.db")
    assert cli.main(["index", "migrate", "--from", str(folder), "--to", out, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["items"] == report["target_items"] == N - 3 and report["collection"] == "embedserve"
    )
    # a second time: the collection exists
    assert cli.main(["index", "migrate", "--from", str(folder), "--to", out]) == 2
    assert "already has a collection" in capsys.readouterr().err
    assert cli.main(["index", "migrate", "--from", str(folder), "--to", str(tmp_path / "x")]) == 2
    assert "give a Milvus Lite file" in capsys.readouterr().err
    assert cli.main(["index", "migrate", "--from", str(tmp_path), "--to", out]) == 2
    assert "not a FAISS index folder" in capsys.readouterr().err
    args = ["index", "migrate", "--from", str(folder), "--to", out, "--factory", "HNSW8"]
    assert cli.main([*args, "--overwrite"]) == 0
    assert "migrated 77 items" in capsys.readouterr().out
    # a check that cannot pass fails the command, naming the reason
    assert cli.main([*args, "--overwrite", "--min-overlap", "1.01"]) == 2
    assert "sampled searches agree" in capsys.readouterr().err


def test_a_factory_with_no_milvus_equivalent_is_refused_before_anything_is_written(tmp_path):
    index = SearchIndex.create(package(), "PQ4x4")
    index.add(vectors(300))
    index.save(tmp_path / "pq")
    with pytest.raises(SearchIndexError, match="no Milvus equivalent"):
        migrate(tmp_path / "pq", str(tmp_path / "m.db"), "c", progress=False)
    report = migrate(tmp_path / "pq", str(tmp_path / "m.db"), "c", factory="Flat", progress=False)
    # the PQ codes go over as FAISS reconstructs them: the searches still agree (>= 0.9)
    assert report.items == report.target_items == 300 and report.overlap >= 0.9
