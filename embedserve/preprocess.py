"""The one implementation of decoding and preprocessing for inference (numpy and Pillow only).

A decoded image becomes a uint8 RGB HWC array of the model's input size: decode, apply the
EXIF orientation, convert any mode to RGB (alpha composited on white), resize the shorter side,
centre-crop. Training's evaluation calls the same functions, so the embeddings computed during
training are those the server returns for the same file.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageDecodeError(ValueError):
    """The input is not an image that can be decoded (the message says why)."""


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes the model's input.

    The shorter side is resized to `resize`, then the centre `crop_height` x `crop_width` is cut.
    """

    resize: int
    crop_height: int
    crop_width: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} not in {sorted(INTERPOLATIONS)}"
            )
        if min(self.resize, self.crop_height, self.crop_width) <= 0:
            raise ValueError("resize and crop sizes must be positive")
        if self.resize < min(self.crop_height, self.crop_width):
            raise ValueError(
                f"resize {self.resize} is smaller than the crop {self.crop_height}x{self.crop_width}"
            )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha is composited on white, 16-bit and float scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            hi = max(float(arr.max(initial=0)), 1.0) if arr.max(initial=0) > 1 else 1.0
        arr8 = np.clip(np.rint(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")  # 2-D uint8 -> mode L
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode(data: bytes | str | os.PathLike, target_min_side: int | None = None) -> Image.Image:
    """Decode bytes or a file into an RGB image with the EXIF orientation applied.

    With `target_min_side`, a JPEG is decoded at a reduced scale (Pillow's `draft`) as long as
    its shorter side stays at least that large: a large photo costs a fraction of a full decode.
    """
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) == 0:
                raise ImageDecodeError("empty file (0 bytes)")
            img = Image.open(io.BytesIO(data))
        else:
            img = Image.open(data)
        if target_min_side is not None and img.format == "JPEG":
            w, h = img.size
            # draft keeps both sides >= the requested size; ask so the shorter side stays >= target
            scale = target_min_side / min(w, h)
            img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        img.load()
        img = ImageOps.exif_transpose(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's ways of saying "not an image"
        raise ImageDecodeError(f"cannot decode image: {e}") from e
    return to_rgb(img)


def resize_center_crop(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Resize the shorter side to `pre.resize`, centre-crop; returns uint8 HxWx3."""
    w, h = img.size
    scale = pre.resize / min(w, h)
    new_w, new_h = max(pre.crop_width, round(w * scale)), max(pre.crop_height, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), INTERPOLATIONS[pre.interpolation])
    left, top = (new_w - pre.crop_width) // 2, (new_h - pre.crop_height) // 2
    img = img.crop((left, top, left + pre.crop_width, top + pre.crop_height))
    return np.array(img, dtype=np.uint8)  # a writable copy, owned by the caller


def preprocess(
    data: bytes | str | os.PathLike | Image.Image | np.ndarray, pre: Preprocess
) -> np.ndarray:
    """One image (bytes, path, PIL image or uint8 HWC array) -> uint8 HxWx3 model input."""
    if isinstance(data, np.ndarray):
        img = to_rgb(Image.fromarray(data))
    elif isinstance(data, Image.Image):
        img = to_rgb(ImageOps.exif_transpose(data))
    else:
        img = decode(data, target_min_side=pre.resize)
    return resize_center_crop(img, pre)


def preprocess_batch(items, pre: Preprocess) -> np.ndarray:
    """A list of images -> uint8 NHWC batch."""
    return (
        np.stack([preprocess(x, pre) for x in items])
        if items
        else np.zeros((0, pre.crop_height, pre.crop_width, 3), np.uint8)
    )
