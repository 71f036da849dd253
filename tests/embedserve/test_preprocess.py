"""Decoding and preprocessing for inference: modes, EXIF orientation, resize and crop, errors."""

import io

import numpy as np
import pytest
from PIL import Image

from embedserve.preprocess import (
    ImageDecodeError,
    ImageTooLarge,
    Preprocess,
    UnsupportedImageFormat,
    decode,
    preprocess,
    preprocess_batch,
    to_rgb,
)

PRE = Preprocess(resize=32, crop_height=32, crop_width=32)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 100, (100, 100, 100)),
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("RGBA", (200, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white
        ("RGBA", (200, 0, 0, 255), (200, 0, 0)),
        ("LA", (0, 128), (128, 128, 128)),  # half-transparent black on white
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ],
)
def test_every_mode_becomes_rgb_with_alpha_on_white(mode, value, expected):
    out = to_rgb(Image.new(mode, (4, 4), value))
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out)[0, 0].astype(int) - np.array(expected)).max() <= 1


def test_palette_and_16_bit_images():
    p = Image.new("P", (4, 4))
    p.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    p.putpixel((0, 0), 1)
    assert tuple(np.asarray(to_rgb(p))[0, 0]) == (250, 10, 10)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert tuple(np.asarray(to_rgb(sixteen))[0, 0]) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode(encode(img, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 40)


def test_resize_shorter_side_then_centre_crop():
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 30:50] = 255  # a white band in the centre
    out = preprocess(
        encode(Image.fromarray(arr)), Preprocess(resize=20, crop_height=20, crop_width=20)
    )
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert out[:, 8:12].mean() > 200 and out[:, 0].mean() < 30
    assert out.flags.writeable


def test_bytes_path_pil_and_array_give_the_same_input(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(arr))
    (tmp_path / "x.png").write_bytes(data)
    outs = [preprocess(x, PRE) for x in (data, tmp_path / "x.png", Image.fromarray(arr), arr)]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    assert preprocess_batch([data, data], PRE).shape == (2, 32, 32, 3)


def test_large_jpeg_is_decoded_at_reduced_scale():
    big = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (1024, 1536, 3), dtype=np.uint8)
    )
    img = decode(encode(big, "JPEG"), target_min_side=128)
    assert min(img.size) >= 128 and img.size[0] < 1536  # draft chose a smaller scale


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"this is not an image", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "corrupt or truncated JPEG"),
    ],
    ids=["empty", "text", "truncated-jpeg"],
)
def test_bad_input_raises_a_named_error(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode(data)


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (4000, 3000)).save(buf, "PNG")  # 12 MP that compress to a few kB
    with pytest.raises(ImageTooLarge, match="4000x3000 = 12.0 megapixels, over the limit of 1.0"):
        decode(buf.getvalue(), max_pixels=1_000_000)
    assert decode(buf.getvalue(), max_pixels=20_000_000).size == (4000, 3000)


def test_a_half_jpeg_is_reported_as_truncated():
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode(data[: len(data) // 2])


@pytest.mark.parametrize(("fmt", "name"), [("PDF", "PDF"), ("ICO", "ICO"), ("PPM", "PPM")])
def test_a_format_outside_the_allowed_list_is_named(fmt, name):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, fmt)
    with pytest.raises(UnsupportedImageFormat, match=f"unsupported image format {name}"):
        decode(buf.getvalue())


def test_phone_heic_is_named_unsupported():
    with pytest.raises(UnsupportedImageFormat, match="HEIF"):
        decode(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100)


def test_an_empty_file_on_disk_is_named(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode(tmp_path / "e.jpg")
