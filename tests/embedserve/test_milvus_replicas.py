"""Stateless replicas on one Milvus: `milvus-lite server` (the Milvus Lite package's gRPC server,
reached over its port as a Milvus server would be) holds the collection; two real servers share
it, one with two workers. An addition, a replacement and a deletion through one are seen by
the other and by every worker at once (reads are at Strong consistency)."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from embedserve import index_backend
from embedserve.index_format import SearchIndexError
from tests.conftest import make_pattern, write_image_folder
from tests.embedserve.server import REPO, Server, free_port, running

KEY = "replica-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MILVUS_LITE = Path(sys.executable).with_name("milvus-lite")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    """The URI of a `milvus-lite server` on a free port, stopped at the end."""
    from pymilvus import MilvusClient

    root = tmp_path_factory.mktemp("milvus")
    port = free_port()
    log = open(root / "milvus.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(MILVUS_LITE), "server", "--data-dir", str(root / "data"), "--host", "127.0.0.1"]
        + ["--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # SIGINT stops it cleanly; a job started without job control inherits it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            MilvusClient(uri=uri, timeout=2).list_collections()
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "milvus.log").read_text()[-3000:]) from None
            time.sleep(0.5)
    yield uri
    proc.send_signal(signal.SIGINT)  # its clean stop (it writes out its memtable); SIGTERM kills
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def servers(milvus, tmp_path_factory):
    """(server A with two workers, server B with one), both on the Milvus collection that
    `embedserve index build` made from a folder of patterns."""
    root = tmp_path_factory.mktemp("replicas")
    folder = write_image_folder(root / "gallery", num_classes=3, per_class=4, size=48, seed=5)
    subprocess.run(
        [sys.executable, "-m", "embedserve.cli", "index", "build", "--images", str(folder)]
        + ["--out", milvus, "--device", "cpu", "--quiet"],
        check=True,
        cwd=REPO,
    )
    env = {"EMBEDSERVE_INDEX": milvus, "EMBEDSERVE_API_KEY": KEY, "EMBEDSERVE_DEVICE": "cpu"}
    with (
        running({**env, "EMBEDSERVE_WORKERS": "2"}, root / "a.log") as a,
        running(env, root / "b.log") as b,
    ):
        a.env_index = b.env_index = milvus
        yield a, b


def photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(make_pattern(seed % 3, 3, 64, rng)).save(buf, "PNG")
    return buf.getvalue()


def top(server, image: bytes, k: int = 1) -> list[dict]:
    r = httpx.post(
        server.url + "/search",
        files=[("images", ("q.png", image))],
        data={"k": str(k)},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["neighbours"]


def add(server, image: bytes, path: str, replace: bool = False) -> dict:
    meta = json.dumps([{"path": path, "label": "added"}])
    r = httpx.post(
        server.url + "/index/add",
        files=[("images", ("x.png", image))],
        data={"metadata": meta, "replace": str(replace).lower()},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_both_servers_change_the_index_with_any_number_of_workers(servers):
    a, b = servers
    index_backend.check_location(a.env_index, workers=2)  # what `bentoml serve` checks
    with pytest.raises(SearchIndexError, match="no collection 'absent'"):
        index_backend.check_location(a.env_index, workers=2, collection="absent")
    for srv, workers in ((a, 2), (b, 1)):
        info = httpx.get(srv.url + "/info", headers=AUTH, timeout=10).json()
        assert info["index"]["backend"] == "milvus" and info["index"]["size"] == 12
        assert info["index"]["writes"].startswith("on") and info["workers"] == workers


def test_an_addition_through_one_is_found_through_the_other_and_every_worker(servers):
    a, b = servers
    image = photo(101)
    new_id = add(a, image, "shared/101.png")["ids"][0]
    hit = top(b, image)[0]
    assert hit["id"] == new_id and hit["path"] == "shared/101.png"
    assert hit["score"] == pytest.approx(1.0, abs=1e-3)
    for _ in range(8):  # several requests: both of A's workers answer
        assert top(a, image)[0]["id"] == new_id


def test_a_replacement_and_a_deletion_through_one_are_seen_by_the_other(servers):
    a, b = servers
    first = add(b, photo(202), "shared/202.png")["ids"][0]
    second = add(a, photo(203), "shared/202.png", replace=True)
    assert second["replaced"] == [first]
    for srv in (a, b, a):
        assert httpx.get(f"{srv.url}/index/items/{first}", headers=AUTH).status_code == 404
    r = httpx.request("DELETE", f"{b.url}/index/items/{second['ids'][0]}", headers=AUTH)
    assert r.status_code == 200, r.text
    for _ in range(6):
        assert all(h["id"] != second["ids"][0] for h in top(a, photo(203), k=20))
    labels_a = httpx.get(a.url + "/index/labels", headers=AUTH).json()["labels"]
    labels_b = httpx.get(b.url + "/index/labels", headers=AUTH).json()["labels"]
    assert labels_a == labels_b and labels_a.get("added", 0) >= 1


def test_a_milvus_lite_file_is_served_by_its_one_worker(tmp_path):
    """`make serve` with EMBEDSERVE_INDEX=*.db: only the worker opens the file (the parent
    `bentoml serve` process checks that it exists, nothing more), and two workers are refused
    at once with what to do instead."""
    folder = write_image_folder(tmp_path / "gallery", num_classes=2, per_class=3, size=48, seed=6)
    db = tmp_path / "photos.db"
    subprocess.run(
        [sys.executable, "-m", "embedserve.cli", "index", "build", "--images", str(folder)]
        + ["--out", str(db), "--device", "cpu", "--quiet"],
        check=True,
        cwd=REPO,
    )
    env = {"EMBEDSERVE_INDEX": str(db), "EMBEDSERVE_API_KEY": KEY, "EMBEDSERVE_DEVICE": "cpu"}
    with running(env, tmp_path / "one.log") as srv:
        image = photo(7)
        new_id = add(srv, image, "lite/7.png")["ids"][0]
        assert top(srv, image)[0]["id"] == new_id
    two = Server({**env, "EMBEDSERVE_WORKERS": "2"}, tmp_path / "two.log")
    try:
        assert two.proc.wait(timeout=120) != 0
        assert "only one process can open" in two.log() and "milvus-lite server" in two.log()
    finally:
        two.stop()
