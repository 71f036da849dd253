"""Access control, POST /index/add, hostile input and traffic limits, against a real server.

One server (module scope) runs with an API key, a writable copy of an index, and deliberately
small limits (4 requests at once, a 5 s request timeout, a small write-ahead log) so that every
bound can be hit cheaply and deterministically.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_pattern, write_image_folder
from tests.embedserve.server import build_index, running

pytestmark = pytest.mark.slow

KEY = "test-key-5f0c2b9e8d7a61c4"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_IMAGES = 8
MAX_BYTES = 1024 * 1024
MAX_CONCURRENT = 4
MAX_INFLIGHT = MAX_BYTES * 3 // 2  # one full-size body and half another
TIMEOUT_S = 5
LOG_MAX_BYTES = 24_000  # about ten one-image records: the tests cross it, so the log compacts


def png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(make_pattern(seed % 4, 4, size, rng)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("security")
    folder = write_image_folder(root / "gallery", num_classes=4, per_class=3, size=48, seed=5)
    out = root / "index"
    build_index(folder, out)
    return out


@pytest.fixture(scope="module")
def server(index_dir, tmp_path_factory):
    env = {
        "EMBEDSERVE_API_KEY": KEY,
        "EMBEDSERVE_INDEX": str(index_dir),
        "EMBEDSERVE_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "EMBEDSERVE_MAX_REQUEST_BYTES": str(MAX_BYTES),
        "EMBEDSERVE_MAX_CONCURRENT_REQUESTS": str(MAX_CONCURRENT),
        "EMBEDSERVE_MAX_INFLIGHT_BYTES": str(MAX_INFLIGHT),
        "EMBEDSERVE_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        "EMBEDSERVE_INDEX_LOG_MAX_BYTES": str(LOG_MAX_BYTES),
    }
    with running(env, tmp_path_factory.mktemp("log") / "server.log") as srv:
        yield srv


def post(server, route: str, images: list[tuple[str, bytes]], headers=None, **data):
    files = [("images", (name, body, "image/png")) for name, body in images]
    return httpx.post(server.url + route, files=files, data=data, headers=headers, timeout=60)


def add(server, images: list[tuple[str, bytes]], metadata=None) -> httpx.Response:
    data = {} if metadata is None else {"metadata": json.dumps(metadata)}
    return post(server, "/index/add", images, headers=AUTH, **data)


def top_hit(server, image: bytes) -> dict:
    response = post(server, "/search", [("q.png", image)], headers=AUTH, k="1")
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["neighbours"][0]


# -- access control -----------------------------------------------------------------------------


ROUTES = [
    ("POST", "/embed"),
    ("POST", "/search"),
    ("GET", "/info"),
    ("POST", "/index/add"),
    ("GET", "/index/labels"),
    ("GET", "/index/items/0"),
    ("GET", "/index/items/0/thumbnail"),
    ("POST", "/index/delete"),
    ("DELETE", "/index/items/0"),
]


def request(server, method: str, route: str, headers: dict) -> httpx.Response:
    if method in ("GET", "DELETE"):
        return httpx.request(method, server.url + route, headers=headers, timeout=30)
    return post(server, route, [("a.png", png(0))], headers=headers)


@pytest.mark.parametrize(("method", "route"), ROUTES, ids=[r for _, r in ROUTES])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-the-key-but-long-enough"},
        {"Authorization": f"Bearer {KEY[:-1]}"},  # one character short
        {"Authorization": f"Basic {KEY}"},  # the right key in the wrong scheme
        {"Authorization": KEY},
    ],
    ids=["none", "wrong", "prefix", "basic", "no-scheme"],
)
def test_without_the_right_key_every_endpoint_answers_401(server, method, route, headers):
    response = request(server, method, route, headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in response.json()["error"]
    sent = headers.get("Authorization", "").split()[-1:] or ["-"]
    assert sent[0] not in response.text and KEY not in response.text  # nothing echoed


@pytest.mark.parametrize(("method", "route"), ROUTES[:3], ids=[r for _, r in ROUTES[:3]])
def test_with_the_key_the_reading_endpoints_answer(server, method, route):
    assert request(server, method, route, AUTH).status_code == 200


def test_health_and_metrics_stay_open_for_the_orchestrator(server):
    for route in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server.url + route, timeout=10).status_code == 200


def test_the_key_never_appears_in_info_or_the_log(server):
    info = httpx.get(server.url + "/info", headers=AUTH, timeout=10)
    assert info.json()["auth"] == "api key required"
    assert KEY not in info.text
    for headers in ({"Authorization": f"Bearer {KEY}x"}, AUTH):
        request(server, "POST", "/embed", headers)
    assert KEY not in server.log() and KEY not in Path(server.log_path).read_text()


# -- POST /index/add --------------------------------------------------------------------------


def test_added_images_are_searchable_at_once_with_their_metadata(server):
    images = [("new-a.png", png(101)), ("new-b.png", png(102))]
    response = add(server, images, [{"path": "shop/a.png", "label": "a"}, {"label": "b"}])
    assert response.status_code == 200, response.text
    body = response.json()
    ids = body["ids"]
    assert len(ids) == 2 and ids[1] == ids[0] + 1 and body["index_size"] == ids[1] + 1
    first, second = top_hit(server, images[0][1]), top_hit(server, images[1][1])
    assert (first["id"], first["path"], first["label"]) == (ids[0], "shop/a.png", "a")
    assert (second["id"], second["path"], second["label"]) == (ids[1], None, "b")
    assert first["score"] == pytest.approx(1.0, abs=1e-4)


def test_without_metadata_the_path_is_the_file_name(server):
    response = add(server, [("holiday.png", png(103))])
    assert response.status_code == 200, response.text
    assert top_hit(server, png(103))["path"] == "holiday.png"


def test_paths_are_stored_as_text_and_never_touch_the_disk(server, index_dir, tmp_path):
    target = tmp_path / "written-by-a-client"
    hostile = [str(target), "../../../../etc/passwd", "..\\..\\boot.ini", "CURRENT"]
    images = [(name, png(200 + i)) for i, name in enumerate(hostile)]
    response = add(server, images, [{"path": p} for p in hostile])
    assert response.status_code == 200, response.text
    for (_, image), path in zip(images, hostile, strict=True):
        assert top_hit(server, image)["path"] == path  # returned verbatim, never resolved
    assert not target.exists()
    # the index folder holds only its own files (a compaction may have made a new version)
    names = {p.name for p in index_dir.iterdir()}
    assert all(
        n in {"CURRENT", ".lock", "wal.log", ".wal.lock"} or n.startswith("v0") for n in names
    )
    assert (index_dir / "CURRENT").read_text().startswith("v0")


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ("not json", "not valid JSON"),
        ('{"path": "a"}', "JSON array with one object per image"),
        ("[]", "one object per image"),
        ('[{"path": "a", "owner": "root"}]', 'only "path" and "label"'),
        ('[{"path": 7}]', "must be a string"),
        ('[{"path": "a\\u0000b"}]', "control characters"),
        (json.dumps([{"path": "x" * 2000}]), "over the limit of 1024"),
    ],
    ids=["not-json", "object", "count", "extra-key", "number", "nul", "long"],
)
def test_bad_metadata_gets_a_400_that_says_why(server, metadata, words):
    response = post(server, "/index/add", [("a.png", png(1))], headers=AUTH, metadata=metadata)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]


def test_searches_while_images_are_added_never_fail(server):
    query = png(0)

    def search(_):
        return post(server, "/search", [("q.png", query)], headers=AUTH, k="5").status_code

    def adder(i):
        return add(server, [(f"c{i}.png", png(300 + i))]).status_code

    with ThreadPoolExecutor(MAX_CONCURRENT - 1) as pool:  # under the 503 limit
        searches = [pool.submit(search, i) for i in range(24)]
        adds = [pool.submit(adder, i) for i in range(12)]  # crosses the log limit: compacts
        statuses = [f.result() for f in searches + adds]
    assert statuses == [200] * len(statuses)
    info = httpx.get(server.url + "/info", headers=AUTH, timeout=10).json()
    assert "index saved as v0" in server.log()  # the log was compacted on the way
    assert info["index"]["log_bytes"] <= LOG_MAX_BYTES


# -- hostile bodies -----------------------------------------------------------------------------


def raw_multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> bytes:
    out = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data)
    return b"\r\n".join(out) + f"\r\n--{boundary}--\r\n".encode()


def post_raw(server, body: bytes, route: str = "/embed") -> httpx.Response:
    headers = {**AUTH, "content-type": "multipart/form-data; boundary=b0undary"}
    return httpx.post(server.url + route, content=body, headers=headers, timeout=60)


def test_a_body_of_many_tiny_file_parts_stops_at_the_image_limit(server):
    body = raw_multipart([("images", f"{i}.png", b"x") for i in range(10_000)])
    assert len(body) < MAX_BYTES
    response = post_raw(server, body)
    assert response.status_code == 413
    assert "max_images_per_request" in response.json()["error"]


def test_a_body_of_many_text_fields_gets_400(server):
    body = raw_multipart([("images", "a.png", png(1))] + [("k", None, b"1")] * 5000)
    response = post_raw(server, body, "/search")
    assert response.status_code == 400
    assert "Too many fields" in response.json()["error"]


def test_deeply_nested_multipart_is_one_opaque_file(server):
    """A part whose body is itself multipart is not parsed further: it is a (bad) image."""
    inner = raw_multipart([("images", "x.png", png(1))], "inner")
    for _ in range(200):
        inner = raw_multipart([("images", "nest.bin", inner)], "inner")
    response = post_raw(server, raw_multipart([("images", "nest.bin", inner[:200_000])]))
    assert response.status_code == 400
    assert "not an image" in response.json()["error"]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds one compressed row of zeros."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * min(width, 1024)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("width", "height"),
    [(2**31 - 1, 2**31 - 1), (1_000_000, 100), (65_535, 65_535)],
    ids=["2^31-squared", "a-million-wide", "65535-squared"],
)
def test_huge_declared_dimensions_are_refused_before_decoding(server, width, height):
    response = post(server, "/embed", [("huge.png", png_header(width, height))], headers=AUTH)
    assert response.status_code in (400, 413), response.text
    assert "huge.png" in response.json()["error"]
    assert post(server, "/embed", [("ok.png", png(1))], headers=AUTH).status_code == 200


# -- slow clients and floods --------------------------------------------------------------------


def stalled_upload(server, declared: int = 100_000) -> socket.socket:
    """A client that sends the headers and half of its body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Type: multipart/form-data; boundary=b0undary\r\n"
        b"Content-Length: " + str(declared).encode() + b"\r\n\r\n" + b"--b0undary\r\n" + b"x" * 1000
    )
    return sock


