"""JSON request bodies (embedserve.http.jsonbody), in-process on the tiny app built by
create_app: the fields of the multipart forms with the images base64-encoded, the OpenAI
/v1/embeddings request and answer, and every bad JSON input with the status, message and
per-input name (`images[2]`, `input[2]`) a multipart form gets for the same problem."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from embedserve.http.jsonbody import embeddings_response, image_bytes
from tests.embedserve.http_app import DIM, MODEL, Client, new_events, png, tiny_app

MAX_IMAGES = 3
MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def client() -> Client:
    app = tiny_app(max_images_per_request=MAX_IMAGES, max_request_bytes=MAX_BYTES, max_k=50)
    return Client(app)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{b64(data)}"


def pdf() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PDF")
    return buf.getvalue()


def error(response) -> str:
    return response.json()["error"]


# -- the forms' fields as JSON --------------------------------------------------------------------


def test_a_json_body_gives_the_images_in_order_and_the_other_fields_as_sent(client):
    a, b = png(20, 1), png(30, 2)
    response = client.post("/form", json={"images": [uri(a), b64(b)], "k": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["files"] == [[None, len(a)], [None, len(b)]]
    assert body["values"] == {"k": 7}
    assert 0 < body["held"] == body["used"]  # the body's bytes were taken from the budget


def test_one_image_as_a_string_and_json_types_with_a_charset(client):
    response = client.post(
        "/decode",
        content=f'{{"images": "{uri(png(40))}"}}'.encode(),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"shape": [1, 16, 16, 3]}


def test_line_breaks_in_base64_and_any_image_type_in_a_data_uri_are_accepted(client):
    wrapped = "\n".join(b64(png(24))[i : i + 76] for i in range(0, len(b64(png(24))), 76))
    jpeg_labelled = uri(png(24), "image/jpeg")  # the bytes say what they are
    response = client.post("/decode", json={"images": [wrapped, jpeg_labelled]})
    assert response.status_code == 200, response.text
    assert response.json() == {"shape": [2, 16, 16, 3]}


def test_k_in_json_is_a_number_and_checked_as_a_forms_k(client):
    assert client.post("/search", json={"images": [b64(png())], "k": 5}).json() == {"k": 5}
    assert client.post("/search", json={"images": [b64(png())], "k": None}).json() == {"k": 10}
    for k, words in [(0, "between 1 and 50"), (51, "between 1 and 50"), (2.5, "integer")]:
        response = client.post("/search", json={"images": [b64(png())], "k": k})
        assert response.status_code == 400 and words in error(response), response.text
    response = client.post("/search", json={"images": [b64(png())], "k": True})
    assert response.status_code == 400 and error(response) == "k must be an integer, not True"


def test_metadata_in_json_is_the_array_itself_and_checked_as_a_forms(client):
    meta = [{"path": "a.png", "label": "cat"}]
    response = client.post("/add", json={"images": [b64(png())], "metadata": meta})
    assert response.json() == {"paths": ["a.png"], "labels": ["cat"]}
    response = client.post("/add", json={"images": [b64(png())]})
    assert response.json() == {"paths": [None], "labels": [None]}  # no file names in JSON
    response = client.post("/add", json={"images": [b64(png())], "metadata": [{"x": 1}]})
    assert response.status_code == 400
    assert error(response) == 'metadata[0] must be an object with only "path" and "label"'


# -- bad JSON bodies: the families and messages of multipart --------------------------------------


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (b"{not json", 400, "the body is not valid JSON: "),
        (b"", 400, "the body is not valid JSON: "),
        (b'["a"]', 400, 'the JSON body must be an object, {"images": ['),
        (b'{"image": ["a"]}', 400, "unknown field(s) 'image'; this endpoint takes 'images', 'k'"),
        (b'{"k": 3}', 400, "missing field 'images': send one or more images in it, base64"),
        (b'{"images": null}', 400, "missing field 'images'"),
        (b'{"images": []}', 400, "images is empty: send one or more images"),
        (b'{"images": 5}', 400, "images must be a string or an array of strings, not a number"),
        (b'{"images": {"a": 1}}', 400, "images must be a string or an array of strings, not an"),
        (b'{"images": ["aGk=", 3]}', 400, "images[1] is a number, not a string: send the image"),
        (b'{"images": [["aGk="]]}', 400, "images[0] is an array, not a string"),
    ],
    ids=[
        "not-json",
        "empty",
        "array",
        "unknown-field",
        "missing",
        "null",
        "no-images",
        "number",
        "object",
        "not-a-string",
        "nested",
    ],
)
def test_a_body_of_the_wrong_shape_gets_400_that_says_what_to_send(
    client, content, status, message
):
    response = client.post("/form", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert error(response).startswith(message), error(response)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "https://example.com/cat.jpg",
        "HTTPS://example.com/cat.jpg",
        "file:///etc/passwd",
        "s3://bucket/cat.jpg",
        "ftp://example.com/cat.jpg",
    ],
)
def test_a_url_is_refused_with_400_and_never_fetched(client, url):
    response = client.post("/form", json={"images": [b64(png()), url]})
    assert response.status_code == 400, response.text
    scheme = url.split(":")[0].lower()
    body = response.json()
    assert body["files"] == [
        {
            "file": "images[1]",
            "problem": f"a URL ({scheme}:), and URLs are never fetched: send the image itself, "
            "base64-encoded, bare or as data:image/<type>;base64,<data>",
        }
    ]
    assert "169.254" not in body["error"] and "example.com" not in body["error"]


@pytest.mark.parametrize(
    ("item", "status", "problem"),
    [
        ("not base64!", 400, "not valid base64 (standard alphabet, padded): "),
        ("aGk", 400, "not valid base64 (standard alphabet, padded): "),
        ("aGk=é", 400, "not valid base64 (standard alphabet, padded): "),
        (uri(b"%PDF-1.4", "application/pdf"), 415, "a data URI of type application/pdf, not an"),
        ("data:;base64,aGk=", 415, "a data URI of type text/plain (none given), not an image"),
        ("data:text/plain,hello", 415, "a data URI of type text/plain, not an image"),
        ("data:image/png,rawbytes", 400, "a data URI that is not base64: send data:image/"),
        ("data:image/png;base64", 400, "a data URI without a comma"),
        ("data:image/png;base64,@@@", 400, "not valid base64"),
    ],
    ids=[
        "garbage",
        "unpadded",
        "non-ascii",
        "pdf-uri",
        "no-type",
        "text-uri",
        "not-base64-uri",
        "no-comma",
        "bad-base64-in-uri",
    ],
)
def test_an_image_string_that_gives_no_image_bytes_is_named_with_its_problem(
    client, item, status, problem
):
    response = client.post("/form", json={"images": [b64(png()), b64(png()), item]})
    assert response.status_code == status, response.text
    body = response.json()
    assert [f["file"] for f in body["files"]] == ["images[2]"]
    assert body["files"][0]["problem"].startswith(problem), body
    assert body["error"].startswith("images[2]: " + problem)


def test_bytes_that_are_not_an_image_are_named_by_the_decoder_as_a_forms_files_are(client):
    images = [b64(png()), "", b64(b"hello, I am text" * 4), uri(pdf())]
    response = client.post("/decode", json={"images": images[:MAX_IMAGES]})
    assert response.status_code == 400  # empty, not an image
    names = [f["file"] for f in response.json()["files"]]
    assert names == ["images[1]", "images[2]"]
    assert "empty file" in response.json()["files"][0]["problem"]
    response = client.post("/decode", json={"images": [images[0], images[3]]})
    assert response.status_code == 415  # a PDF sent as data:image/png
    assert response.json()["files"][0]["file"] == "images[1]"
    assert "unsupported image format PDF" in error(response)


def test_every_bad_image_string_is_named_in_one_answer_with_the_most_specific_status(client):
    items = ["https://a/b.jpg", uri(b"x", "application/pdf"), "!!"]
    response = client.post("/form", json={"images": items})
    assert response.status_code == 415  # 415 > 400, as for files
    assert [f["file"] for f in response.json()["files"]] == ["images[0]", "images[1]", "images[2]"]


def test_more_images_than_the_limit_get_413_before_any_is_decoded(client):
    response = client.post("/form", json={"images": ["!"] * (MAX_IMAGES + 1)})
    assert response.status_code == 413
    assert error(response) == (
        f"{MAX_IMAGES + 1} images in one request, over the limit of {MAX_IMAGES} "
        "(max_images_per_request)"
    )


def test_a_json_body_over_the_byte_limit_gets_413_declared_or_chunked(client):
    big = {"images": [b64(b"\0" * MAX_BYTES)]}
    response = client.post("/form", json=big)
    assert response.status_code == 413
    assert (
        error(response) == f"request body over the limit of {MAX_BYTES} bytes (max_request_bytes)"
    )

    async def chunks():  # no Content-Length: counted while it streams in
        yield b'{"images": ["'
        for _ in range(MAX_BYTES // 10_000 + 1):
            yield b"A" * 10_000
        yield b'"]}'

    response = client.post("/form", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "max_request_bytes" in error(response)


def test_a_body_that_is_neither_multipart_nor_json_gets_415_naming_both(client):
    response = client.post("/form", content=b"a", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert error(response).startswith("Content-Type text/plain: send multipart/form-data")
    assert "or application/json with them base64-encoded" in error(response)


def test_image_bytes_reads_data_uris_and_bare_base64():
    assert image_bytes("aGk=") == b"hi"
    assert image_bytes("DATA:Image/PNG;BASE64,aGk=") == b"hi"
    assert image_bytes("data:image/png;name=a.png;base64,aGk=") == b"hi"
    assert image_bytes("") == b""  # the decoder names it: empty file


def test_json_bodies_take_their_bytes_from_the_in_flight_budget():
    app = tiny_app(max_request_bytes=MAX_BYTES, max_inflight_bytes=int(MAX_BYTES * 1.5))
    payload = {"images": [b64(b"\0" * int(MAX_BYTES * 0.7))]}

    async def run():
        new_events(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = asyncio.create_task(client.post("/slow", json=payload))
            await asyncio.wait_for(app.state.entered.wait(), 10)
            try:
                refused = await client.post("/form", json=payload)
                small = await client.post("/form", json={"images": [b64(png())]})
            finally:
                app.state.release.set()
            done = await held
            after = await client.post("/form", json={"images": [b64(png())]})
            return done, refused, small, after

    held, refused, small, after = asyncio.run(run())
    assert held.status_code == 200, held.text
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "(max_inflight_bytes); retry later" in error(refused)
    assert small.status_code == 200 and small.json()["used"] > MAX_BYTES * 0.9
    assert after.json()["used"] == after.json()["held"]  # the held body's share came back


# -- POST /v1/embeddings (the OpenAI embeddings API) ----------------------------------------------


def embeddings(client, **body) -> httpx.Response:
    return client.post("/v1/embeddings", json=body)


def openai_error(response) -> str:
    """The message of an error under /v1/, which comes in the OpenAI API's error shape."""
    return response.json()["error"]["message"]


