"""Reading multipart requests (embedserve.http.forms, .decode), in-process on a tiny app built
by create_app: good requests, missing or misnamed parts, bad images named by their part, the
image and byte limits, `k` and `metadata` validation."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from embedserve.http.errors import ClientError
from embedserve.http.forms import (
    MAX_LABEL_CHARS,
    MAX_PATH_CHARS,
    client_name,
    parse_k,
    parse_metadata,
    read_form,
)
from embedserve.http.limits import BodyBudget, BodyHold
from tests.embedserve.http_app import MAX_PIXELS, Client, png, tiny_app

MAX_IMAGES = 3
MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def client() -> Client:
    app = tiny_app(max_images_per_request=MAX_IMAGES, max_request_bytes=MAX_BYTES, max_k=50)
    return Client(app)


def files(*parts: tuple[str, bytes], field: str = "images") -> list:
    return [(field, (name, data, "image/png")) for name, data in parts]


def error(response) -> str:
    return response.json()["error"]


# -- good requests ------------------------------------------------------------------------------


def test_a_good_request_gives_every_file_in_order_and_the_text_fields(client):
    a, b = png(20, 1), png(30, 2)
    response = client.post("/form", files=files(("a.png", a), ("b.png", b)), data={"k": "7"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["files"] == [["a.png", len(a)], ["b.png", len(b)]]
    assert body["values"] == {"k": "7"}
    assert 0 < body["held"] == body["used"]  # the body's bytes were taken from the budget


def test_good_images_are_decoded_to_the_models_input(client):
    response = client.post("/decode", files=files(("a.png", png(40)), ("b.png", png(20))))
    assert response.status_code == 200, response.text
    assert response.json() == {"shape": [2, 16, 16, 3]}


# -- missing, misnamed and misplaced parts ------------------------------------------------------


def test_an_unknown_part_gets_400_and_a_form_that_is_not_multipart_415(client):
    response = client.post("/form", data={"k": "3"}, files={"other": ("", b"")})
    assert response.status_code == 400
    assert "unknown field(s) 'other'" in error(response)
    response = client.post("/form", data={"k": "3"})  # urlencoded, not multipart
    assert response.status_code == 415
    assert "multipart/form-data" in error(response)


def test_a_multipart_body_without_the_images_field_gets_400(client):
    body = b'--xx\r\nContent-Disposition: form-data; name="k"\r\n\r\n5\r\n--xx--\r\n'
    response = client.post(
        "/form", content=body, headers={"content-type": "multipart/form-data; boundary=xx"}
    )
    assert response.status_code == 400
    assert error(response) == "missing field 'images': send one or more image files in it"


def test_an_image_sent_as_text_is_refused_and_urls_are_not_fetched(client):
    response = client.post("/form", data={"images": "https://example.com/cat.jpg"})
    assert response.status_code == 415  # urlencoded
    body = b'--xx\r\nContent-Disposition: form-data; name="images"\r\n\r\nhttp://x\r\n--xx--\r\n'
    response = client.post(
        "/form", content=body, headers={"content-type": "multipart/form-data; boundary=xx"}
    )
    assert response.status_code == 400
    assert error(response).startswith("images[0] is a text value, not a file")


def test_a_misspelt_field_is_named_with_the_fields_the_endpoint_takes(client):
    response = client.post("/form", files=files(("a.png", png()), field="image"))
    assert response.status_code == 400
    assert error(response) == (
        "unknown field(s) 'image'; this endpoint takes 'images', 'k', 'metadata'"
    )


def test_a_field_given_twice_or_as_a_file_gets_400(client):
    response = client.post("/form", files=files(("a.png", png())), data={"k": ["1", "2"]})
    assert response.status_code == 400
    assert error(response) == "field 'k' must be given once, as a value"
    response = client.post("/form", files=files(("a.png", png())) + [("k", ("k.txt", b"5"))])
    assert response.status_code == 400
    assert error(response) == "field 'k' must be given once, as a value"


def test_a_body_that_is_not_multipart_gets_415(client):
    response = client.post("/form", content=png(), headers={"content-type": "image/png"})
    assert response.status_code == 415
    assert error(response).startswith("Content-Type image/png: send multipart/form-data")
    response = client.post("/form", content=b"")
    assert response.status_code == 415
    assert error(response).startswith("Content-Type missing")


def test_a_malformed_multipart_body_gets_400(client):
    response = client.post(
        "/form", content=b"garbage", headers={"content-type": "multipart/form-data"}
    )
    assert response.status_code == 400
    assert error(response).startswith("malformed multipart body")


def test_too_many_text_parts_stop_the_parser_with_400(client):
    body = b"".join(
        b'--xx\r\nContent-Disposition: form-data; name="k"\r\n\r\n1\r\n' for _ in range(50)
    )
    response = client.post(
        "/form",
        content=body + b"--xx--\r\n",
        headers={"content-type": "multipart/form-data; boundary=xx"},
    )
    assert response.status_code == 400
    assert "Too many fields" in error(response)


# -- bad images: a 4xx that names each bad part -------------------------------------------------


def test_bad_image_bytes_get_400_naming_the_part_and_its_file(client):
    parts = files(("good.png", png()), ("scan.png", b"not an image at all"), ("ok.png", png()))
    response = client.post("/decode", files=parts)
    assert response.status_code == 400
    body = response.json()
    assert [f["file"] for f in body["files"]] == ["images[1] (scan.png)"]
    assert body["error"].startswith("images[1] (scan.png): ")


def test_every_bad_file_is_named_and_the_most_specific_status_wins(client):
    big = png(120)  # 14 400 pixels, over MAX_PIXELS
    assert MAX_PIXELS < 120 * 120
    parts = files(("a.png", b""), ("big.png", big), ("doc.pdf", b"%PDF-1.7 ..."))
    response = client.post("/decode", files=parts)
    assert response.status_code == 415  # 415 (PDF) > 413 (pixels) > 400 (empty)
    named = [f["file"] for f in response.json()["files"]]
    assert named == ["images[0] (a.png)", "images[1] (big.png)", "images[2] (doc.pdf)"]
    response = client.post("/decode", files=files(("a.png", b""), ("big.png", big)))
    assert response.status_code == 413


def test_a_file_without_a_name_is_named_by_its_position():
    assert client_name(2, None) == "images[2]"
    assert client_name(0, "cat.jpg") == "images[0] (cat.jpg)"


# -- limits ---------------------------------------------------------------------------------


def test_more_images_than_the_limit_get_413_that_counts_them(client):
    parts = files(*[(f"{i}.png", b"x") for i in range(MAX_IMAGES + 1)])
    response = client.post("/form", files=parts)
    assert response.status_code == 413
    assert error(response) == (
        f"{MAX_IMAGES + 1} images in one request, over the limit of {MAX_IMAGES} "
        "(max_images_per_request)"
    )
    assert client.post("/form", files=parts[:MAX_IMAGES]).status_code == 200


def test_many_tiny_file_parts_stop_the_parser_at_once(client):
    response = client.post("/form", files=files(*[(f"{i}.png", b"x") for i in range(500)]))
    assert response.status_code == 413
    assert error(response) == (
        f"more than {MAX_IMAGES + 1} files in one request, over the limit of {MAX_IMAGES} "
        "images (max_images_per_request)"
    )


def test_a_body_over_the_byte_limit_gets_413_by_its_content_length(client):
    response = client.post("/form", files=files(("big.bin", b"\0" * MAX_BYTES)))
    assert response.status_code == 413
    assert error(response) == (
        f"request body over the limit of {MAX_BYTES} bytes (max_request_bytes)"
    )


def test_a_chunked_body_over_the_byte_limit_gets_413_as_it_streams(client):
    async def chunks():  # no Content-Length: sent chunked
        for _ in range(MAX_BYTES // 10_000 + 2):
            yield b"\0" * 10_000

    response = client.post(
        "/form", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xx"}
    )
    assert response.status_code == 413
    assert "max_request_bytes" in error(response)


def scope_request(headers: dict[str, str], messages: list[dict]) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }

    async def receive():
        return messages.pop(0)

    return Request(scope, receive)


MULTIPART = {"content-type": "multipart/form-data; boundary=xx"}


async def read(request: Request, **kwargs):
    return await read_form(request, 1000, ("images",), **kwargs)


def run(coro):
    return asyncio.run(coro)


def test_a_bad_content_length_gets_400():
    request = scope_request({**MULTIPART, "content-length": "12abc"}, [])
    with pytest.raises(ClientError) as e:
        run(read(request))
    assert (e.value.status, e.value.error) == (400, "bad Content-Length header '12abc'")


def test_a_client_that_disconnects_mid_body_gets_400():
    request = scope_request(
        MULTIPART,
        [{"type": "http.request", "body": b"--xx", "more_body": True}, {"type": "http.disconnect"}],
    )
    with pytest.raises(ClientError) as e:
        run(read(request))
    assert e.value.status == 400 and "disconnected" in e.value.error


def test_the_declared_length_is_taken_from_the_budget_before_reading():
    budget = BodyBudget(1500)
    budget.used = 1000
    messages = [{"type": "http.request", "body": b"x" * 600}]
    request = scope_request({**MULTIPART, "content-length": "600"}, messages)
    with pytest.raises(ClientError) as e:
        run(read(request, hold=BodyHold(budget)))
    assert e.value.status == 503 and "max_inflight_bytes" in e.value.error
    assert e.value.headers == {"Retry-After": "1"}
    assert len(messages) == 1  # refused before a byte was read
    assert budget.used == 1000


# -- k and metadata -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "status", "words"),
    [
        ("5", 200, None),
        ("50", 200, None),
        ("0", 400, "k must be between 1 and 50 (max_k), not 0"),
        ("51", 400, "k must be between 1 and 50 (max_k), not 51"),
        ("five", 400, "k must be an integer, not 'five'"),
    ],
)
def test_k_is_an_integer_between_1_and_max_k(client, k, status, words):
    response = client.post("/search", files=files(("a.png", png())), data={"k": k})
    assert response.status_code == status, response.text
    if words:
        assert error(response) == words
    else:
        assert response.json() == {"k": int(k)}
    assert parse_k("10", 10) == 10


def test_without_metadata_the_paths_are_the_file_names(client):
    response = client.post("/add", files=files(("a.png", png()), ("dir/b.png", png())))
    assert response.status_code == 200, response.text
    assert response.json() == {"paths": ["a.png", "dir/b.png"], "labels": [None, None]}


def test_metadata_gives_one_path_and_label_per_image(client):
    metadata = json.dumps([{"path": "p/a.jpg", "label": "cat"}, {"label": "dog"}])
    response = client.post(
        "/add", files=files(("a.png", png()), ("b.png", png())), data={"metadata": metadata}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"paths": ["p/a.jpg", None], "labels": ["cat", "dog"]}


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ("not json", "metadata is not valid JSON"),
        ('{"path": "a"}', "JSON array with one object per image (1)"),
        ("[]", "one object per image"),
        ('[{"path": "a"}, {"path": "b"}]', "one object per image"),
        ('["a"]', 'metadata[0] must be an object with only "path" and "label"'),
        ('[{"path": "a", "owner": "root"}]', 'only "path" and "label"'),
        ('[{"path": 7}]', "metadata[0].path must be a string or null, not int"),
        ('[{"label": ["x"]}]', "metadata[0].label must be a string or null, not list"),
        ('[{"path": "a\\u0000b"}]', "metadata[0].path contains control characters"),
        ('[{"label": "a\\u007fb"}]', "metadata[0].label contains control characters"),
        (
            json.dumps([{"path": "x" * (MAX_PATH_CHARS + 1)}]),
            f"is {MAX_PATH_CHARS + 1} characters, over the limit of {MAX_PATH_CHARS}",
        ),
        (
            json.dumps([{"label": "x" * (MAX_LABEL_CHARS + 1)}]),
            f"over the limit of {MAX_LABEL_CHARS}",
        ),
    ],
)
def test_bad_metadata_gets_a_400_that_says_why(client, metadata, words):
    response = client.post("/add", files=files(("a.png", png())), data={"metadata": metadata})
    assert response.status_code == 400, response.text
    assert words in error(response)


def test_a_file_name_with_control_characters_is_refused_as_a_path():
    with pytest.raises(ClientError) as e:
        parse_metadata(None, [("a\nb.png", b"")])
    assert e.value.status == 400
    assert e.value.error == "images[0]'s file name contains control characters"
    assert parse_metadata(None, [(None, b"")]) == ([None], [None])