def _wait_for_status(server, images, status: int) -> httpx.Response:
    for _ in range(100):  # the server sees a stalled upload or a disconnection a moment later
        response = post(server, "/embed", images, headers=AUTH)
        if response.status_code == status:
            break
        time.sleep(0.05)
    return response


def test_requests_over_the_concurrency_limit_get_503_not_memory(server):
    stalled = [stalled_upload(server) for _ in range(MAX_CONCURRENT)]
    try:
        response = _wait_for_status(server, [("a.png", png(1))], 503)  # every slot is held
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "max_concurrent_requests" in response.json()["error"]
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200  # not counted
    finally:
        for sock in stalled:
            sock.close()
    # the slots are freed once the server sees the disconnections
    assert _wait_for_status(server, [("a.png", png(1))], 200).status_code == 200


def big_png(nbytes: int) -> bytes:
    """A valid PNG of about `nbytes` (noise does not compress)."""
    side = int((nbytes / 3) ** 0.5)
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG", compress_level=0)
    return buf.getvalue()


def test_bodies_over_the_workers_byte_budget_get_503_and_the_budget_comes_back(server):
    large = [("large.png", big_png(MAX_BYTES // 2 + 50_000))]  # over what one stall leaves
    assert post(server, "/embed", large, headers=AUTH).status_code == 200  # fits when alone
    stalled = stalled_upload(server, declared=MAX_BYTES)  # holds a full-size body's share
    try:
        response = _wait_for_status(server, large, 503)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "max_inflight_bytes" in response.json()["error"]
        # a small body still fits: it is the bytes that are bounded, not the requests
        assert post(server, "/embed", [("a.png", png(1))], headers=AUTH).status_code == 200
    finally:
        stalled.close()
    assert _wait_for_status(server, large, 200).status_code == 200  # its share was given back


def test_a_chunked_body_is_counted_against_the_budget_as_it_streams(server):
    stalled = stalled_upload(server, declared=MAX_BYTES)
    try:
        time.sleep(0.5)  # the stalled upload has taken its share
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        try:
            sock.sendall(
                b"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + KEY.encode()
                + b"\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"x" * 100_000
            for _ in range(7):  # 700 kB, no Content-Length: only the chunks can be counted
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            answer = b""
            while b"}" not in answer and (data := sock.recv(4096)):
                answer += data
        finally:
            sock.close()
    finally:
        stalled.close()
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"max_inflight_bytes" in answer
    assert _wait_for_status(server, [("a.png", png(2))], 200).status_code == 200


def test_a_client_that_stops_sending_gets_504_after_the_request_timeout(server):
    sock = stalled_upload(server)
    try:
        sock.settimeout(TIMEOUT_S * 6)
        answer = b""
        while b"}" not in answer and (chunk := sock.recv(4096)):  # headers, then the JSON body
            answer += chunk
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 504"), answer[:200]
    assert b"seconds" in answer


def test_a_flood_of_idle_connections_does_not_stop_service(server):
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        response = post(server, "/embed", [("a.png", png(1))], headers=AUTH)
        assert response.status_code == 200
    finally:
        for sock in idle:
            sock.close()


def test_an_oversized_header_is_refused_and_the_server_stays_up(server):
    """The HTTP parser (httptools/llhttp) drops a connection whose headers exceed its limit."""
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/info", headers={**AUTH, "X-Filler": "a" * 200_000}, timeout=30)
    assert httpx.get(server.url + "/info", headers=AUTH, timeout=10).status_code == 200


def test_every_addition_survives_a_restart_on_the_same_index(server, index_dir, tmp_path):
    """Copy the index as the server left it (log and all) and load it as a new process would."""
    from embedserve.index import SearchIndex

    info = httpx.get(server.url + "/info", headers=AUTH, timeout=10).json()
    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    loaded = SearchIndex.load(copy)
    assert len(loaded) == info["index"]["size"]
    paths = [p for p, _ in loaded.metadata(range(len(loaded)))]
    assert "holiday.png" in paths and "shop/a.png" in paths
