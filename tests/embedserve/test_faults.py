"""Faults against a real server: a corrupted model file, a worker killed mid-request, and the
whole server SIGKILLed at random moments while images are being added to its index."""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import socket
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from embedserve.index import SearchIndex
from embedserve.package import load_package
from tests.conftest import make_pattern, write_image_folder
from tests.embedserve.server import Server, build_index

pytestmark = pytest.mark.slow

KEY = "fault-key-0c8e3b1d9a4f7e62"
AUTH = {"Authorization": f"Bearer {KEY}"}


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_pattern(seed % 4, 4, 56, np.random.default_rng(seed))).save(buf, "PNG")
    return buf.getvalue()


def worker_processes(server: Server) -> list[psutil.Process]:
    """The BentoML worker processes (children of the `bentoml serve` process)."""
    return [
        p
        for p in psutil.Process(server.proc.pid).children(recursive=True)
        if "_bentoml_impl.worker.service" in " ".join(p.cmdline())
    ]


def dead(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- a corrupted model ---------------------------------------------------------------------------


def test_a_corrupted_model_file_stops_the_server_before_it_is_ever_ready(tmp_path):
    package = load_package()
    copy = tmp_path / package.path.name
    shutil.copytree(package.path, copy)
    victim = package.file(package.choose_variant("cpu")).name  # the file the server would run
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the weights
    (copy / victim).write_bytes(bytes(data))
    srv = Server({"EMBEDSERVE_MODEL": str(copy), "EMBEDSERVE_DEVICE": "cpu"}, tmp_path / "s.log")
    try:
        while srv.proc.poll() is None:
            try:
                ready = httpx.get(srv.url + "/readyz", timeout=1).status_code
            except httpx.HTTPError:
                ready = None
            assert ready != 200, "a server with a corrupted model reported ready"
            time.sleep(0.2)
        assert srv.proc.returncode != 0
        log = srv.log()
        assert f"{victim}: sha256" in log and "refusing to serve it" in log
    finally:
        srv.stop()


# -- a worker killed mid-request -------------------------------------------------------------------


def test_a_worker_killed_mid_request_fails_those_requests_and_the_service_recovers(tmp_path):
    srv = Server({"EMBEDSERVE_DEVICE": "cpu"}, tmp_path / "server.log")
    try:
        srv.wait_ready()
        (worker,) = worker_processes(srv)
        outcomes: list[str] = []
        stop = threading.Event()

        def client(seed: int) -> None:
            body = png(seed)
            while not stop.is_set():
                try:
                    r = httpx.post(
                        srv.url + "/embed",
                        files=[("images", ("a.png", body, "image/png"))],
                        timeout=60,
                    )
                    outcomes.append(str(r.status_code))
                except httpx.HTTPError as e:
                    outcomes.append(type(e).__name__)

        clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in clients:
            t.start()
        while outcomes.count("200") < 20:  # requests are flowing
            time.sleep(0.05)
        # One request certainly in flight in the worker when it dies: an upload that has sent
        # its headers and half its body, on a connection the worker has accepted. (The load
        # clients' requests may all sit in the listen backlog at the moment of the kill, and
        # then the new worker serves them: a retry by the kernel, which is fine too.)
        stalled = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        stalled.sendall(
            b"POST /embed HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
            + b"--b\r\n"
            + b"x" * 1000
        )
        client_port = stalled.getsockname()[1]
        deadline = time.monotonic() + 10
        while not any(
            c.raddr and c.raddr.port == client_port for c in worker.net_connections("tcp")
        ):
            assert time.monotonic() < deadline, "the worker never accepted the stalled upload"
            time.sleep(0.05)
        served_before = len(outcomes)
        worker.send_signal(signal.SIGKILL)
        # Probe from the moment the worker is dead (a zombie is dead: it answers nothing), not
        # from when the server reaps it: reaping took ~8 s here and the new worker was warm ~1 s
        # later, so a probe sent after the reap could sit in the listen backlog and be answered
        # 200 by the new worker.
        deadline = time.monotonic() + 10
        while not dead(worker):
            assert time.monotonic() < deadline, "SIGKILL did not kill the worker"
            time.sleep(0.01)
        # readiness says "no" (refused, timed out or 503) until the new worker is warm
        probes = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                probes.append(httpx.get(srv.url + "/readyz", timeout=1).status_code)
            except httpx.HTTPError as e:
                probes.append(type(e).__name__)
            if probes[-1] == 200:
                break
            time.sleep(0.1)
        stop.set()
        for t in clients:
            t.join(timeout=90)
            assert not t.is_alive(), "a client hung on a request to the killed worker"
        assert probes[-1] == 200, f"not ready again: {probes[-5:]}"
        assert any(p != 200 for p in probes), "readiness said ready while the worker was dead"
        (new_worker,) = worker_processes(srv)
        assert new_worker.pid != worker.pid

        # the request in flight in the killed worker ends with an error, not a hang
        try:
            answer = stalled.recv(1024)
        except ConnectionResetError:
            answer = b""
        finally:
            stalled.close()
        assert answer == b"" or answer.startswith(b"HTTP/1.1 5"), answer[:80]
        after_kill = outcomes[served_before:]
        failed = [o for o in after_kill if o != "200"]
        # what failed did so visibly (a connection error or a 5xx), never as a 4xx or silently
        assert all(o.startswith("5") or not o.isdigit() for o in failed), failed
        response = httpx.post(
            srv.url + "/embed", files=[("images", ("a.png", png(1), "image/png"))], timeout=60
        )
        assert response.status_code == 200
    finally:
        stop.set()
        srv.stop()


def test_workers_exit_when_the_server_process_is_killed(tmp_path):
    srv = Server({"EMBEDSERVE_DEVICE": "cpu"}, tmp_path / "server.log")
    try:
        srv.wait_ready()
        workers = worker_processes(srv)
        os.killpg(srv.proc.pid, signal.SIGKILL)  # the workers are in other sessions
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, "an orphaned worker kept running (and serving, and holding locks)"
    finally:
        srv.stop()


# -- the server SIGKILLed while images are added ---------------------------------------------------


def test_every_acknowledged_addition_survives_sigkills_of_the_server(tmp_path):
    folder = write_image_folder(tmp_path / "gallery", num_classes=2, per_class=3, size=40, seed=9)
    index_dir = tmp_path / "index"
    build_index(folder, index_dir)
    env = {
        "EMBEDSERVE_API_KEY": KEY,
        "EMBEDSERVE_INDEX": str(index_dir),
        "EMBEDSERVE_DEVICE": "cpu",
        "EMBEDSERVE_INDEX_LOG_MAX_BYTES": "20000",  # compactions happen between the kills too
    }
    rng = random.Random(99)
    acked: dict[str, int] = {}  # path -> id, for every addition the server acknowledged
    counter = iter(range(10**6))
    kills = 0
    for round_ in range(4):
        srv = Server(env, tmp_path / f"server{round_}.log")
        try:
            srv.wait_ready()
            if round_ == 3:  # after the last kill: everything is there, through HTTP too
                check_after_kills(srv, index_dir, acked)
                break
            stop = threading.Event()

            def stream(srv=srv, stop=stop) -> None:
                while not stop.is_set():
                    n = next(counter)
                    files = [("images", (f"add-{n}.png", png(1000 + n), "image/png"))]
                    try:
                        r = httpx.post(
                            srv.url + "/index/add", files=files, headers=AUTH, timeout=30
                        )
                    except httpx.HTTPError:
                        continue  # killed mid-request: not acknowledged
                    if r.status_code == 200:
                        acked[f"add-{n}.png"] = r.json()["ids"][0]

            streams = [threading.Thread(target=stream) for _ in range(3)]
            for t in streams:
                t.start()
            before = len(acked)
            while len(acked) < before + 5:  # some additions are acknowledged ...
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.0))  # ... then a random moment
            # a crash of the whole server: the worker (in its own session) first, mid-write
            workers = worker_processes(srv)
            for worker in workers:
                worker.send_signal(signal.SIGKILL)
            os.killpg(srv.proc.pid, signal.SIGKILL)
            psutil.wait_procs(workers, timeout=30)
            srv.proc.wait(timeout=30)
            kills += 1
            stop.set()
            for t in streams:
                t.join(timeout=60)
        finally:
            srv.stop()
    assert kills == 3 and len(acked) >= 15


def check_after_kills(srv: Server, index_dir, acked: dict[str, int]) -> None:
    """Every acknowledged path is in the index under its id, once; the last one is found."""
    index = SearchIndex.load(index_dir)
    paths = [p for p, _ in index.metadata(range(len(index)))]
    assert len(set(paths)) == len(paths), "an addition is in the index twice"
    for path, item_id in acked.items():
        assert paths[item_id] == path, f"acknowledged {path} (id {item_id}) is lost"
    last = max(acked, key=acked.get)
    n = int(last.removeprefix("add-").removesuffix(".png"))
    response = httpx.post(
        srv.url + "/search",
        files=[("images", ("q.png", png(1000 + n), "image/png"))],
        data={"k": "1"},
        headers=AUTH,
        timeout=30,
    )
    hit = response.json()["results"][0]["neighbours"][0]
    assert hit["path"] == last and hit["score"] == pytest.approx(1.0, abs=1e-4)
