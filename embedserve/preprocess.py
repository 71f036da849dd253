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


class UnsupportedImageFormat(ImageDecodeError):
    """The input is an image, but in a format this service does not decode (HEIC, SVG, EPS...)."""


class ImageTooLarge(ImageDecodeError):
    """The image has more pixels than allowed (a decompression bomb, or just too big)."""


# The formats decoded, by Pillow's names. Everything else is refused before any pixel is decoded:
# each extra decoder is attack surface (EPS runs Ghostscript) and none is needed for photos.
# (Multi-picture JPEGs from cameras open through JPEG and come back as format "MPO".)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Signatures of the allowed formats: a file that starts like one but does not open is corrupt.
_ALLOWED_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

# Formats Pillow cannot open at all but that clients do send; named in the error message.
_KNOWN_SIGNATURES = (
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG/XML"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


def _sniff_format(data: bytes) -> str | None:
    """Name of a known non-decodable image format from its first bytes, or None."""
    head = data[:64]
    if head[4:8] == b"ftyp":  # ISO base media: HEIC/HEIF/AVIF photos from phones
        brand = head[8:12].decode("ascii", "replace").strip()
        return "AVIF" if brand.startswith("avi") else f"HEIF ({brand})"
    for signature, name in _KNOWN_SIGNATURES:
        if head.lstrip().startswith(signature):
            return name
    return None


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


def decode(
    data: bytes | str | os.PathLike,
    target_min_side: int | None = None,
    max_pixels: int | None = None,
    formats: tuple[str, ...] = ALLOWED_FORMATS,
) -> Image.Image:
    """Decode bytes or a file into an RGB image with the EXIF orientation applied.

    With `target_min_side`, a JPEG is decoded at a reduced scale (Pillow's `draft`) as long as
    its shorter side stays at least that large: a large photo costs a fraction of a full decode.
    `max_pixels` refuses (ImageTooLarge) an image whose header declares more pixels, before
    anything is decoded. Only `formats` are decoded (UnsupportedImageFormat otherwise).
    Raises ImageDecodeError for empty, truncated or corrupt files and for non-images.
    """
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) == 0:
                raise ImageDecodeError("empty file (0 bytes)")
            fp = io.BytesIO(data)
        else:
            if os.path.getsize(data) == 0:
                raise ImageDecodeError("empty file (0 bytes)")
            fp = open(data, "rb")  # noqa: SIM115 (closed in the finally below)
        try:
            Image.init()  # registers every plugin (MPO among them); a no-op after the first call
            try:
                img = Image.open(fp, formats=formats)
            except Image.UnidentifiedImageError:
                raise _unidentified(fp, formats) from None
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageTooLarge(
                    f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of "
                    f"{max_pixels / 1e6:.1f} megapixels"
                )
            if target_min_side is not None and img.format in ("JPEG", "MPO"):
                # draft keeps both sides >= the requested size; ask so the shorter side stays >= target
                scale = target_min_side / min(w, h)
                img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
        finally:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                fp.close()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image too large: {e}") from e
    except OSError as e:
        if "truncated" in str(e):
            raise ImageDecodeError(f"truncated or corrupt image: {e}") from e
        raise ImageDecodeError(f"cannot decode image: {e}") from e
    except (SyntaxError, ValueError, EOFError) as e:  # Pillow's other ways of saying "corrupt"
        raise ImageDecodeError(f"cannot decode image: {e}") from e


def _unidentified(fp, formats: tuple[str, ...]) -> ImageDecodeError:
    """The error for a file that none of `formats` recognise: an image in another format
    (415-worthy) or not an image at all."""
    fp.seek(0)
    head = fp.read(64)
    for signature, allowed in _ALLOWED_SIGNATURES:
        if head.startswith(signature):
            return ImageDecodeError(f"corrupt or truncated {allowed} file")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ImageDecodeError("corrupt or truncated WEBP file")
    name = _sniff_format(head)
    if name is None:
        fp.seek(0)
        try:  # a format Pillow knows but we do not decode: reads the header only
            with Image.open(fp) as other:
                name = other.format
        except Exception:  # noqa: BLE001 (any failure means "not an image we know")
            name = None
    if name is not None:
        return UnsupportedImageFormat(
            f"unsupported image format {name}; send one of {', '.join(formats)}"
        )
    return ImageDecodeError(
        f"not an image (starts with {head[:8]!r}); send one of {', '.join(formats)}"
    )


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
    data: bytes | str | os.PathLike | Image.Image | np.ndarray,
    pre: Preprocess,
    max_pixels: int | None = None,
) -> np.ndarray:
    """One image (bytes, path, PIL image or uint8 HWC array) -> uint8 HxWx3 model input.
    `max_pixels` bounds what a file may declare (see `decode`)."""
    if isinstance(data, np.ndarray):
        img = to_rgb(Image.fromarray(data))
    elif isinstance(data, Image.Image):
        img = to_rgb(ImageOps.exif_transpose(data))
    else:
        img = decode(data, target_min_side=pre.resize, max_pixels=max_pixels)
    return resize_center_crop(img, pre)


def preprocess_batch(items, pre: Preprocess) -> np.ndarray:
    """A list of images -> uint8 NHWC batch."""
    return (
        np.stack([preprocess(x, pre) for x in items])
        if items
        else np.zeros((0, pre.crop_height, pre.crop_width, 3), np.uint8)
    )
