"""The index's endpoints in process (embedserve.http.index_routes over a real Flat SearchIndex and a
fake model): search filters and search by id by multipart, URL-encoded and JSON bodies; add with
replace; delete by id and path; an item, its thumbnail, the labels; and a 4xx naming every
client fault."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from embedserve.index import SearchIndex
from tests.embedserve.http_app import KEY, Client, index_app, png

AUTH = {"Authorization": f"Bearer {KEY}"}
N = 40  # items in the index: ids 0..39, path img/<id>.png, label even/odd


class KeyClient(Client):
    """Sends the key unless a request gives its own headers."""

    def request(self, method: str, url: str, **kwargs):
        kwargs.setdefault("headers", AUTH)
        return super().request(method, url, **kwargs)


@pytest.fixture
def served(tmp_path):
    """(a client that sends the key, the index, its folder): N items, a key set."""
    app, index = index_app(tmp_path / "index", items=N)
    return KeyClient(app), index, tmp_path / "index"


def error(response) -> str:
    return response.json()["error"]


def b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def exact(index: SearchIndex, query: np.ndarray, k: int, keep) -> list[int]:
    """The exact top-k ids among the live items for which keep(id) is true."""
    ids = [i for i in range(index.next_id) if index.item(i) is not None and keep(i)]
    vectors = np.stack([index.index.reconstruct(i) for i in ids])
    order = np.argsort(-(vectors @ query), kind="stable")[:k]
    return [ids[j] for j in order]


def neighbours(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [n["id"] for n in response.json()["results"][0]["neighbours"]]


# -- search: filters ------------------------------------------------------------------------------


def test_label_filters_give_the_exact_top_k_among_the_matching_items(served):
    client, index, _ = served
    query = index.index.reconstruct(5)
    for labels, keep in [
        (["odd"], lambda i: i % 2 == 1),
        (["even", "odd"], lambda i: True),
    ]:
        data = {"k": "6", "id": "5", "label": labels}
        got = neighbours(client.post("/search", data=data))
        want = exact(index, query, 7, lambda i, keep=keep: keep(i) and i != 5)[:6]
        assert got == want
    # an unknown label is an empty answer, not an error
    assert neighbours(client.post("/search", data={"id": "5", "label": "cats"})) == []


def test_filters_are_the_same_by_multipart_url_encoded_and_json(served):
    client, index, _ = served
    fields = {"k": "5", "label": "even", "path_prefix": "img/1", "min_score": "-0.5"}
    multipart = client.post("/search", files=[("images", ("q.png", png(seed=3)))], data=fields)
    as_json = client.post(
        "/search",
        json={"images": [b64(png(seed=3))], "k": 5, "label": ["even"], "path_prefix": "img/1",
              "min_score": -0.5},
    )  # fmt: skip
    assert multipart.status_code == 200, multipart.text
    hits = multipart.json()["results"][0]["neighbours"]
    assert hits and all(h["label"] == "even" and h["path"].startswith("img/1") for h in hits)
    assert all(h["score"] >= -0.5 for h in hits)
    assert as_json.json()["results"][0]["neighbours"] == hits
    assert multipart.json()["results"][0]["file"] == "images[0] (q.png)"
    # by id, the same filters in the three bodies
    by_form = client.post("/search", data={**fields, "id": "12"})
    by_multipart = client.post("/search", files={"id": (None, "12"), "k": (None, "5"),
                               "label": (None, "even"), "path_prefix": (None, "img/1"),
                               "min_score": (None, "-0.5")})  # fmt: skip
    by_json = client.post(
        "/search", json={"id": 12, "k": 5, "label": "even", "path_prefix": "img/1",
                         "min_score": -0.5},
    )  # fmt: skip
    answers = [r.json() for r in (by_form, by_multipart, by_json)]
    assert answers[0] == answers[1] == answers[2]
    hits = answers[0]["results"][0]["neighbours"]
    assert hits and all(h["label"] == "even" and h["path"].startswith("img/1") for h in hits)


def test_min_score_keeps_only_hits_scoring_at_least_it(served):
    client, _, _ = served
    every = client.post("/search", data={"id": "0", "k": str(N)}).json()["results"][0]
    scores = [h["score"] for h in every["neighbours"]]
    assert len(scores) == N - 1  # every live item but the query itself
    threshold = sorted(scores)[len(scores) // 2]
    kept = client.post("/search", data={"id": "0", "k": str(N), "min_score": str(threshold)})
    got = [h["score"] for h in kept.json()["results"][0]["neighbours"]]
    assert got == [s for s in scores if s >= threshold]


# -- search by id --------------------------------------------------------------------------------


def test_search_by_id_answers_in_the_shape_of_an_image_search(served):
    client, index, _ = served
    response = client.post("/search", data={"id": "7", "k": "4"})
    body = response.json()
    assert body["k"] == 4 and body["model"] == "tiny-model"
    assert body["results"][0]["file"] is None and body["results"][0]["id"] == 7
    assert neighbours(response) == exact(index, index.index.reconstruct(7), 5, lambda i: i != 7)[:4]
    image_search = client.post("/search", files=[("images", ("q.png", png()))]).json()
    assert (
        set(image_search["results"][0]) == set(body["results"][0]) == {"file", "id", "neighbours"}
    )
    assert image_search["results"][0]["id"] is None


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"data": {"id": "abc"}}, 400, "id must be a non-negative integer id, not 'abc'"),
        ({"data": {"id": "-1"}}, 400, "id must be a non-negative integer id"),
        ({"data": {"id": "1.5"}}, 400, "id must be a non-negative integer id"),
        ({"json": {"id": True}}, 400, "id must be an integer id, not a boolean"),
        ({"json": {"id": [1]}}, 400, "id must be an integer id, not an array"),
        ({"data": {"id": str(2**64)}}, 400, "id must be an id between 0 and"),
        ({"data": {"id": "999"}}, 404, "no item with id 999 in the index"),
        ({"data": {"k": "3"}}, 400, "missing field 'images'"),
        ({"json": {"k": 3}}, 400, "missing field 'images'"),
        ({"data": {"id": "1", "min_score": "2"}}, 400, "min_score must be between -1 and 1"),
        ({"data": {"id": "1", "min_score": "nan"}}, 400, "min_score must be between -1 and 1"),
        ({"data": {"id": "1", "min_score": "high"}}, 400, "min_score must be a number"),
        ({"json": {"id": 1, "min_score": True}}, 400, "min_score must be a number"),
        ({"json": {"id": 1, "label": []}}, 400, "label is an empty list"),
        ({"json": {"id": 1, "label": [3]}}, 400, "label must be a string, not a number"),
        ({"json": {"id": 1, "label": ["a", None]}}, 400, "label[1] must be a string, not null"),
        ({"json": {"id": 1, "path_prefix": 3}}, 400, "path_prefix must be a string, not a"),
        ({"data": {"id": "1", "label": "x" * 300}}, 400, "label is 300 characters"),
        ({"data": {"id": "1", "path_prefix": "a\nb"}}, 400, "path_prefix contains control"),
        ({"data": {"id": "1", "k": "0"}}, 400, "k must be between 1 and"),
        ({"data": {"id": "1", "lable": "x"}}, 400, "unknown field(s) 'lable'"),
        ({"data": {"id": ["1", "2"]}}, 400, "field 'id' must be given once"),
        ({"data": {"id": "1", "model": "other"}}, 404, "model 'other' is not served here"),
        ({"data": {"images": "http://example.com/a.jpg"}}, 400, "cannot be sent in a URL-encoded"),
    ],
)
def test_a_bad_search_gets_a_4xx_naming_the_problem(served, body, status, words):
    client, _, _ = served
    response = client.post("/search", **body)
    assert response.status_code == status, response.text
    assert words in error(response)


def test_images_and_an_id_together_are_refused(served):
    client, _, _ = served
    response = client.post("/search", files=[("images", ("q.png", png()))], data={"id": "3"})
    assert response.status_code == 400
    assert error(response).startswith("send either images (search by image) or id")
    response = client.post("/search", json={"images": [b64(png())], "id": 3})
    assert response.status_code == 400 and "not both" in error(response)


def test_a_body_of_another_type_gets_415_naming_the_url_encoded_form(served):
    client, _, _ = served
    response = client.post(
        "/search", content=b"id=3", headers={**AUTH, "content-type": "text/plain"}
    )
    assert response.status_code == 415
    assert "application/x-www-form-urlencoded" in error(response)
    assert "multipart/form-data" in error(response)


def test_a_deleted_item_is_never_found_by_id_or_in_results(served):
    client, _, _ = served
    assert client.request("DELETE", "/index/items/3", headers=AUTH).status_code == 200
    response = client.post("/search", data={"id": "3"})
    assert response.status_code == 404 and "(never added, or deleted)" in error(response)
    assert 3 not in neighbours(client.post("/search", data={"id": "2", "k": str(N)}))


# -- add with replace and thumbnails ------------------------------------------------------------


def add(client, *images: bytes, metadata=None, **data):
    files = [("images", (f"{i}.png", b)) for i, b in enumerate(images)]
    if metadata is not None:
        import json

        data["metadata"] = json.dumps(metadata)
    return client.post("/index/add", files=files, data=data, headers=AUTH)


def test_replace_true_swaps_the_items_of_the_same_path_in_one_step(served):
    client, index, folder = served
    response = add(client, png(seed=9), metadata=[{"path": "img/3.png", "label": "new"}],
                   replace="true")  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["replaced"] == [3] and body["ids"] == [N] and body["index_size"] == N
    assert client.get("/index/items/3").status_code == 404
    assert client.get(f"/index/items/{N}").json() == {"id": N, "path": "img/3.png", "label": "new"}
    hits = client.post("/search", data={"id": str(N), "k": str(N)}).json()["results"][0]
    assert 3 not in [h["id"] for h in hits["neighbours"]]
    # without replace, a second item of the same path is kept beside it (JSON: a boolean)
    again = client.post(
        "/index/add",
        json={"images": [b64(png(seed=10))], "metadata": [{"path": "img/3.png"}], "replace": False},
        headers=AUTH,
    )
    assert again.json()["replaced"] == [] and again.json()["index_size"] == N + 1
    # durable: a reload replays the log
    reloaded = SearchIndex.load(folder)
    assert (
        reloaded.item(3) is None and reloaded.item(N)["label"] == "new" and len(reloaded) == N + 1
    )


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_a_bad_replace_gets_400(served, value):
    client, _, _ = served
    response = add(client, png(), replace=value)
    assert response.status_code == 400
    assert error(response) == f"replace must be true or false, not {value!r}"


def test_added_images_get_a_thumbnail_made_when_they_are_decoded(tmp_path):
    app, _ = index_app(tmp_path / "index", thumbnails=64)
    client = KeyClient(app)
    image = io.BytesIO()
    Image.fromarray(np.full((120, 80, 3), 90, np.uint8)).save(image, "PNG")
    new_id = add(client, image.getvalue()).json()["ids"][0]
    response = client.get(f"/index/items/{new_id}/thumbnail")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.format == "JPEG" and max(thumb.size) == 64 and thumb.size[1] == 64
    assert abs(thumb.size[0] / thumb.size[1] - 80 / 120) < 0.03  # the aspect ratio kept
    assert abs(int(np.asarray(thumb).mean()) - 90) <= 2
    assert "no-cache" in response.headers["cache-control"]


def test_thumbnails_off_stores_none_and_the_thumbnail_is_a_404(tmp_path):
    app, _ = index_app(tmp_path / "index", items=2, thumbnails=0)
    client = KeyClient(app)
    new_id = add(client, png()).json()["ids"][0]
    assert app.state.index_endpoints.models.model.thumbnail_calls == 0
    response = client.get(f"/index/items/{new_id}/thumbnail")
    assert response.status_code == 404 and "has no thumbnail" in error(response)
    assert client.get("/index/items/0/thumbnail").status_code == 200  # stored before


# -- delete --------------------------------------------------------------------------------------


def test_delete_one_item_by_id(served):
    client, index, folder = served
    response = client.request("DELETE", "/index/items/4", headers=AUTH)
    assert response.json() == {"deleted": [4], "index_size": N - 1}
    again = client.request("DELETE", "/index/items/4", headers=AUTH)
    assert again.status_code == 404 and "no item with id 4" in error(again)
    bad = client.request("DELETE", "/index/items/four", headers=AUTH)
    assert bad.status_code == 400 and "id must be a non-negative integer" in error(bad)
    assert SearchIndex.load(folder).item(4) is None  # durable


@pytest.mark.parametrize(
    "send",
    [
        lambda c: c.post(
            "/index/delete",
            data={"id": ["1", "2", "77"], "path": ["img/5.png", "nope.png"]},
            headers=AUTH,
        ),  # fmt: skip
        lambda c: c.post(
            "/index/delete",
            files=[
                ("id", (None, "1")),
                ("id", (None, "2")),
                ("id", (None, "77")),
                ("path", (None, "img/5.png")),
                ("path", (None, "nope.png")),
            ],
            headers=AUTH,
        ),  # fmt: skip
        lambda c: c.post(
            "/index/delete",
            json={"ids": [1, 2, 77], "paths": ["img/5.png", "nope.png"]},
            headers=AUTH,
        ),  # fmt: skip
    ],
    ids=["url-encoded", "multipart", "json"],
)
def test_batch_delete_by_ids_and_paths_in_every_body(served, send):
    client, _, folder = served
    response = send(client)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "deleted": [1, 2, 5],
        "missing_ids": [77],
        "missing_paths": ["nope.png"],
        "index_size": N - 3,
    }
    labels = client.get("/index/labels").json()["labels"]
    assert labels == {"even": N // 2 - 1, "odd": N // 2 - 2}
    reloaded = SearchIndex.load(folder)
    assert [reloaded.item(i) for i in (1, 2, 5)] == [None] * 3 and len(reloaded) == N - 3


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"json": {}}, "nothing to delete"),
        ({"json": {"ids": []}}, "nothing to delete"),
        ({"json": {"ids": ["x"]}}, "ids[0] must be a non-negative integer id"),
        ({"json": {"paths": [None]}}, "paths[0] must be a string"),
        ({"json": {"ids": [1], "label": "x"}}, "unknown field(s) 'label'"),
        ({"data": {"id": "-3"}}, "id[0] must be a non-negative integer id"),
        ({"files": [("id", ("id.txt", b"3"))]}, "field 'id' must be given as values, not files"),
        ({"data": {"id": ["1"] * 1001}}, "id is given 1001 times, over the limit of 1000"),
        ({"data": {"id": ["1"] * 5000}}, "malformed URL-encoded form"),
        ({"json": {"ids": list(range(1001))}}, "ids is given 1001 times, over the limit of 1000"),
    ],
)
def test_a_bad_delete_gets_400_naming_the_problem(served, body, words):
    client, _, _ = served
    response = client.post("/index/delete", headers=AUTH, **body)
    assert response.status_code == 400, response.text
    assert words in error(response)


@pytest.mark.parametrize(
    ("method", "route"),
    [("DELETE", "/index/items/1"), ("POST", "/index/delete"), ("POST", "/index/add")],
)
def test_changes_need_the_key_401_and_are_off_without_one_403(tmp_path, method, route):
    app, index = index_app(tmp_path / "with-key", items=3)
    client = Client(app)
    for headers in ({}, {"Authorization": "Bearer not-the-key-but-long-enough"}):
        response = client.request(method, route, headers=headers, data={"id": "1"})
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert len(index) == 3
    open_app, open_index = index_app(tmp_path / "open", items=3, api_key=None)
    response = Client(open_app).request(method, route, data={"id": "1"})
    assert response.status_code == 403 and "needs an API key" in error(response)
    assert len(open_index) == 3


# -- reading: items, thumbnails, labels ----------------------------------------------------------


def test_an_item_its_thumbnail_and_the_labels(served):
    client, _, _ = served
    assert client.get("/index/items/6").json() == {"id": 6, "path": "img/6.png", "label": "even"}
    response = client.get("/index/items/6/thumbnail")
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (40, 40)  # small: kept as it is
    assert client.get("/index/labels").json() == {"labels": {"even": N // 2, "odd": N // 2}}
    for route in ("/index/items/999", "/index/items/999/thumbnail"):
        response = client.get(route)
        assert response.status_code == 404 and "no item with id 999" in error(response)
    response = client.get("/index/items/x/thumbnail")
    assert response.status_code == 400 and "id must be a non-negative integer" in error(response)
    client.request("DELETE", "/index/items/6", headers=AUTH)
    assert client.get("/index/items/6").status_code == 404
    assert client.get("/index/items/6/thumbnail").status_code == 404


def test_reading_follows_the_search_access_rule(tmp_path):
    app, _ = index_app(tmp_path / "index", items=3)  # a key is set: reading needs it too
    client = Client(app)
    for route in ("/index/items/1", "/index/items/1/thumbnail", "/index/labels"):
        assert client.get(route).status_code == 401
        assert client.get(route, headers=AUTH).status_code == 200
    assert client.post("/search", data={"id": "1"}).status_code == 401
    assert client.post("/search", data={"id": "1"}, headers=AUTH).status_code == 200
    open_app, _ = index_app(tmp_path / "open", items=3, api_key=None)
    open_client = Client(open_app)
    for route in ("/index/items/1", "/index/items/1/thumbnail", "/index/labels"):
        assert open_client.get(route).status_code == 200


def test_without_an_index_reading_is_409(tmp_path):
    app, _ = index_app(tmp_path / "index", items=1, api_key=None)
    app.state.index_endpoints.index = (
        None  # as IndexEndpoints.open makes it without EMBEDSERVE_INDEX
    )
    client = Client(app)
    for response in (client.get("/index/labels"), client.post("/search", data={"id": "0"})):
        assert response.status_code == 409 and "EMBEDSERVE_INDEX" in error(response)


def test_the_openapi_page_documents_every_index_route_with_an_example(tmp_path):
    app, _ = index_app(tmp_path / "index")
    spec = app.openapi()
    routes = {
        "/search": "post",
        "/index/add": "post",
        "/index/delete": "post",
        "/index/items/{item_id}": "delete",
        "/index/items/{item_id}/thumbnail": "get",
        "/index/labels": "get",
    }
    for route, method in routes.items():
        assert "curl" in spec["paths"][route][method]["description"], route
    search = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "application/x-www-form-urlencoded"} <= set(
        search
    )
    assert "label" in search["application/json"]["schema"]["properties"]
    add = spec["paths"]["/index/add"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "replace" in add["schema"]["properties"]
