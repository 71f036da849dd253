"""The index's HTTP endpoints over both backends (a FAISS folder and a Milvus Lite file) answer
the same: search by image and by id with filters, add with thumbnails and replace, delete by id
and by path, an item, its thumbnail, the labels, /info's backend; and a Milvus that cannot be
reached is a 503 that says so, not a 500."""

from __future__ import annotations

import numpy as np
import pytest

from embedserve.index_format import IndexUnavailableError
from tests.embedserve.http_app import index_app, item_vectors, png
from tests.embedserve.test_http_index import KeyClient

N = 30


@pytest.fixture(params=["faiss", "milvus"])
def served(request, tmp_path):
    """(client, index, ids of items 0..N-1)."""
    where = tmp_path / ("index" if request.param == "faiss" else "index.db")
    app, index = index_app(where, items=N)
    ids = [row[0]["id"] for row in index.search(item_vectors(N), 1)]
    yield KeyClient(app), index, ids
    if hasattr(index, "close"):
        index.close()


def neighbours(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [n["id"] for n in response.json()["results"][0]["neighbours"]]


def test_search_by_id_with_filters_is_the_exact_answer(served):
    client, _, ids = served
    x = item_vectors(N)
    order = [int(i) for i in np.argsort(-(x @ x[5]), kind="stable") if i != 5]
    got = neighbours(client.post("/search", data={"id": str(ids[5]), "k": "4", "label": "even"}))
    assert got == [ids[i] for i in order if i % 2 == 0][:4]
    got = neighbours(client.post("/search", json={"id": ids[5], "k": 3, "path_prefix": "img/1"}))
    assert got == [ids[i] for i in order if str(i).startswith("1")][:3]
    assert client.post("/search", data={"id": str(10**14)}).status_code == 404


def test_add_replace_delete_item_thumbnail_and_labels(served):
    client, index, ids = served
    files = [("images", (f"{i}.png", png(seed=100 + i))) for i in range(2)]
    meta = '[{"path": "img/1.png", "label": "new"}, {"path": "new/2.png", "label": "new"}]'
    r = client.post("/index/add", files=files, data={"metadata": meta, "replace": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["replaced"] == [ids[1]] and body["index_size"] == N + 1
    new = body["ids"]
    assert client.get(f"/index/items/{ids[1]}").status_code == 404
    assert client.get(f"/index/items/{new[0]}").json() == {
        "id": new[0],
        "path": "img/1.png",
        "label": "new",
    }
    thumb = client.get(f"/index/items/{new[1]}/thumbnail")
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"  # a JPEG
    query = client.post("/search", files=[("images", ("q.png", png(seed=100)))], data={"k": "1"})
    assert neighbours(query) == [new[0]]
    r = client.post("/index/delete", json={"ids": [ids[2], 10**14], "paths": ["new/2.png"]})
    assert r.status_code == 200, r.text
    assert sorted(r.json()["deleted"]) == sorted([ids[2], new[1]])
    assert r.json()["missing_ids"] == [10**14] and r.json()["index_size"] == N - 1
    assert client.request("DELETE", f"/index/items/{ids[3]}").status_code == 200
    assert client.request("DELETE", f"/index/items/{ids[3]}").status_code == 404
    labels = client.get("/index/labels").json()["labels"]
    assert labels == {"even": N // 2 - 1, "new": 1, "odd": N // 2 - 2}
    assert len(index) == N - 2


def test_info_names_the_backend(served, tmp_path):
    client, index, _ = served
    info = client.app.state.index_endpoints.describe()
    assert info["backend"] == (
        "faiss" if index.__class__.__name__ == "SearchIndex" else "milvus-lite"
    )
    assert info["size"] == N and info["writes"].startswith("on")


def test_an_unreachable_milvus_is_a_503_that_says_so(tmp_path, monkeypatch):
    app, index = index_app(tmp_path / "index.db", items=4)
    client = KeyClient(app)

    def down(*args, **kwargs):
        raise IndexUnavailableError("Milvus at http://milvus:19530: server unavailable")

    monkeypatch.setattr(index, "search", down)
    monkeypatch.setattr(index, "add_durable", down)
    r = client.post("/search", files=[("images", ("q.png", png()))])
    assert r.status_code == 503 and "could not be reached" in r.json()["error"]
    r = client.post("/index/add", files=[("images", ("q.png", png()))])
    assert r.status_code == 503 and "server unavailable" in r.json()["error"]
    index.close()
