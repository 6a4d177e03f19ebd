"""MAE train/eval transforms written with PIL + torch."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from service.data import IMAGENET_MEAN, IMAGENET_STD
from service.data.transforms import eval_transform, to_normalized_batch, train_transform


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


def test_jpeg_draft_decoding_matches_full_decoding_closely():
    pixels = np.zeros((1200, 1600, 3), np.uint8)
    pixels[:, :, 0] = np.linspace(0, 255, 1600, dtype=np.uint8)[None, :]
    pixels[:, :, 1] = np.linspace(0, 255, 1200, dtype=np.uint8)[:, None]
    big = Image.fromarray(pixels)
    transform = train_transform(32)
    drafted = transform(jpeg(big), random.Random(1))
    full = transform(jpeg(big).convert("RGB"), random.Random(1))  # converted: no draft possible
    assert drafted.shape == full.shape == (3, 32, 32)
    assert (drafted - full).abs().mean() < 0.05
    evaluated = eval_transform(32)
    assert (evaluated(jpeg(big)) - evaluated(jpeg(big).convert("RGB"))).abs().mean() < 0.05


def test_batch_normalisation_matches_per_image():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)) for _ in range(4)]
    batch = to_normalized_batch(images)
    assert batch.shape == (4, 3, 8, 6) and batch.is_contiguous()
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
