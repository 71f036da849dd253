"""Start the real HTTP service in a subprocess, the way `make serve` does, for the tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from embedserve.package import CARD_FILE

REPO = Path(__file__).resolve().parents[2]
BENTOML = Path(sys.executable).with_name("bentoml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`bentoml serve embedserve.service:EmbedService --port P` with `env`; ready on /readyz."""

    def __init__(
        self,
        env: Mapping[str, str],
        log: Path,
        target: str = "embedserve.service:EmbedService",
        cwd: Path = REPO,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSERVE_")}
        full_env.update(env)
        full_env.update(extra_env or {})
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [str(BENTOML), "serve", target, "--port", str(self.port), "--host", "127.0.0.1"],
            cwd=cwd,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() kills the workers too
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def build_index(images: Path, out: Path) -> Path:
    """`embedserve index build` on a folder, through the command line, on the CPU."""
    subprocess.run(
        [sys.executable, "-m", "embedserve.cli", "index", "build", "--images", str(images)]
        + ["--out", str(out), "--device", "cpu", "--quiet"],
        check=True,
        cwd=REPO,
    )
    return out


def renamed_copy(src: Path, dst: Path, name: str) -> Path:
    """A package of `src`'s model files (symlinked: nothing is copied) with another card name."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != CARD_FILE:
            (dst / f.name).symlink_to(f.resolve())
    card = json.loads((src / CARD_FILE).read_text())
    card["name"] = name
    (dst / CARD_FILE).write_text(json.dumps(card, indent=2))
    return dst


@contextmanager
def running(env: Mapping[str, str], log: Path) -> Iterator[Server]:
    """A ready Server, stopped on exit (for module-scoped fixtures)."""
    srv = Server(env, log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
