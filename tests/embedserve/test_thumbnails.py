"""embedserve.thumbnails: small JPEGs of any image mode, the aspect ratio kept, the EXIF
orientation applied, made from the same decode as the model's input (which stays identical)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from embedserve.preprocess import Preprocess, preprocess
from embedserve.thumbnails import make_thumbnail, preprocess_with_thumbnail

PRE = Preprocess(resize=64, crop_height=56, crop_width=56)


def encoded(image: Image.Image, kind: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, kind, **options)
    return buf.getvalue()


def opened(jpeg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.mode == "RGB"
    return image


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16"])
def test_any_mode_gives_an_rgb_jpeg_no_larger_than_max_side(mode):
    image = Image.new("RGB", (300, 150), (200, 40, 40)).convert(mode)
    thumb = opened(make_thumbnail(image, 64))
    assert thumb.size == (64, 32)


def test_a_small_image_keeps_its_size_and_the_callers_image_is_untouched():
    image = Image.new("RGB", (50, 30), "blue")
    assert opened(make_thumbnail(image, 128)).size == (50, 30)
    big = Image.new("RGB", (400, 200), "blue")
    make_thumbnail(big, 100)
    assert big.size == (400, 200)
    with pytest.raises(ValueError, match="max_side"):
        make_thumbnail(big, 0)


def test_the_model_input_is_exactly_preprocess_and_the_thumbnail_is_upright():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (240, 320, 3), np.uint8)
    pixels[:120] = 255  # a white top half, to see the orientation
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    data = encoded(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    x, jpeg = preprocess_with_thumbnail(data, PRE, 128, max_pixels=10**6)
    np.testing.assert_array_equal(x, preprocess(data, PRE, max_pixels=10**6))
    thumb = np.asarray(opened(jpeg))
    assert thumb.shape[:2] == (128, 96)  # portrait once rotated
    assert thumb[:, 70:].mean() > 240 and thumb[:, :26].mean() < 200  # the white half on the right
    assert preprocess_with_thumbnail(data, PRE, 0)[1] is None


def test_a_large_jpeg_is_decoded_once_at_a_reduced_scale_for_both():
    data = encoded(Image.new("RGB", (2000, 1000), "green"), "JPEG")
    x, jpeg = preprocess_with_thumbnail(data, PRE, 128)
    assert x.shape == (56, 56, 3) and opened(jpeg).size == (128, 64)
