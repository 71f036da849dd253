"""embedserve.client in process: retries of a 503 (httpx.MockTransport), errors, the images it
sends; and the Retry-After of every 503 the HTTP plumbing answers."""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from embedserve.client import Added, APIError, AsyncClient, Client, Neighbour
from embedserve.http.errors import ClientError, error_response
from embedserve.http.limits import BodyBudget, BodyHold
from tests.embedserve.http_app import Client as AppClient
from tests.embedserve.http_app import new_events, png, tiny_app

DIM = 4


def embed_answer(request: httpx.Request) -> httpx.Response:
    """/embed's answer for the images of a multipart request: row i is [i, 0, 0, 0]."""
    n = request.content.count(b'name="images"')
    rows = [[float(i), 0.0, 0.0, 0.0] for i in range(n)]
    return httpx.Response(200, json={"model": "m", "dim": DIM, "embeddings": rows})


class Fake:
    """A server that answers the first `busy` requests with `status` (and `headers`), then
    /embed's answer; it records every request."""

    def __init__(self, busy: int, status: int = 503, headers=None, body=None) -> None:
        self.busy, self.status, self.requests = busy, status, []
        self.headers = {"Retry-After": "2"} if headers is None else headers
        self.body = body if body is not None else {"error": "busy; retry later"}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if len(self.requests) <= self.busy:
            return httpx.Response(self.status, json=self.body, headers=self.headers)
        return embed_answer(request)


def client(fake: Fake, **options) -> tuple[Client, list[float]]:
    waits: list[float] = []
    c = Client("http://test", transport=httpx.MockTransport(fake), **options)
    c._sleep = waits.append
    return c, waits


def test_a_503_is_retried_after_its_retry_after_then_the_answer_comes():
    fake = Fake(busy=2)
    c, waits = client(fake, max_retries=3)
    vectors = c.embed([png(seed=1), png(seed=2)])
    assert len(fake.requests) == 3 and waits == [2.0, 2.0]
    assert vectors.dtype == np.float32 and vectors.shape == (2, DIM)
    # every attempt sends the same images again
    assert len({r.content.count(b'name="images"') for r in fake.requests}) == 1


def test_the_client_gives_up_after_max_retries_with_the_503():
    fake = Fake(busy=10)
    c, waits = client(fake, max_retries=2)
    with pytest.raises(APIError) as e:
        c.embed(png())
    assert len(fake.requests) == 3 and waits == [2.0, 2.0]
    assert e.value.status == 503 and e.value.message == "busy; retry later"
    assert e.value.retry_after == 2.0


def test_the_client_never_waits_past_max_retry_wait():
    fake = Fake(busy=10, headers={"Retry-After": "4"})
    c, waits = client(fake, max_retries=10, max_retry_wait=9)
    with pytest.raises(APIError):
        c.embed(png())
    assert waits == [4.0, 4.0] and len(fake.requests) == 3  # a third wait would pass 9 s
    fake = Fake(busy=10, headers={"Retry-After": "60"})
    c, waits = client(fake, max_retry_wait=30)
    with pytest.raises(APIError):
        c.embed(png())
    assert waits == [] and len(fake.requests) == 1


def test_max_retries_0_raises_the_first_503():
    fake = Fake(busy=1)
    c, waits = client(fake, max_retries=0)
    with pytest.raises(APIError):
        c.embed(png())
    assert waits == [] and len(fake.requests) == 1


def test_retry_after_as_an_http_date_and_absent():
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    fake = Fake(busy=1, headers={"Retry-After": when})
    c, waits = client(fake)
    c.embed(png())
    assert len(waits) == 1 and 1.0 <= waits[0] <= 3.5
    fake = Fake(busy=1, headers={})
    c, waits = client(fake)
    c.embed(png())
    assert waits == [1.0]  # no Retry-After: a second


@pytest.mark.parametrize("status", [400, 401, 404, 413, 415, 429, 500])
def test_other_errors_are_never_retried_and_carry_the_message_and_files(status):
    files = [{"file": "images[1] (scan.pdf)", "problem": "unsupported image format PDF"}]
    fake = Fake(busy=5, status=status, body={"error": "bad", "files": files})
    c, waits = client(fake)
    with pytest.raises(APIError) as e:
        c.embed([png(), b"%PDF-1.4"])
    assert len(fake.requests) == 1 and waits == []
    assert e.value.status == status and e.value.message == "bad" and e.value.files == files
    assert str(e.value) == f"{status}: bad"


def test_errors_in_the_openai_shape_and_not_json():
    body = {"error": {"message": "no", "type": "invalid_request_error", "files": []}}
    c, _ = client(Fake(busy=1, status=400, body=body))
    with pytest.raises(APIError, match="400: no"):
        c.embed(png())
    transport = httpx.MockTransport(lambda request: httpx.Response(502, text="bad gateway"))
    with pytest.raises(APIError) as e, Client("http://test", transport=transport) as c:
        c.info()
    assert e.value.status == 502 and e.value.message == "bad gateway" and e.value.files == []


