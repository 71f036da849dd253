"""embedserve.client's index methods against the index's real routes in process (a Flat
SearchIndex and a fake model, tests.embedserve.http_app.index_app): search filters, search by
id, add with replace, delete by id and path, an item, its thumbnail, the labels; errors as
APIError with the server's status and message."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest
from PIL import Image

from embedserve.client import Added, APIError, AsyncClient, Client, Deleted, Item, Neighbour
from tests.embedserve.http_app import KEY, SyncASGITransport, index_app, png

N = 20  # ids 0..19, path img/<id>.png, label even/odd


def connect(app, api_key: str | None = KEY) -> Client:
    """A Client whose requests go to `app` in this process."""
    return Client("http://test", api_key=api_key, transport=SyncASGITransport(app))


@pytest.fixture
def served(tmp_path):
    app, index = index_app(tmp_path / "index", items=N)
    with connect(app) as client:
        yield client, index


def test_search_filters_and_search_by_id(served):
    client, _ = served
    hits = client.search(png(seed=1), k=5, labels="odd", path_prefix="img/1", min_score=-1.0)[0]
    assert hits and all(isinstance(h, Neighbour) for h in hits)
    assert all(h.label == "odd" and h.path.startswith("img/1") for h in hits)
    both = client.search([png(seed=1), png(seed=2)], k=3, labels=["even", "odd"])
    assert [len(h) for h in both] == [3, 3]
    more = client.search_by_id(4, k=N)
    assert len(more) == N - 1 and 4 not in [h.id for h in more]
    assert [h.score for h in more] == sorted((h.score for h in more), reverse=True)
    even = client.search_by_id(4, k=3, labels=["even"], min_score=-1)
    assert len(even) == 3 and {h.label for h in even} == {"even"}
    with pytest.raises(APIError) as e:
        client.search_by_id(999)
    assert e.value.status == 404 and "no item with id 999" in e.value.message
    with pytest.raises(APIError) as e:
        client.search(png(), min_score=3)
    assert e.value.status == 400 and "min_score must be between -1 and 1" in e.value.message
    with pytest.raises(ValueError, match="labels is empty"):
        client.search(png(), labels=[])
    with pytest.raises(ValueError, match="non-negative"):
        client.search_by_id(-1)


def test_add_with_replace_then_delete_by_id_and_path(served):
    client, index = served
    added = client.add([png(seed=5)], paths=["img/2.png"], labels=["new"], replace=True)
    assert added == Added(ids=[N], index_size=N, replaced=[2])
    assert client.item(N) == Item(N, "img/2.png", "new")
    plain = client.add([png(seed=6)], paths=["img/3.png"])
    assert plain.replaced == [] and plain.index_size == N + 1
    deleted = client.delete(ids=[0, 99], paths=["img/3.png", "nope.png"])
    assert deleted == Deleted(
        deleted=[0, 3, N + 1], missing_ids=[99], missing_paths=["nope.png"], index_size=N - 2
    )
    assert client.delete(ids=5).deleted == [5]  # one id
    assert client.delete(paths="img/7.png").deleted == [7]  # one path
    assert len(index) == N - 4
    with pytest.raises(APIError) as e:
        client.item(0)
    assert e.value.status == 404
    with pytest.raises(ValueError, match="nothing to delete"):
        client.delete()


def test_thumbnails_items_and_labels(served):
    client, _ = served
    jpeg = client.thumbnail(3)
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    assert client.labels() == {"even": N // 2, "odd": N // 2}
    client.delete(ids=[3])
    with pytest.raises(APIError) as e:
        client.thumbnail(3)
    assert e.value.status == 404 and "no item with id 3" in e.value.message
    assert client.labels() == {"even": N // 2, "odd": N // 2 - 1}


def test_changes_need_the_key(tmp_path):
    app, index = index_app(tmp_path / "index", items=3)
    with connect(app, api_key=None) as anonymous:
        for change in (lambda: anonymous.delete(ids=[1]), lambda: anonymous.add(png())):
            with pytest.raises(APIError) as e:
                change()
            assert e.value.status == 401
    with connect(app, api_key="not-the-key-but-long-enough") as wrong:
        with pytest.raises(APIError) as e:
            wrong.delete(ids=[1])
        assert e.value.status == 401 and "wrong API key" in e.value.message
    open_app, open_index = index_app(tmp_path / "open", items=3, api_key=None)
    with connect(open_app, api_key=None) as client:
        with pytest.raises(APIError) as e:
            client.delete(ids=[1])
        assert e.value.status == 403 and "needs an API key" in e.value.message
        assert client.search_by_id(1, k=1)[0].id in (0, 2)  # reading is open
    assert len(index) == len(open_index) == 3


def test_the_async_client_has_the_same_methods(tmp_path):
    app, _ = index_app(tmp_path / "index", items=N)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with AsyncClient("http://test", api_key=KEY, transport=transport) as client:
            hits = await client.search(png(), k=2, labels=["odd"])
            more = await client.search_by_id(2, k=3, path_prefix="img/1")
            added = await client.add([png(seed=8)], paths=["img/1.png"], replace=True)
            deleted = await client.delete(ids=[added.ids[0]], paths=["img/4.png"])
            thumb = await client.thumbnail(6)
            item = await client.item(6)
            labels = await client.labels()
            return hits, more, added, deleted, thumb, item, labels

    hits, more, added, deleted, thumb, item, labels = asyncio.run(run())
    assert {h.label for h in hits[0]} == {"odd"}
    assert more and all(h.path.startswith("img/1") for h in more)
    assert added.replaced == [1]
    assert deleted.deleted == [added.ids[0], 4] and deleted.index_size == N - 2
    assert thumb.startswith(b"\xff\xd8") and item == Item(6, "img/6.png", "even")
    assert labels == {"even": N // 2 - 1, "odd": N // 2 - 1}


def test_the_forms_the_client_sends():
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/index/delete":
            return httpx.Response(
                200, json={"deleted": [1], "missing_ids": [], "missing_paths": [], "index_size": 1}
            )
        return httpx.Response(200, json={"model": "m", "k": 1, "results": [
            {"file": None, "id": 1, "neighbours": []}]})  # fmt: skip

    with Client("http://test", transport=httpx.MockTransport(server)) as client:
        client.search(png(), k=3, labels=["a", "b"], path_prefix="p/", min_score=0.25)
        client.search_by_id(7, k=2, labels="a")
        client.delete(ids=[1], paths=["x.jpg"])
    form = seen[0].content
    assert form.count(b'name="label"') == 2 and b'name="path_prefix"\r\n\r\np/' in form
    assert b'name="min_score"\r\n\r\n0.25' in form
    assert seen[1].headers["content-type"] == "application/x-www-form-urlencoded"
    assert seen[1].content == b"id=7&k=2&label=a"
    assert seen[2].headers["content-type"] == "application/json"
    assert seen[2].content.replace(b" ", b"") == b'{"ids":[1],"paths":["x.jpg"]}'
