"""Device choice without noise: `auto` tries the CUDA execution provider only where a GPU is
present (embedserve.package.gpu_present: a GPU device node, and CUDA_VISIBLE_DEVICES hiding
none), so ONNX Runtime's "Failed to create CUDAExecutionProvider" error never appears on a
CPU-only machine; `cuda` there fails with a clear PackageError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from embedserve import package as pkg
from embedserve.package import NO_GPU, Encoder, PackageError, gpu_present, load_package
from tests.conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[2]
no_gpu_here = pytest.mark.skipif(gpu_present(), reason="a GPU is present on this machine")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="device nodes are Linux's")
@pytest.mark.parametrize(
    ("nodes", "visible", "present"),
    [
        ([], None, False),
        (["nvidiactl", "nvidia-uvm", "nvidia-modeset"], None, False),  # a driver, no GPU
        (["nvidia0"], None, True),
        (["nvidia0", "nvidia1", "nvidiactl"], "1", True),
        (["dxg"], None, True),  # WSL 2
        (["nvhost-ctrl-gpu"], None, True),  # Jetson
        (["nvidia0"], "", False),
        (["nvidia0"], "-1", False),
        (["nvidia0"], " -1,0", False),
    ],
)
def test_a_gpu_is_present_with_a_device_node_that_cuda_visible_devices_does_not_hide(
    tmp_path, nodes, visible, present
):
    for name in nodes:
        (tmp_path / name).touch()
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert gpu_present(tmp_path, environ) is present


def test_without_dev_the_answer_is_to_try(tmp_path):
    assert gpu_present(tmp_path / "missing", {}) is True


@no_gpu_here
def test_auto_opens_only_cpu_sessions_where_no_gpu_is_present(monkeypatch):
    opened = []
    real = ort.InferenceSession

    def spy(path, options=None, providers=None, **kwargs):
        opened.append(list(providers or []))
        return real(path, options, providers=providers, **kwargs)

    monkeypatch.setattr(pkg.ort, "InferenceSession", spy)
    encoder = Encoder(load_package(), device="auto", intra_op_threads=1)
    assert encoder.providers == ["CPUExecutionProvider"] and not encoder.on_cuda
    assert opened == [["CPUExecutionProvider"]]  # CUDA was never tried
    assert pkg.cuda_session_starts(load_package()) is False
    assert opened == [["CPUExecutionProvider"]]


@no_gpu_here
def test_device_cuda_without_a_gpu_raises_a_clear_error():
    with pytest.raises(PackageError) as e:
        Encoder(load_package(), device="cuda", intra_op_threads=1)
    assert str(e.value) == NO_GPU
    assert "no GPU is visible here" in NO_GPU and "use device auto or cpu" in NO_GPU


@no_gpu_here
def test_opening_auto_in_a_fresh_process_prints_nothing_about_cuda():
    code = (
        "from embedserve.package import Encoder, load_package\n"
        "print(Encoder(load_package(), device='auto', intra_op_threads=1).providers)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['CPUExecutionProvider']"
    assert "CUDA" not in run.stderr and "cuDNN" not in run.stderr, run.stderr


@no_gpu_here
def test_the_command_line_on_auto_prints_nothing_about_cuda(tmp_path):
    folder = write_image_folder(tmp_path / "images", num_classes=2, per_class=2, size=32, seed=1)
    cli = [sys.executable, "-m", "embedserve.cli"]
    out = tmp_path / "index"
    build = subprocess.run(
        [*cli, "index", "build", "--images", str(folder), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    query = str(next(folder.rglob("*.png")))
    search = subprocess.run(
        [*cli, "search", "--index", str(out), query, "-k", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert search.returncode == 0, search.stderr
    for run in (build, search):
        assert "CUDA" not in run.stderr and "cuDNN" not in run.stderr, run.stderr