def test_the_async_client_retries_the_same_way():
    fake = Fake(busy=2)
    waits: list[float] = []

    async def run() -> np.ndarray:
        async with AsyncClient(
            "http://test", transport=httpx.MockTransport(fake), max_retries=3
        ) as c:

            async def sleep(seconds: float) -> None:
                waits.append(seconds)

            c._sleep = sleep
            return await c.embed([png(), png(seed=1), png(seed=2)])

    vectors = asyncio.run(run())
    assert vectors.shape == (3, DIM) and waits == [2.0, 2.0] and len(fake.requests) == 3

    async def give_up() -> None:
        transport = httpx.MockTransport(Fake(busy=9))
        async with AsyncClient("http://test", transport=transport, max_retries=0) as c:
            await c.embed(png())

    with pytest.raises(APIError) as e:
        asyncio.run(give_up())
    assert e.value.status == 503


def parts(request: httpx.Request) -> list[tuple[str | None, bytes]]:
    """(file name, bytes) of each `images` part of a multipart request (parsed by the email
    package, which knows multipart)."""
    import email.parser

    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser().parsebytes(head + request.content)
    return [(p.get_filename(), p.get_payload(decode=True)) for p in message.get_payload()]


def test_paths_bytes_pil_images_and_arrays_are_sent_as_files(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(png(seed=3))
    array = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
    fake = Fake(busy=0)
    c, _ = client(fake)
    vectors = c.embed([path, str(path), png(seed=4), Image.fromarray(array), array])
    assert vectors.shape == (5, DIM)
    sent = parts(fake.requests[0])
    assert [name for name, _ in sent] == [
        "cat.png",
        "cat.png",
        "image2",
        "image3.png",
        "image4.png",
    ]
    assert sent[0][1] == sent[1][1] == png(seed=3) and sent[2][1] == png(seed=4)
    for _, data in sent[3:]:  # lossless: the same pixels
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), array)
    c.embed(array)  # one H x W x 3 array is one image; N x H x W x 3 is N
    assert len(parts(fake.requests[-1])) == 1
    c.embed(np.stack([array, array]))
    assert len(parts(fake.requests[-1])) == 2
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        c.embed(array.astype(np.float32))
    with pytest.raises(TypeError, match="a path, bytes"):
        c.embed([1])
    with pytest.raises(ValueError, match="no images"):
        c.embed([])


def test_search_add_and_info_answers_are_typed_and_the_key_is_a_bearer_token(tmp_path):
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/search":
            hit = {"id": 3, "score": 0.5, "path": "a.jpg", "label": None}
            return httpx.Response(200, json={"model": "m", "k": 1, "results": [
                {"file": "images[0]", "neighbours": [hit]}]})  # fmt: skip
        if request.url.path == "/index/add":
            return httpx.Response(200, json={"model": "m", "ids": [7, 8], "index_size": 9})
        return httpx.Response(200, json={"model": {"name": "m"}})

    path = tmp_path / "b.png"
    path.write_bytes(png())
    transport = httpx.MockTransport(server)
    with Client("http://test/", api_key="k" * 16, transport=transport, timeout=5) as c:
        assert c.search(png(), k=1) == [[Neighbour(id=3, score=0.5, path="a.jpg", label=None)]]
        assert c.add([path, png()], labels=["x", None]) == Added(ids=[7, 8], index_size=9)
        assert c.info() == {"model": {"name": "m"}}
        with pytest.raises(ValueError, match="one path and one label per image"):
            c.add([png()], labels=["a", "b"])
    assert all(r.headers["authorization"] == "Bearer " + "k" * 16 for r in seen)
    assert b'name="k"\r\n\r\n1\r\n' in seen[0].content
    metadata = seen[1].content.split(b'name="metadata"\r\n\r\n')[1].split(b"\r\n")[0]
    assert json.loads(metadata) == [
        {"path": str(path), "label": "x"},
        {"path": None, "label": None},
    ]
    assert Client("http://test").base_url == "http://test"
    assert "authorization" not in Client("http://test")._http.headers


# -- every 503 carries Retry-After ------------------------------------------------------------


def test_every_503_the_error_handler_answers_carries_retry_after():
    from embedserve.batching import Overloaded

    for error in [Overloaded("full"), ClientError(503, "not added"), ClientError(503, "x")]:
        for openai in (False, True):
            response = error_response(error, openai)
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
    # an error's own Retry-After is kept
    given = ClientError(503, "x", headers={"Retry-After": "7"}).response()
    assert given.headers["retry-after"] == "7"
    assert "retry-after" not in error_response(ClientError(400, "x")).headers
    with pytest.raises(ClientError) as e:
        BodyHold(BodyBudget(10)).take(11)
    assert e.value.response().headers["retry-after"] == "1"


def test_the_overloaded_and_the_concurrency_503s_carry_retry_after_end_to_end():
    app = tiny_app(max_concurrent_requests=1)
    c = AppClient(app)
    for path in ("/raise?kind=overloaded", "/raise?status=503"):
        response = c.get(path)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"

    async def two_at_once() -> httpx.Response:
        new_events(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            first = asyncio.create_task(http.post("/slow", files=[("images", ("a", b"x"))]))
            await app.state.entered.wait()
            second = await http.post("/slow", files=[("images", ("b", b"y"))])
            app.state.release.set()
            await first
            return second

    second = asyncio.run(two_at_once())
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
