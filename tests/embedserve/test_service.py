"""The HTTP service, against a real server started in a subprocess the way `make serve` does.

One server (module scope, ~20 s to start) serves the shipped default model with an index of
procedurally generated images and deliberately small limits, so every limit can be hit cheaply.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from embedserve.package import Encoder, cuda_session_starts, load_package
from tests.conftest import make_pattern, write_image_folder
from tests.embedserve.server import REPO, Server, build_index, running

pytestmark = pytest.mark.slow

MAX_IMAGES = 8
MAX_BYTES = 2 * 1024 * 1024
MAX_PIXELS = 4_000_000
MAX_K = 50


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """JPEGs of several sizes and aspect ratios (the server resizes and crops them)."""
    rng = np.random.default_rng(7)
    sizes = [(60, 90), (128, 128), (200, 150), (300, 410), (96, 64), (150, 150)]
    return [
        jpeg(np.asarray(Image.fromarray(make_pattern(i % 4, 4, max(h, w), rng)).resize((w, h))))
        for i, (h, w) in enumerate(sizes)
    ]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    """An index built with the command line from a class-per-folder set of patterns."""
    root = tmp_path_factory.mktemp("service")
    folder = write_image_folder(root / "gallery", num_classes=4, per_class=6, size=48, seed=3)
    out = root / "index"
    build_index(folder, out)
    return out


@pytest.fixture(scope="module")
def server(index_dir, tmp_path_factory):
    env = {
        "EMBEDSERVE_INDEX": str(index_dir),
        "EMBEDSERVE_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "EMBEDSERVE_MAX_REQUEST_BYTES": str(MAX_BYTES),
        "EMBEDSERVE_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
        "EMBEDSERVE_MAX_K": str(MAX_K),
    }
    with running(env, tmp_path_factory.mktemp("log") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def info(server) -> dict:
    response = httpx.get(server.url + "/info", timeout=10)
    assert response.status_code == 200
    return response.json()


@pytest.fixture(scope="module")
def engine(info) -> Encoder:
    """The in-process engine on the variant the server reports."""
    return Encoder(load_package(), variant=info["variant"], device="cpu", intra_op_threads=1)


def post_images(
    url: str, files: list[tuple[str, bytes]], field: str = "images", **data
) -> httpx.Response:
    parts = [(field, (name, body, "image/jpeg")) for name, body in files]
    return httpx.post(url, files=parts, data=data, timeout=60)


def embed(server, images: list[bytes]) -> np.ndarray:
    response = post_images(server.url + "/embed", [(f"{i}.jpg", b) for i, b in enumerate(images)])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == load_package().name
    assert body["dim"] == len(body["embeddings"][0])
    return np.asarray(body["embeddings"], np.float32)


# -- embeddings ---------------------------------------------------------------------------------


def test_http_embeddings_equal_the_in_process_engine(server, engine, photos):
    over_http = embed(server, photos)
    in_process = engine.embed_images(photos)
    assert over_http.shape == (len(photos), engine.package.embedding_dim)
    np.testing.assert_allclose(over_http, in_process, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(over_http, axis=1), 1.0, atol=1e-5)


def test_a_batch_request_equals_one_request_per_image(server, photos):
    together = embed(server, photos)
    one_by_one = np.concatenate([embed(server, [p]) for p in photos])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5, rtol=0)


def test_64_concurrent_requests_all_succeed_and_share_model_calls(server, photos):
    before = httpx.get(server.url + "/info").json()["batching"]["observed"]
    expected = embed(server, photos)

    def one(i: int) -> tuple[int, np.ndarray]:
        response = post_images(server.url + "/embed", [("q.jpg", photos[i % len(photos)])])
        assert response.status_code == 200, response.text
        return i, np.asarray(response.json()["embeddings"][0], np.float32)

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    for i, vector in results:  # each answer is its own image's, whatever it was batched with
        np.testing.assert_allclose(vector, expected[i % len(photos)], atol=1e-5)
    after = httpx.get(server.url + "/info").json()["batching"]["observed"]
    requests = after["requests"] - before["requests"]
    calls = after["model_calls"] - before["model_calls"]
    assert requests == 64 + 1
    assert calls < requests, f"{requests} requests took {calls} model calls: nothing was batched"
    assert after["most_requests_in_a_batch"] > 1


# -- /info, health, docs ---------------------------------------------------------------------------


def test_info_reports_what_really_runs(info, index_dir):
    package = load_package()
    # what a session opened here really runs on, not what get_available_providers() lists
    probe = Encoder(package, device="auto", intra_op_threads=1)
    assert info["provider"] == probe.providers[0]
    assert info["variant"] == probe.variant
    assert info["model"]["name"] == package.name
    assert info["model"]["embedding_dim"] == package.embedding_dim
    assert info["model"]["sha256"] == package.card["sha256"]
    assert info["batching"]["max_batch_size"] >= 2
    assert info["limits"] == {
        "max_images_per_request": MAX_IMAGES,
        "max_request_bytes": MAX_BYTES,
        "max_image_pixels": MAX_PIXELS,
        "max_k": MAX_K,
    }
    assert info["index"]["size"] == 24
    assert info["index"]["model"]["name"] == package.name


def test_health_metrics_and_openapi_pages(server):
    assert httpx.get(server.url + "/livez").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200 and "bentoml_service_request" in metrics.text
    spec = httpx.get(server.url + "/docs.json").json()
    index_routes = ("/index/add", "/index/delete", "/index/items/{item_id}", "/index/labels")
    for route in ("/embed", "/search", "/info", "/v1/embeddings", *index_routes):
        assert route in spec["paths"], f"{route} missing from the OpenAPI page"
        text = json.dumps(spec["paths"][route])
        assert "curl" in text, f"{route} has no example in the OpenAPI page"


# -- search -------------------------------------------------------------------------------------


def test_search_returns_the_same_neighbours_as_the_command_line(
    server, index_dir, tmp_path, photos
):
    queries = []
    for i, body in enumerate(photos[:3]):
        path = tmp_path / f"query{i}.jpg"
        path.write_bytes(body)
        queries.append(path)
    cli = subprocess.run(
        [sys.executable, "-m", "embedserve.cli", "search", "--index", str(index_dir)]
        + [str(q) for q in queries]
        + ["-k", "5", "--json", "--device", "cpu"],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    expected = json.loads(cli.stdout)
    response = post_images(
        server.url + "/search", [(q.name, q.read_bytes()) for q in queries], k="5"
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 5 and len(body["results"]) == len(queries)
    for got, want in zip(body["results"], expected, strict=True):
        assert [h["id"] for h in got["neighbours"]] == [h["id"] for h in want["hits"]]
        assert [h["path"] for h in got["neighbours"]] == [h["path"] for h in want["hits"]]
        assert [h["label"] for h in got["neighbours"]] == [h["label"] for h in want["hits"]]
        np.testing.assert_allclose(
            [h["score"] for h in got["neighbours"]], [h["score"] for h in want["hits"]], atol=1e-5
        )


def test_k_larger_than_the_index_returns_every_image(server, photos):
    response = post_images(server.url + "/search", [("q.jpg", photos[0])], k=str(MAX_K))
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["neighbours"]) == 24


def cli_search(index_dir, *args: str) -> list[dict]:
    cli = subprocess.run(
        [sys.executable, "-m", "embedserve.cli", "search", "--index", str(index_dir), *args]
        + ["--json", "--device", "cpu"],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return json.loads(cli.stdout)


def test_search_by_id_and_filters_equal_the_command_line(server, index_dir, tmp_path, photos):
    query = tmp_path / "q.jpg"
    query.write_bytes(photos[1])
    filters = ["--label", "class_1", "--label", "class_3", "--min-score", "-0.2"]
    expected = cli_search(index_dir, str(query), "-k", "4", *filters)[0]["hits"]
    response = post_images(
        server.url + "/search",
        [("q.jpg", photos[1])],
        k="4",
        label=["class_1", "class_3"],
        min_score="-0.2",
    )
    got = response.json()["results"][0]["neighbours"]
    assert [h["id"] for h in got] == [h["id"] for h in expected] and len(got) == 4
    assert {h["label"] for h in got} <= {"class_1", "class_3"}
    by_id = cli_search(index_dir, "--id", "9", "-k", "5")[0]["hits"]
    for body in ({"data": {"id": "9", "k": "5"}}, {"json": {"id": 9, "k": 5}}):
        answer = httpx.post(server.url + "/search", timeout=30, **body).json()
        assert answer["results"][0]["id"] == 9 and answer["results"][0]["file"] is None
        got = answer["results"][0]["neighbours"]
        assert [h["id"] for h in got] == [h["id"] for h in by_id] and 9 not in [
            h["id"] for h in got
        ]
        np.testing.assert_allclose(
            [h["score"] for h in got], [h["score"] for h in by_id], atol=1e-6
        )


def test_the_thumbnails_the_command_line_stored_are_served(server, index_dir):
    response = httpx.get(server.url + "/index/items/2/thumbnail", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (48, 48)
    assert httpx.get(server.url + "/index/items/2").json()["label"] == "class_0"
    missing = httpx.get(server.url + "/index/items/24/thumbnail", timeout=30)
    assert missing.status_code == 404 and "no item with id 24" in missing.json()["error"]
    labels = httpx.get(server.url + "/index/labels", timeout=30).json()["labels"]
    assert labels == {f"class_{i}": 6 for i in range(4)}
    # without a key, changing the index is off
    response = httpx.request("DELETE", server.url + "/index/items/2", timeout=30)
    assert response.status_code == 403 and "needs an API key" in response.json()["error"]


# -- bad input: a 4xx that names the file and the problem, and the server stays healthy ----------


def truncated_jpeg(photos) -> bytes:
    big = jpeg(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    return big[: len(big) // 2]


def bomb_png() -> bytes:
    """A 1-bit PNG that declares 5000x5000 = 25 MP and compresses to a few kilobytes."""
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, "PNG")
    return buf.getvalue()


def pdf_file() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "PDF")
    return buf.getvalue()


BAD_FILES = {
    # name: (bytes factory, expected status, words the error must contain)
    "zero-byte": (lambda photos: b"", 400, "empty file"),
    "not-an-image": (lambda photos: b"hello, I am a text file\n" * 10, 400, "not an image"),
    "truncated-jpeg": (truncated_jpeg, 400, "truncated"),
    "unsupported-format": (lambda photos: pdf_file(), 415, "unsupported image format PDF"),
    "heic": (
        lambda photos: b"\x00\x00\x00\x18ftypheic" + b"\x00" * 200,
        415,
        "unsupported image format HEIF",
    ),
    "pixel-bomb": (lambda photos: bomb_png(), 413, "megapixels, over the limit"),
}


def assert_still_healthy(server, photos) -> None:
    assert httpx.get(server.url + "/livez").status_code == 200
    assert embed(server, photos[:1]).shape[0] == 1


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_gets_a_4xx_that_names_it(server, photos, case):
    make, status, words = BAD_FILES[case]
    files = [("good.jpg", photos[0]), (f"{case}.bin", make(photos))]
    response = post_images(server.url + "/embed", files)
    assert response.status_code == status, response.text
    body = response.json()
    assert words in body["error"]
    assert body["files"] == [
        {"file": f"images[1] ({case}.bin)", "problem": body["files"][0]["problem"]}
    ]
    assert f"{case}.bin" in body["error"]  # the file is named, the good one is not blamed
    assert "good.jpg" not in body["error"]
    assert_still_healthy(server, photos)


def test_more_images_than_the_per_request_limit_get_413(server, photos):
    files = [(f"{i}.jpg", photos[i % len(photos)]) for i in range(MAX_IMAGES + 1)]
    response = post_images(server.url + "/embed", files)
    assert response.status_code == 413
    assert f"{MAX_IMAGES + 1} images" in response.json()["error"]
    assert "max_images_per_request" in response.json()["error"]
    assert_still_healthy(server, photos)


def test_a_request_over_the_byte_limit_gets_413(server, photos):
    noise = np.random.default_rng(2).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    big = jpeg(noise, quality=100)
    assert len(big) > MAX_BYTES
    response = post_images(server.url + "/embed", [("big.jpg", big)])
    assert response.status_code == 413
    assert "max_request_bytes" in response.json()["error"]
    assert_still_healthy(server, photos)


def test_a_chunked_upload_over_the_byte_limit_gets_413(server, photos):
    def chunks():
        for _ in range(MAX_BYTES // 65536 + 2):
            yield b"x" * 65536

    response = httpx.post(
        server.url + "/embed",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=abc"},
        timeout=60,
    )
    assert response.status_code == 413
    assert_still_healthy(server, photos)


def test_a_missing_images_field_gets_400_that_names_it(server, photos):
    response = post_images(server.url + "/embed", [("a.jpg", photos[0])], field="image")
    assert response.status_code == 400
    assert "images" in response.text
    assert_still_healthy(server, photos)


@pytest.mark.parametrize("k", ["0", "-3", str(MAX_K + 1), "ten", "2.5"])
def test_a_wrong_k_gets_400(server, photos, k):
    response = post_images(server.url + "/search", [("q.jpg", photos[0])], k=k)
    assert response.status_code == 400, response.text
    assert "k" in response.text
    assert_still_healthy(server, photos)


# -- device selection -----------------------------------------------------------------------------


def test_device_cuda_without_a_usable_gpu_stops_the_server_with_a_clear_error(tmp_path):
    if cuda_session_starts(load_package()):
        pytest.skip("a usable GPU is present: EMBEDSERVE_DEVICE=cuda would start")
    srv = Server({"EMBEDSERVE_DEVICE": "cuda"}, tmp_path / "server.log")
    try:
        assert srv.proc.wait(timeout=120) != 0
        assert "the CUDA execution provider cannot start" in srv.log()
    finally:
        srv.stop()


@pytest.mark.skipif(
    not cuda_session_starts(load_package()),
    reason="no usable GPU here: the CUDA path (provider, fp16 variant, I/O binding) needs one",
)
def test_on_a_gpu_auto_serves_with_cuda_and_fp16(tmp_path, photos):
    srv = Server({"EMBEDSERVE_DEVICE": "auto"}, tmp_path / "server.log")
    try:
        srv.wait_ready()
        info = httpx.get(srv.url + "/info").json()
        assert info["provider"] == "CUDAExecutionProvider"
        assert info["variant"] == load_package().choose_variant("cuda")
        over_http = embed(srv, photos)
        reference = Encoder(load_package(), variant="fp32", device="cpu").embed_images(photos)
        assert float((over_http * reference).sum(axis=1).min()) > 0.999
    finally:
        srv.stop()


def test_a_url_sent_as_text_is_refused_not_fetched(server, photos):
    response = httpx.post(
        server.url + "/embed",
        files=[("images", ("a.jpg", photos[0], "image/jpeg"))],
        data={"images": "http://169.254.169.254/latest/meta-data/"},
        timeout=30,
    )
    assert response.status_code == 400
    assert "not a file" in response.json()["error"]
    assert_still_healthy(server, photos)


@pytest.mark.parametrize(
    ("content_type", "body", "status", "words"),
    [
        # JSON is read (tests/embedserve/test_service_json.py): a file name is not base64
        ("application/json", b'{"images": ["a.jpg"]}', 400, "images[0]: not valid base64"),
        ("text/plain", b"a.jpg", 415, "or application/json with them base64-encoded"),
        ("multipart/form-data; boundary=xyz", b"--abc\r\nnot a multipart body", 400, "multipart"),
        ("multipart/form-data", b"no boundary at all", 400, "malformed multipart"),
    ],
    ids=["json-file-name", "text", "wrong-boundary", "no-boundary"],
)
def test_a_body_that_is_not_a_multipart_form_gets_a_4xx(
    server, photos, content_type, body, status, words
):
    response = httpx.post(
        server.url + "/embed", content=body, headers={"content-type": content_type}, timeout=30
    )
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert_still_healthy(server, photos)


def test_without_an_api_key_reading_is_open_and_adding_to_the_index_is_off(server, info, photos):
    assert info["auth"] == "open" and info["index"]["writes"] == "off"
    response = post_images(server.url + "/index/add", [("a.jpg", photos[0])])
    assert response.status_code == 403
    assert "needs an API key" in response.json()["error"]
    assert "EMBEDSERVE_API_KEY" in response.json()["error"]
