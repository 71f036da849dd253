"""The install extras and the no-torch rule of the serving package."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serving_package_never_imports_torch():
    code = (
        "import sys, pkgutil, importlib, embedserve\n"
        "for m in pkgutil.walk_packages(embedserve.__path__, 'embedserve.'):\n"
        "    if m.name != 'embedserve.service': importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_serve_extra_has_no_torch_and_train_adds_it():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    serve = " ".join(extras["serve"]).lower()
    assert "torch" not in serve
    for pkg in ("bentoml", "onnxruntime-gpu", "faiss-cpu", "pillow", "numpy"):
        assert pkg in serve
    train = " ".join(extras["train"]).lower()
    assert (
        "embedserve[serve]" in train
        and "torch>=2.14" in train
        and "torchvision>=0.29" in train
        and "onnx" in train
    )


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert (
        "make test" in (ROOT / "README.md").read_text()
        and "make serve" in (ROOT / "README.md").read_text()
    )
