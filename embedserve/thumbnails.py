"""Thumbnails: a small JPEG of each indexed image, stored in the index beside its vector.

They are made from the image decoded for the model, in the same pass (`preprocess_with_thumbnail`),
so adding an image decodes it once: in the server's decode pool (POST /index/add) and in the
command line's decoding threads (`embedserve index build` / `add`). The server serves them from
the index (GET /index/items/{id}/thumbnail) and never reads an image path from disk.

The decoded image is the one the model's preprocessing starts from: a large JPEG is decoded at a
reduced scale whose shorter side is still at least the model's resize (256 for the shipped
models), so a thumbnail larger than that is never upscaled past what was decoded. Size: the
`thumbnails` setting (EMBEDSERVE_THUMBNAILS, the longer side in pixels; 0 stores none).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from embedserve.config import DEFAULT_THUMBNAIL_SIZE as DEFAULT_SIZE
from embedserve.config import MAX_THUMBNAIL_SIZE as MAX_SIZE
from embedserve.preprocess import Preprocess, decode, resize_center_crop

__all__ = ["DEFAULT_SIZE", "MAX_SIZE", "make_thumbnail", "preprocess_with_thumbnail"]
QUALITY = 80  # JPEG quality: a 128-pixel thumbnail is 3-6 kB


def make_thumbnail(
    image: Image.Image, max_side: int = DEFAULT_SIZE, quality: int = QUALITY
) -> bytes:
    """A JPEG (RGB, baseline) of `image` whose longer side is at most `max_side` pixels, the
    aspect ratio kept; an image already that small is encoded at its own size."""
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, not {max_side}")
    small = image if image.mode == "RGB" else image.convert("RGB")
    if max(small.size) > max_side:
        small = small.copy()  # thumbnail() resizes in place: the caller's image is kept
        small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=2.0)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def preprocess_with_thumbnail(
    data: bytes | str | os.PathLike,
    pre: Preprocess,
    max_side: int,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, bytes | None]:
    """One decode, two results: the model input (exactly `preprocess(data, pre, max_pixels)`)
    and the thumbnail of the same decoded image (None when `max_side` is 0)."""
    image = decode(data, target_min_side=pre.resize, max_pixels=max_pixels)
    thumbnail = make_thumbnail(image, max_side) if max_side > 0 else None
    return resize_center_crop(image, pre), thumbnail