def test_the_openai_answer_has_one_embedding_per_input_as_floats_or_base64(client):
    images = [uri(png(20, 1)), b64(png(30, 2))]
    floats = embeddings(client, model=MODEL, input=images)
    assert floats.status_code == 200, floats.text
    body = floats.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert body["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    vectors = np.asarray([d["embedding"] for d in body["data"]], np.float32)
    assert vectors.shape == (2, DIM)
    packed = embeddings(client, model=MODEL, input=images, encoding_format="base64").json()
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in packed["data"]]
    )
    np.testing.assert_array_equal(decoded, vectors)  # floats are written exactly


def test_one_input_and_no_or_a_null_model_are_the_served_model(client):
    for body in ({"input": b64(png())}, {"input": [b64(png())], "model": None}):
        response = embeddings(client, **body)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == MODEL and len(response.json()["data"]) == 1
    response = embeddings(client, input=[b64(png())], dimensions=DIM, user="u1")
    assert response.status_code == 200, response.text


def test_another_model_gets_404_naming_the_served_one(client):
    response = embeddings(client, model="text-embedding-3-small", input=[b64(png())])
    assert response.status_code == 404
    assert openai_error(response) == (
        f"model 'text-embedding-3-small' is not served here; this server serves '{MODEL}'"
    )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": MODEL}, 400, "missing field 'input'"),
        ({"input": []}, 400, "input is empty"),
        ({"input": [[1, 2, 3]]}, 400, "input[0] is an array, not a string"),  # token ids
        ({"input": [b64(png()), "https://x/y.png"]}, 400, "input[1]: a URL (https:)"),
        ({"input": ["!!"]}, 400, "input[0]: not valid base64"),
        ({"input": [uri(b"x", "text/plain")]}, 415, "input[0]: a data URI of type text/plain"),
        ({"input": [b64(png()), ""]}, 400, "input[1]: empty file"),
        ({"input": ["aGk="] * (MAX_IMAGES + 1)}, 413, "4 images in one request"),
        ({"input": ["aGk="], "encoding_format": "int8"}, 400, "encoding_format must be 'float'"),
        ({"input": ["aGk="], "dimensions": 3}, 400, f"dimensions: '{MODEL}' gives embeddings"),
        ({"input": ["aGk="], "model": 3}, 400, "model must be a string, not a number"),
        ({"input": ["aGk="], "images": ["aGk="]}, 400, "unknown field(s) 'images'; this end"),
    ],
    ids=[
        "no-input",
        "empty",
        "tokens",
        "url",
        "base64",
        "not-an-image-uri",
        "empty-file",
        "too-many",
        "format",
        "dimensions",
        "model-type",
        "unknown-field",
    ],
)
def test_bad_openai_requests_get_the_4xx_of_the_same_problem_in_a_form(
    client, body, status, message
):
    response = embeddings(client, **body)
    assert response.status_code == status, response.text
    assert openai_error(response).startswith(message), response.text


