"""Full-size JPEG decoding through libjpeg-turbo directly: PIL's pixels exactly, PIL for the rest."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from benchmarks.data_throughput import photo_like_jpeg
from service.data.jpeg import CorruptJpeg, decode_jpeg_rgb, encoded_jpeg
from service.data.transforms import full_size_pixels


def reencoded(data: bytes, mode: str = "RGB", **save) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert(mode).save(buffer, format="JPEG", **save)
    return buffer.getvalue()


PHOTO = photo_like_jpeg(np.random.default_rng(3), 123, 77)  # odd sizes: partial MCUs
VARIANTS = {
    "baseline 4:2:0": PHOTO,
    "progressive": reencoded(PHOTO, progressive=True, quality=80),
    "4:4:4": reencoded(PHOTO, subsampling=0, quality=95),
    "4:2:2": reencoded(PHOTO, subsampling=1, quality=90),
    "greyscale": reencoded(PHOTO, "L"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_pixels_are_pils_exactly(name):
    data = VARIANTS[name]
    img = Image.open(io.BytesIO(data))
    assert encoded_jpeg(img) is not None  # this one goes the direct way
    pixels = full_size_pixels(img)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert pixels.shape == (77, 123, 3)
    np.testing.assert_array_equal(pixels.numpy(), reference)


def test_other_images_go_to_pil():
    png = io.BytesIO()
    Image.open(io.BytesIO(PHOTO)).save(png, format="PNG")
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(PHOTO)).convert("CMYK").save(cmyk, format="JPEG")
    for data in (png.getvalue(), cmyk.getvalue()):
        img = Image.open(io.BytesIO(data))
        assert encoded_jpeg(img) is None
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(full_size_pixels(img).numpy(), reference)
    decoded = Image.open(io.BytesIO(PHOTO))
    decoded.load()
    assert encoded_jpeg(decoded) is None  # its bytes are no longer what it shows


def test_a_truncated_jpeg_fails_and_is_not_handed_to_pil():
    truncated = PHOTO[: len(PHOTO) // 2]
    with pytest.raises(CorruptJpeg, match="truncated"):  # PIL would fill the rest with grey
        decode_jpeg_rgb(truncated)
    with pytest.raises(CorruptJpeg):
        full_size_pixels(Image.open(io.BytesIO(truncated)))
    garbage = PHOTO[:200] + bytes(range(256)) * 4  # not a truncation: libjpeg-turbo refuses, PIL decides
    assert decode_jpeg_rgb(garbage) is None
