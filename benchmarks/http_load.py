"""A light closed-loop HTTP load generator and a server-process helper, for the serving
benchmarks (serve_load, soak, memory_ceiling).

The generator shares the machine's cores with the server it measures, so it does almost nothing
per request: every multipart body is built once, up front, from the JPEG files' bytes; C asyncio
workers on one event loop each send the next request as soon as the previous one returns, over a
keep-alive pool of C connections; a response is read but not parsed (the first one of a point is
parsed and checked). The process's own CPU time over the measured window is reported per request
so readers can see what the generator cost.

    bodies = [multipart_body([jpeg], BOUNDARY) for jpeg in jpegs]
    point = asyncio.run(run_point("http://127.0.0.1:3000/embed", bodies, content_type(BOUNDARY),
                                  images_per_request=1, concurrency=16, duration=10, warmup=2))
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import ROOT

BOUNDARY = "embedserve-load-7d3f1c9a2b"  # fixed: bodies are bytes built once
FIELD = "images"  # the /embed form field, repeated once per image


def content_type(boundary: str = BOUNDARY) -> str:
    """The Content-Type header of a body built by `multipart_body` with `boundary`."""
    return f"multipart/form-data; boundary={boundary}"


def multipart_body(
    files: Sequence[bytes], boundary: str = BOUNDARY, field: str = FIELD, mime: str = "image/jpeg"
) -> bytes:
    """A multipart/form-data body with one file part per item of `files`, all named `field`.

    >>> multipart_body([b"x"], "B")[:40]
    b'--B\\r\\nContent-Disposition: form-data; name'
    """
    parts = []
    for i, data in enumerate(files):
        if f"--{boundary}".encode() in data:
            raise ValueError(f"file {i} contains the boundary {boundary!r}")
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="image{i}.jpg"\r\nContent-Type: {mime}\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def embeddings_json_body(
    files: Sequence[bytes], encoding: str = "float", model: str | None = None
) -> bytes:
    """A POST /v1/embeddings body (the OpenAI API): every file as a data:image/jpeg URI."""
    import base64

    uris = ["data:image/jpeg;base64," + base64.b64encode(f).decode("ascii") for f in files]
    body: dict = {"input": uris, "encoding_format": encoding}
    if model is not None:
        body["model"] = model
    return json.dumps(body).encode()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's
    default method); nan for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], not {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 and mean of latencies given in seconds, in milliseconds (2 decimals)."""
    if not latencies_s:
        return {"p50_ms": math.nan, "p95_ms": math.nan, "p99_ms": math.nan, "mean_ms": math.nan}
    ms = [x * 1000 for x in latencies_s]
    return {
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(sum(ms) / len(ms), 2),
    }


class LoadError(RuntimeError):
    """A load point saw failed requests (non-200 answers or connection errors)."""


@dataclass
class Point:
    """One measured load point: `concurrency` closed-loop workers for `duration_s` seconds."""

    concurrency: int
    images_per_request: int
    duration_s: float
    requests: int
    img_s: float
    req_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    errors: int
    client_cpu_ms_per_request: float  # this process's CPU time over the window / requests

    def as_dict(self) -> dict:
        return asdict(self)


def check_answer(payload: bytes, images: int) -> None:
    """Raise LoadError unless an /embed answer holds `images` embeddings of its stated dim (or
    a /v1/embeddings answer `images` embeddings of one size, floats or base64)."""
    try:
        answer = json.loads(payload)
        if isinstance(answer, list):  # a BentoML API returning an array: one row per image
            rows = answer
            dim = len(rows[0]) if rows else 0
        elif "data" in answer:  # the OpenAI shape; base64 rows are compared by their length
            rows = [d["embedding"] for d in answer["data"]]
            dim = len(rows[0]) if rows else 0
        else:
            rows, dim = answer["embeddings"], answer["dim"]
    except (ValueError, KeyError, TypeError) as e:
        raise LoadError(f"/embed answer is not the expected JSON: {payload[:200]!r}") from e
    if len(rows) != images or any(len(r) != dim for r in rows):
        raise LoadError(
            f"/embed answered {len(rows)} rows of sizes {sorted({len(r) for r in rows})} "
            f"for {images} images of dim {dim}"
        )