def test_errors_under_v1_come_in_the_openai_shape_with_the_same_message(client):
    items = [b64(png()), "https://a/b.jpg", "!!"]
    form = client.post("/form", json={"images": items}).json()
    response = embeddings(client, input=items)
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": form["error"].replace("images[", "input["),
            "type": "invalid_request_error",
            "param": None,
            "code": None,
            "files": [
                {"file": f["file"].replace("images[", "input["), "problem": f["problem"]}
                for f in form["files"]
            ],
        }
    }


def test_the_openai_endpoint_takes_json_only(client):
    files = [("images", ("a.png", png(), "image/png"))]
    response = client.post("/v1/embeddings", files=files)
    assert response.status_code == 415
    assert openai_error(response).startswith(
        "Content-Type multipart/form-data: send application/json"
    )


def test_embeddings_response_writes_little_endian_float32():
    emb = np.asarray([[1.0, -0.5], [0.25, 2.0]], np.float32)
    answer = embeddings_response(emb, "m", "base64")
    assert base64.b64decode(answer["data"][1]["embedding"]) == emb[1].astype("<f4").tobytes()


def test_a_503_of_the_concurrency_limit_under_v1_comes_in_the_openai_shape():
    app = tiny_app(max_concurrent_requests=1)

    async def run():
        new_events(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = asyncio.create_task(client.post("/slow", json={"images": [b64(png())]}))
            await asyncio.wait_for(app.state.entered.wait(), 10)
            try:
                return await client.post("/v1/embeddings", json={"input": [b64(png())]})
            finally:
                app.state.release.set()
                await held

    refused = asyncio.run(run())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {
        "error": {
            "message": "the server is handling 1 requests already (max_concurrent_requests); "
            "retry later",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
