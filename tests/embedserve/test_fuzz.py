"""A bounded fuzz run of the HTTP API from its own OpenAPI page (schemathesis): no 5xx, only
documented status codes and content types, every answer matching its schema.

Not checked: that every schema-valid request is accepted and every schema-violating one refused
(schemathesis' positive/negative data checks). The schema cannot say what the server must check
itself: that a file is a decodable image, that `metadata` has one entry per image, or that too
many images are a 413 rather than a 400.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.embedserve.server import running
from tests.embedserve.test_security import index_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

SCHEMATHESIS = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "schemathesis"
KEY = "fuzz-key-3b7d1e0a9c2f4856"
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance"
)


@pytest.fixture(scope="module")
def server(index_dir, tmp_path_factory):  # noqa: F811
    env = {
        "EMBEDSERVE_API_KEY": KEY,
        "EMBEDSERVE_INDEX": str(index_dir),
        "EMBEDSERVE_MAX_IMAGES_PER_REQUEST": "4",
        "EMBEDSERVE_MAX_REQUEST_BYTES": str(1024 * 1024),
        "EMBEDSERVE_ACCESS_LOG": "false",
    }
    with running(env, tmp_path_factory.mktemp("log") / "server.log") as srv:
        yield srv


@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis is not installed (dev extra)")
@pytest.mark.parametrize(
    ("headers", "examples"),
    [([f"Authorization: Bearer {KEY}"], 50), ([], 10)],
    ids=["with-key", "without-key"],
)
def test_fuzzing_the_openapi_schema_finds_no_5xx_and_no_schema_violation(
    server, headers, examples, tmp_path
):
    command = [str(SCHEMATHESIS), "run", server.url + "/docs.json", "--checks", CHECKS]
    command += ["--max-examples", str(examples), "--generation-deterministic", "--workers", "1"]
    command += ["--request-timeout", "30", "--no-color"]
    for header in headers:
        command += ["-H", header]
    # in tmp_path: schemathesis keeps a .schemathesis/ folder in its working directory
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    generated = int(re.search(r"(\d+) generated", out).group(1))
    assert generated >= 8 * examples // 2, out[-3000:]  # every operation was exercised
    assert re.search(rf"{generated} passed", out), out[-3000:]
    print(f"schemathesis: {generated} cases, all passed")  # shown with pytest -s / -rP
