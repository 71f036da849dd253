"""Shared fixtures: procedurally generated images (no dataset needed) and the real-data paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def make_pattern(label: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 HxWx3 image whose class is visible: stripes at a class-specific angle and tint,
    with random frequency, phase, brightness and noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = np.pi * label / num_classes
    freq = rng.uniform(3, 6)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    tint = np.array([np.cos(angle), np.sin(angle), 0.5]) * 0.35 + 0.5
    img = (0.5 + 0.4 * wave)[..., None] * tint[None, None, :] * rng.uniform(0.7, 1.3)
    img = img + rng.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_image_folder(
    root: Path, num_classes: int = 4, per_class: int = 16, size: int = 40, seed: int = 0
) -> Path:
    """A class-per-folder directory of PNG patterns."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(make_pattern(c, num_classes, size, rng)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """4 classes x 24 PNG images of 40x40 with train/ and val/ splits."""
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root / "train", per_class=24, seed=1)
    write_image_folder(root / "val", per_class=8, seed=2)
    return root


@pytest.fixture(scope="session")
def imagenette() -> Path:
    path = SHARED_DATASETS / "imagenette-160"
    if not path.is_dir():
        pytest.skip(f"real data not present: {path} (integration test)")
    return path
