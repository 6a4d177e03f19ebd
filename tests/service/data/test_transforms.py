"""MAE train/eval transforms written with PIL + torch."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.data_throughput import photo_like_jpeg
from service.data import IMAGENET_MEAN, IMAGENET_STD
from service.data.transforms import (
    dct_scale,
    eval_transform,
    hwc_pixels,
    normalize_batch,
    resized_crop,
    stack_pixels,
    to_chw,
    train_transform,
)
from tests.service.data.conftest import image_bytes


def solid(color: tuple[int, int, int], size=(50, 40), mode="RGB") -> Image.Image:
    return Image.new("RGB", size, color).convert(mode)


def jpeg(img: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=95)
    return Image.open(io.BytesIO(buffer.getvalue()))


def left_right(size=(64, 48)) -> Image.Image:
    """Black left half, white right half."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, size[0] // 2:] = 255
    return Image.fromarray(pixels)


def test_outputs_are_normalised_float_tensors_of_the_requested_size():
    color = (200, 100, 50)
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(color, IMAGENET_MEAN, IMAGENET_STD)])
    for transform in (train_transform(24), eval_transform(24)):
        out = transform(solid(color))
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
        torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-2, rtol=0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_any_image_mode_becomes_three_channels(mode):
    assert train_transform(16)(solid((10, 20, 30), mode=mode)).shape == (3, 16, 16)
    assert eval_transform(16)(solid((10, 20, 30), mode=mode)).shape == (3, 16, 16)


@pytest.mark.parametrize("size", [(300, 40), (40, 300), (7, 9), (1000, 1000)])
def test_crop_boxes_stay_inside_the_image_and_respect_min_scale(size):
    transform = train_transform(32, min_scale=0.2)
    rng = random.Random(0)
    for _ in range(200):
        left, top, w, h = transform.crop_box(*size, rng)
        assert 0 <= left and 0 <= top and left + w <= size[0] and top + h <= size[1]
        assert w >= 1 and h >= 1
    square = train_transform(32, min_scale=0.2)
    areas = [w * h / 1e6 for _, _, w, h in (square.crop_box(1000, 1000, rng) for _ in range(500))]
    assert min(areas) >= 0.19 and max(areas) <= 1.0 and max(areas) > 0.8


def test_same_rng_same_augmentation_and_flip_happens():
    transform = train_transform(32, min_scale=1.0)
    img = left_right((64, 64))
    a = transform(img, random.Random(5))
    assert torch.equal(a, transform(img, random.Random(5)))
    # min_scale=1 on a square image crops (almost) everything; the flip decides which side is dark.
    dark_left = [transform(img, random.Random(s))[:, :, :8].mean() < 0 for s in range(40)]
    assert 5 < sum(dark_left) < 35
    no_flip = train_transform(32, min_scale=1.0, hflip=False)
    assert all(no_flip(img, random.Random(s))[:, :, :8].mean() < 0 for s in range(20))


def test_eval_is_a_deterministic_center_crop():
    transform = eval_transform(32)
    assert transform.resize_to == 36
    img = left_right((80, 40))
    out = transform(img)
    assert torch.equal(out, transform(img))
    # The center crop straddles the edge: the left part dark, the right part bright.
    assert out[:, :, :10].mean() < 0 < out[:, :, -10:].mean()


def decoded(data: bytes) -> Image.Image:
    """Fully decoded already, so no reduced-scale decoding can happen."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_jpegs_decode_at_the_smallest_dct_scale_that_keeps_the_output_size():
    data = photo_like_jpeg(np.random.default_rng(0), 2000, 1500)
    for box, size, scale in [((1000, 800), 64, 8), ((1000, 800), 200, 4), ((1000, 800), 400, 2),
                             ((1000, 800), 401, 1), ((300, 2000), 100, 2)]:
        img = Image.open(io.BytesIO(data))
        assert dct_scale(img, *box, size) == scale
        assert img.size == (-(-2000 // scale), -(-1500 // scale))
    png = Image.open(io.BytesIO(image_bytes(0, (2000, 1500), "PNG")))
    assert dct_scale(png, 1000, 800, 64) == 1 and png.size == (2000, 1500)


def test_reduced_scale_decoding_keeps_the_crop_and_stays_close_to_full_decoding():
    # Tolerance: per image, mean |difference| under 3 levels of 255 (1.5 measured on these
    # photo-like images; single pixels at sharp edges differ more). A box in the wrong place
    # (not divided by the scale, or shifted by a few pixels) differs by tens of levels.
    data = photo_like_jpeg(np.random.default_rng(1), 2000, 1500)
    for transform in (train_transform(64), train_transform(224), train_transform(448)):
        for seed in range(12):
            reduced = transform.geometry(Image.open(io.BytesIO(data)), random.Random(seed))
            full = transform.geometry(decoded(data), random.Random(seed))
            assert (reduced.int() - full.int()).abs().float().mean() < 3
    evaluate = eval_transform(64)
    assert (evaluate.geometry(Image.open(io.BytesIO(data))).int()
            - evaluate.geometry(decoded(data)).int()).abs().float().mean() < 3


def test_torch_crop_and_resize_match_pils():
    # The torch ops crop full-size decodes on the CPU and GPU-decoded batches alike.
    img = decoded(photo_like_jpeg(np.random.default_rng(2), 500, 375))
    transform = train_transform(224)
    rng = random.Random(0)
    for _ in range(30):
        left, top, w, h = transform.crop_box(*img.size, rng)
        ours = resized_crop(hwc_pixels(img).permute(2, 0, 1), (left, top, w, h), 224)
        pil = to_chw(img.resize((224, 224), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)))
        difference = (ours.int() - pil.int()).abs()
        assert ours.dtype == torch.uint8 and ours.shape == (3, 224, 224)
        assert difference.max() <= 3 and difference.float().mean() < 0.1
    flipped = resized_crop(hwc_pixels(img).permute(2, 0, 1), (10, 20, 300, 200), 64, flip=True)
    assert torch.equal(flipped, resized_crop(hwc_pixels(img).permute(2, 0, 1), (10, 20, 300, 200), 64).flip(-1))


def test_batch_normalisation_matches_per_image():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)) for _ in range(4)]
    pixels = stack_pixels(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, 8, 6)
    batch = normalize_batch(pixels)
    assert batch.dtype == torch.float32 and batch.shape == (4, 3, 8, 6) and batch.is_contiguous()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i, img in enumerate(images):
        ref = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - mean) / std
        torch.testing.assert_close(batch[i], ref)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="img_size"):
        train_transform(bad)
    with pytest.raises(ValueError, match="img_size"):
        eval_transform(bad)
