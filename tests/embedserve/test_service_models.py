"""Several models in one server (EMBEDSERVE_MODELS), against a real server in a subprocess.

The second package is the shipped default's files under another card `name` (card.json is
not among the hashed files: the card holds the sha256 of the ONNX files, which are symlinked),
so both models give the same embeddings, and routing is checked through the per-model batching
counters of /info and the per-model metrics.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from embedserve.client import APIError, Client
from embedserve.package import load_package
from tests.conftest import write_image_folder
from tests.embedserve.server import build_index, renamed_copy, running
from tests.embedserve.test_client_service import delta, own_metrics, scrape

pytestmark = pytest.mark.slow

KEY = "multi-model-test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
FIRST = load_package().name
SECOND = "second-copy"


def png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    second = renamed_copy(load_package().path, root / "second", SECOND)
    folder = write_image_folder(root / "gallery", num_classes=2, per_class=3, size=48, seed=5)
    index = build_index(folder, root / "index")  # built with the default (first) model
    env = {
        "EMBEDSERVE_MODELS": f"{FIRST},{second}",
        "EMBEDSERVE_INDEX": str(index),
        "EMBEDSERVE_API_KEY": KEY,
        "EMBEDSERVE_DEVICE": "cpu",
        "EMBEDSERVE_THREADS": "1",
        **own_metrics(root / "bentoml_home"),
    }
    with running(env, root / "server.log") as srv:
        yield srv


def embed(server, model: str | None, n: int = 2, seed: int = 0) -> httpx.Response:
    files = [("images", (f"{i}.png", png(seed + i), "image/png")) for i in range(n)]
    data = {} if model is None else {"model": model}
    return httpx.post(server.url + "/embed", files=files, data=data, headers=AUTH, timeout=60)


def info(server) -> dict:
    return httpx.get(server.url + "/info", headers=AUTH, timeout=10).json()


def images_of(server) -> dict[str, int]:
    return {name: m["batching"]["observed"]["images"] for name, m in info(server)["models"].items()}


def test_v1_models_lists_both_in_the_openai_shape(server):
    body = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=10).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [FIRST, SECOND]
    for m in body["data"]:
        assert m["object"] == "model" and m["owned_by"] == "embedserve"
        assert isinstance(m["created"], int)
    assert Client(server.url, api_key=KEY).models() == [FIRST, SECOND]
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401  # the key


def test_each_request_is_answered_by_the_model_it_names(server):
    before, metrics_before = images_of(server), scrape(server)
    first = embed(server, FIRST, n=2)
    second = embed(server, SECOND, n=3)
    assert first.status_code == second.status_code == 200, second.text
    assert first.json()["model"] == FIRST and second.json()["model"] == SECOND
    after, metrics_after = images_of(server), scrape(server)
    assert after[FIRST] - before[FIRST] == 2
    assert after[SECOND] - before[SECOND] == 3
    for name, n in ((FIRST, 2), (SECOND, 3)):
        counted = delta(
            metrics_after, metrics_before, "embedserve_images_embedded_total", model=name
        )
        assert counted == n
    # the same weights: the same embeddings for the same images
    a = np.asarray(embed(server, FIRST, n=2).json()["embeddings"])
    b = np.asarray(embed(server, SECOND, n=2).json()["embeddings"])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_json_bodies_and_the_openai_api_name_the_model_too(server):
    data = "data:image/png;base64," + base64.b64encode(png(1)).decode()
    before = images_of(server)
    r = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": SECOND, "input": [data]},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == SECOND
    r = httpx.post(
        server.url + "/embed", json={"model": SECOND, "images": [data]}, headers=AUTH, timeout=60
    )
    assert r.status_code == 200 and r.json()["model"] == SECOND
    after = images_of(server)
    assert after[SECOND] - before[SECOND] == 2 and after[FIRST] == before[FIRST]
    # the Python client's model= (per client and per call)
    with Client(server.url, api_key=KEY, model=SECOND) as client:
        client.embed(png(2))
        client.embed(png(3), model=FIRST)
    last = images_of(server)
    assert last[SECOND] - after[SECOND] == 1 and last[FIRST] - after[FIRST] == 1


def test_without_a_model_the_first_listed_answers(server):
    before = images_of(server)
    r = embed(server, None, n=1)
    assert r.status_code == 200 and r.json()["model"] == FIRST
    r = httpx.post(
        server.url + "/v1/embeddings",
        json={"input": "data:image/png;base64," + base64.b64encode(png(4)).decode()},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["model"] == FIRST
    after = images_of(server)
    assert after[FIRST] - before[FIRST] == 2 and after[SECOND] == before[SECOND]


def test_an_unknown_model_is_a_404_that_lists_the_served_ones(server):
    listed = f"this server serves {FIRST!r}, {SECOND!r}"
    r = embed(server, "nope", n=1)
    assert r.status_code == 404 and listed in r.json()["error"], r.text
    r = httpx.post(
        server.url + "/v1/embeddings", json={"model": "nope", "input": "aGk="}, headers=AUTH
    )
    assert r.status_code == 404 and listed in r.json()["error"]["message"]
    with pytest.raises(APIError) as e, Client(server.url, api_key=KEY, model="nope") as client:
        client.embed(png(5))
    assert e.value.status == 404


def test_info_keeps_the_first_models_keys_and_adds_every_model(server):
    body = info(server)
    assert body["model"]["name"] == FIRST and body["default_model"] == FIRST
    assert list(body["models"]) == [FIRST, SECOND]
    for name, entry in body["models"].items():
        assert entry["model"]["name"] == name
        assert set(entry) == {"model", "variant", "provider", "providers", "batching"}
    first = body["models"][FIRST]
    for key in ("variant", "provider", "providers"):
        assert body[key] == first[key]
    assert body["models"][SECOND]["model"]["path"].endswith("second")
    assert body["index"]["served_model"] == FIRST


def test_the_index_answers_only_the_model_it_was_built_with(server):
    files = [("images", ("q.png", png(6), "image/png"))]
    ok = httpx.post(server.url + "/search", files=files, data={"k": "2"}, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["model"] == FIRST
    size = info(server)["index"]["size"]
    for path, data in (
        ("/search", {"k": "2", "model": SECOND}),
        ("/index/add", {"model": SECOND}),
    ):
        r = httpx.post(server.url + path, files=files, data=data, headers=AUTH, timeout=60)
        assert r.status_code == 409, r.text
        assert f"holds embeddings of model {FIRST!r}" in r.json()["error"]
    assert info(server)["index"]["size"] == size  # nothing was added
    added = Client(server.url, api_key=KEY).add(png(7), model=FIRST)
    assert added.index_size == size + 1
