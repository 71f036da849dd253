"""bentofile.yaml: the serve dependencies only, the default model included, and a Bento that
`bentoml build` makes and `bentoml serve` runs on its own."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

from embedserve.package import DEFAULT_FILE, MODELS_DIR, load_package
from tests.embedserve.server import Server

REPO = Path(__file__).resolve().parents[1]
BENTOML = Path(sys.executable).with_name("bentoml")


def bentofile() -> dict:
    return yaml.safe_load((REPO / "bentofile.yaml").read_text())


def test_bentofile_lists_exactly_the_serve_extra():
    serve = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["serve"]
    packages = bentofile()["python"]["packages"]
    assert sorted(packages) == sorted(serve)
    assert not any(
        p.lower().startswith(("torch", "torchvision", "onnx>", "onnx=")) for p in packages
    )


def test_bentofile_includes_the_default_model():
    include = bentofile()["include"]
    default = (MODELS_DIR / DEFAULT_FILE).read_text().strip()
    assert "models/DEFAULT" in include
    assert f"models/{default}/*" in include
    assert bentofile()["service"] == "embedserve.service:EmbedService"


@pytest.mark.slow
def test_bentoml_build_makes_a_bento_that_serves_on_its_own(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    build = subprocess.run(
        [str(BENTOML), "build", str(REPO), "--output", "tag"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    bentos = tmp_path / "home" / "bentos" / "embedserve"
    (bento,) = [d for d in bentos.iterdir() if d.is_dir() and d.name != "latest"]
    src = bento / "src"
    package = load_package()
    assert (src / "embedserve" / "service.py").is_file()
    assert (src / "models" / DEFAULT_FILE).read_text().strip() == package.name
    for variant in package.variants:
        shipped = src / "models" / package.name / package.file(variant).name
        assert shipped.stat().st_size == package.file(variant).stat().st_size
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().lower()
    assert "onnxruntime" in requirements and "torch" not in requirements
    # the image `bentoml containerize` would build (no container engine runs here): Python
    # 3.11 on the CUDA + cuDNN runtime that onnxruntime-gpu's CUDA provider needs
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04" in dockerfile
    assert "3.11" in dockerfile
    openapi = (bento / "apis" / "openapi.yaml").read_text()
    assert "/embed" in openapi and "/search" in openapi

    # Serve the Bento by its tag, from elsewhere than the repository. PYTHONPATH puts its
    # source ahead of this checkout's editable install, as in a container that has only it.
    srv = Server(
        {},
        tmp_path / "bento.log",
        target="embedserve:latest",
        cwd=tmp_path,
        extra_env={"BENTOML_HOME": str(tmp_path / "home"), "PYTHONPATH": str(src)},
    )
    try:
        srv.wait_ready()
        info = httpx.get(srv.url + "/info", timeout=10).json()
        assert Path(info["model"]["path"]).resolve().is_relative_to(bento.resolve())
        assert info["index"] is None
        search = httpx.post(
            srv.url + "/search", files=[("images", ("a.png", _png(), "image/png"))], timeout=30
        )
        assert search.status_code == 409
        assert "EMBEDSERVE_INDEX" in search.json()["error"]
        embed = httpx.post(
            srv.url + "/embed", files=[("images", ("a.png", _png(), "image/png"))], timeout=30
        )
        assert embed.status_code == 200 and embed.json()["dim"] == package.embedding_dim
    finally:
        srv.stop()


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 60)).save(buf, "PNG")
    return buf.getvalue()