async def run_point(
    url: str,
    bodies: Sequence[bytes],
    ctype: str,
    images_per_request: int,
    concurrency: int,
    duration: float,
    warmup: float,
    timeout: float = 120.0,
    drain: float = 30.0,
) -> Point:
    """Closed loop: `concurrency` workers POST the next body from `bodies` (cycled) as soon as
    their previous request returns. Requests completing in the `duration` seconds after
    `warmup` are measured; those in flight at the end get `drain` seconds to finish (so the next
    point starts on an idle server), then are cancelled. Raises LoadError, naming the first
    failure, if any request failed before the end."""
    import aiohttp  # a BentoML dependency; imported here so the pure helpers need nothing

    next_body = itertools.cycle(bodies).__next__  # one event loop: no lock needed
    headers = {"Content-Type": ctype}
    done: list[tuple[float, float]] = []  # (finish time, latency) of every finished request
    failures: list[str] = []
    stop = False

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        # The first answer of the point is parsed and checked; the rest are only read.
        async with session.post(url, data=next_body(), headers=headers) as r:
            payload = await r.read()
            if r.status != 200:
                raise LoadError(f"POST {url}: HTTP {r.status}: {payload[:500]!r}")
            check_answer(payload, images_per_request)

        async def worker() -> None:
            while not stop:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=next_body(), headers=headers) as r:
                        payload = await r.read()
                        if r.status != 200:
                            failures.append(f"HTTP {r.status}: {payload[:300]!r}")
                            continue
                except (TimeoutError, aiohttp.ClientError) as e:
                    if not stop:  # not a connection closed by the cancellation below
                        failures.append(f"{type(e).__name__}: {e}")
                    continue
                t1 = time.perf_counter()
                done.append((t1, t1 - t0))

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        start, cpu_start, failed_before = time.perf_counter(), time.process_time(), len(failures)
        await asyncio.sleep(duration)
        end, cpu_end = time.perf_counter(), time.process_time()
        stop = True
        # in-flight requests finish (not counted), within `drain` seconds
        _, pending = await asyncio.wait(tasks, timeout=drain)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    window = [lat for t, lat in done if start <= t <= end]
    errors = len(failures) - failed_before
    if failures:
        raise LoadError(
            f"{len(failures)} failed requests ({errors} in the measured window) at concurrency "
            f"{concurrency}, {images_per_request} images/request; first: {failures[0]}"
        )
    elapsed = end - start
    n = len(window)
    return Point(
        concurrency=concurrency,
        images_per_request=images_per_request,
        duration_s=round(elapsed, 2),
        requests=n,
        img_s=round(n * images_per_request / elapsed, 1),
        req_s=round(n / elapsed, 1),
        **latency_summary_ms(window),
        errors=errors,
        client_cpu_ms_per_request=round(1000 * (cpu_end - cpu_start) / max(n, 1), 3),
    )


SERVICE = "embedserve.service:EmbedService"


def service_command(port: int) -> list[str]:
    """`bentoml serve` of the embedding service from this interpreter's environment, as `make
    serve` runs it."""
    return [str(Path(sys.executable).parent / "bentoml"), "serve", SERVICE, "--port", str(port)]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of a GET (any status; connection errors raise OSError)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class ServerProcess:
    """A server started as a subprocess in its own process group, its output in `log_path`.

    As a context manager it waits until GET `ready_path` answers 200 (or raises, with the log's
    tail, when the process exits or `ready_timeout` passes) and always kills the whole group on
    exit: BentoML starts worker processes that must not outlive the benchmark.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        port: int,
        log_path: str | os.PathLike,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        ready_path: str = "/readyz",
        ready_timeout: float = 180.0,
    ) -> None:
        self.cmd, self.port, self.log_path = list(cmd), port, Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.cwd, self.ready_path, self.ready_timeout = cwd, ready_path, ready_timeout
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own process group, killed as one
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode} before it was ready: "
                    f"{' '.join(self.cmd)}\nlog {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if http_get(self.url + self.ready_path, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(
            f"server not ready after {self.ready_timeout:.0f} s: {' '.join(self.cmd)}\n"
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 15 s."""
        if self.proc is None or self.proc.poll() is not None and not _group_alive(self.proc.pid):
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()
                if not _group_alive(self.proc.pid):
                    return
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.stop()


def service_process(
    log_path: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 180.0,
) -> ServerProcess:
    """The embedding service (`service_command`) on a free port, run from the repository root,
    its output in `log_path`: a ServerProcess to enter."""
    port = free_port()
    return ServerProcess(
        service_command(port), port, log_path, env, cwd=ROOT, ready_timeout=ready_timeout
    )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
