"""Procedural data for benchmarks and tests that need no dataset.

Images whose class is visible: each class is stripes at its own angle and tint, with random
frequency, phase, brightness and noise (a network can learn them, and they compress like photos
rather than like noise). Vectors shaped like embeddings: `clustered_vectors`, L2-normalized points
around random centres, the search benchmarks' galleries.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image


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


def patterns(n: int, size: int = 160, num_classes: int = 10, seed: int = 0) -> list[np.ndarray]:
    """`n` patterns of `size` px, the classes taking turns."""
    rng = np.random.default_rng(seed)
    return [make_pattern(i % num_classes, num_classes, size, rng) for i in range(n)]


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


def jpegs(n: int, size: int = 160, quality: int = 80, seed: int = 0) -> list[bytes]:
    """The bytes of `n` patterns encoded as JPEG."""
    out = []
    for img in patterns(n, size, seed=seed):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def random_centres(n: int, dim: int, seed: int = 12345) -> np.ndarray:
    """n random unit vectors: the centres `clustered_vectors` scatters points around."""
    centres = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def clustered_vectors(
    n: int, dim: int, seed: int, centres: np.ndarray, chunk: int = 100_000
) -> np.ndarray:
    """n L2-normalized float32 vectors scattered around `centres` (cosine to their centre about
    0.7, so that IVF and HNSW see clustered data as they do with real images), built in chunks
    (10^6 x 512 in float64 would need 4 GB)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    noise = 1.0 / math.sqrt(dim)  # noise of norm ~1 around unit centres: cosine ~0.7
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, len(centres), m)]
        x += rng.standard_normal((m, dim), dtype=np.float32) * noise
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out
