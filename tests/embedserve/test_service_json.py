"""The JSON endpoints against a real server (the way `make serve` starts it): POST /v1/embeddings
through the official `openai` client, JSON bodies for /embed and /search, and bad JSON inputs
end to end. The embeddings must be those multipart /embed gives for the same images.

The server is this module's own (its fixtures are test_service's, with the same small limits).
"""

# ruff: noqa: F811 (the fixtures imported from test_service are arguments of the tests)

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from embedserve.package import gpu_present, load_package
from tests.embedserve.test_service import (  # noqa: F401 (fixtures among them)
    MAX_BYTES,
    MAX_IMAGES,
    assert_still_healthy,
    embed,
    index_dir,
    photos,
    post_images,
    server,
)

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")

pytestmark = pytest.mark.slow


def uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def bare(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def client(server):
    # any key: the server is open (with EMBEDSERVE_API_KEY set, the key goes here)
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_the_openai_client_gets_the_embeddings_of_multipart_embed(server, client, photos):
    expected = embed(server, photos)
    name = load_package().name
    inputs = [uri(p) if i % 2 else bare(p) for i, p in enumerate(photos)]
    answer = client.embeddings.create(model=name, input=inputs)  # asks for base64 by default
    assert answer.model == name and answer.object == "list"
    assert [d.index for d in answer.data] == list(range(len(photos)))
    assert answer.usage.prompt_tokens == 0 and answer.usage.total_tokens == 0
    got = np.asarray([d.embedding for d in answer.data], np.float32)
    assert got.shape == expected.shape
    assert cosines(got, expected).min() > 0.9999
    floats = client.embeddings.create(model=name, input=inputs[:2], encoding_format="float")
    got = np.asarray([d.embedding for d in floats.data], np.float32)
    assert cosines(got, expected[:2]).min() > 0.9999
    one = client.embeddings.create(model=name, input=uri(photos[0]))
    assert cosines(np.asarray([one.data[0].embedding]), expected[:1])[0] > 0.9999


def test_the_openai_client_is_told_which_model_is_served_and_what_is_wrong(client, photos):
    name = load_package().name
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input=[uri(photos[0])])
    # the OpenAI error shape: the client reads the message, type, param and code from it
    assert e.value.body["message"].endswith(f"this server serves '{name}'")
    assert e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=name, input=[uri(photos[0]), "https://example.com/a.jpg"])
    assert e.value.body["message"].startswith("input[1]: a URL (https:), and URLs are never")
    assert e.value.body["files"][0]["file"] == "input[1]"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=name, input="a photo of a cat")  # text, not an image
    assert e.value.body["message"].startswith("input[0]: not valid base64")


def test_json_embed_equals_multipart_embed(server, photos):
    expected = embed(server, photos)
    response = httpx.post(
        server.url + "/embed", json={"images": [uri(p) for p in photos]}, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == load_package().name and body["dim"] == expected.shape[1]
    got = np.asarray(body["embeddings"], np.float32)
    assert cosines(got, expected).min() > 0.9999


def test_json_search_equals_multipart_search(server, photos):
    multipart = post_images(
        server.url + "/search", [("q.jpg", photos[0]), ("r.jpg", photos[1])], k="5"
    )
    response = httpx.post(
        server.url + "/search",
        json={"images": [uri(photos[0]), bare(photos[1])], "k": 5},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body, want = response.json(), multipart.json()
    assert body["k"] == 5 and [r["file"] for r in body["results"]] == ["images[0]", "images[1]"]
    for got, expected in zip(body["results"], want["results"], strict=True):
        assert [h["id"] for h in got["neighbours"]] == [h["id"] for h in expected["neighbours"]]
        np.testing.assert_allclose(
            [h["score"] for h in got["neighbours"]],
            [h["score"] for h in expected["neighbours"]],
            atol=1e-5,
        )


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/embed", {"images": ["http://169.254.169.254/latest/"]}, 400, "never fetched"),
        ("/embed", {"images": ["bm90IGFuIGltYWdl"]}, 400, "images[0]: not an image"),
        ("/embed", {"images": ["data:application/pdf;base64,JVBERi0="]}, 415, "not an image"),
        ("/embed", {"images": ["aGk="] * (MAX_IMAGES + 1)}, 413, "max_images_per_request"),
        ("/embed", {"images": ["A" * MAX_BYTES]}, 413, "max_request_bytes"),
        ("/embed", {"imgs": ["aGk="]}, 400, "unknown field(s) 'imgs'"),
        ("/search", {"images": ["aGk="], "k": 0}, 400, "k must be between 1"),
        ("/v1/embeddings", {"input": ["aGk=", "!"]}, 400, "input[1]: not valid base64"),
        ("/v1/embeddings", {"model": "other", "input": ["aGk="]}, 404, "this server serves"),
    ],
    ids=[
        "url",
        "not-an-image",
        "pdf-uri",
        "too-many",
        "too-large",
        "unknown-field",
        "bad-k",
        "bad-base64",
        "other-model",
    ],
)
def test_bad_json_inputs_get_a_4xx_that_names_the_problem(
    server, photos, path, body, status, words
):
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in (error["message"] if path.startswith("/v1/") else error)
    assert_still_healthy(server, photos)


def test_a_body_that_is_not_json_gets_400(server, photos):
    response = httpx.post(
        server.url + "/embed", content=b"{images", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("the body is not valid JSON")


@pytest.mark.skipif(gpu_present(), reason="a GPU is present: auto may use CUDA here")
def test_without_a_gpu_the_server_starts_without_trying_cuda(server):
    assert "CUDAExecutionProvider" not in server.log()
