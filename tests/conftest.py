"""Shared fixtures: procedurally generated images (no dataset needed) and the real-data paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.common import DATASETS

# The image generator lives with the benchmarks, which must not import tests/; re-exported for
# the tests that import it from here.
from benchmarks.synthetic import make_pattern, write_image_folder

__all__ = ["make_pattern", "write_image_folder"]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """4 classes x 24 PNG images of 40x40 with train/ and val/ splits."""
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root / "train", per_class=24, seed=1)
    write_image_folder(root / "val", per_class=8, seed=2)
    return root


@pytest.fixture(scope="session")
def imagenette() -> Path:
    path = DATASETS / "imagenette-160"
    if not path.is_dir():
        pytest.skip(f"real data not present: {path} (integration test)")
    return path
