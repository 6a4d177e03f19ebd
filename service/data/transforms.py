"""MAE/ConvMAE image transforms with PIL and torch (no torchvision).

Each transform has two halves: ``geometry(img, rng)`` does the PIL work per image (decode,
crop, resize, flip) and returns an ``img_size`` RGB image; normalisation is done on a whole
uint8 batch at once by :func:`to_normalized_batch`, so no per-image float work is done in
Python. Calling a transform does both for one image.

JPEGs are decoded at a reduced scale (libjpeg's DCT scaling via ``Image.draft``) when the
region needed is at least twice the output size, which makes large photos cheap to decode
without changing which region is used.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eval resizes the short side to img_size / EVAL_CROP_FRACTION, then center-crops img_size
# (256 -> 224 as in MAE's evaluation).
EVAL_CROP_FRACTION = 0.875

_BICUBIC = Image.Resampling.BICUBIC
_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
_INV_STD_255 = 1.0 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)
_RATIO = (3 / 4, 4 / 3)


def to_normalized_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size RGB images -> FloatTensor (N, 3, H, W) normalised with ImageNet mean/std."""
    width, height = images[0].size
    # Channels are moved first while still uint8 (a quarter of the bytes of float), so the
    # float conversion and normalisation below run over contiguous memory.
    pixels = np.empty((len(images), 3, height, width), dtype=np.uint8)
    for i, img in enumerate(images):
        pixels[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(pixels).float().sub_(_MEAN_255).mul_(_INV_STD_255)


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _draft(img: Image.Image, needed_width: float, needed_height: float) -> tuple[float, float]:
    """Lets a not-yet-decoded JPEG decode at the smallest scale that still covers the needed
    size; returns the factors by which coordinates shrank."""
    if img.format != "JPEG":
        return 1.0, 1.0
    width, height = img.size
    img.draft("RGB", (math.ceil(needed_width), math.ceil(needed_height)))
    return img.size[0] / width, img.size[1] / height


class ImageTooLarge(ValueError):
    """An image whose header announces more pixels than allowed; it is not decoded."""


def check_pixels(img: Image.Image, max_pixels: int) -> None:
    """Raises ImageTooLarge unless ``img`` (opened, not yet decoded: PIL reads only the header
    on open) has at most ``max_pixels`` pixels, so a huge image is refused before its decode
    allocates width x height x channels bytes."""
    width, height = img.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} is {width * height} pixels, over data.max_image_pixels={max_pixels}; "
                            "not decoded")


def _check_size(img_size: int) -> None:
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size={img_size!r} is not allowed: a positive int")


class TrainTransform:
    """RandomResizedCrop(scale=(min_scale, 1), ratio=(3/4, 4/3), bicubic) + horizontal flip,
    as torchvision's, then ImageNet normalisation."""

    def __init__(self, img_size: int, min_scale: float = 0.2, hflip: bool = True) -> None:
        _check_size(img_size)
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale={min_scale!r} is not allowed: 0 < min_scale <= 1")
        self.img_size, self.min_scale, self.hflip = img_size, min_scale, hflip

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(left, top, crop width, crop height), sampled as torchvision's RandomResizedCrop."""
        area = width * height
        log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.min_scale, 1.0)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, width - w), rng.randint(0, height - h), w, h
        # Fallback, as torchvision: the whole image, cut to the nearest allowed aspect ratio.
        in_ratio = width / height
        if in_ratio < _RATIO[0]:
            w, h = width, round(width / _RATIO[0])
        elif in_ratio > _RATIO[1]:
            w, h = round(height * _RATIO[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def geometry(self, img: Image.Image, rng: random.Random | None = None) -> Image.Image:
        rng = rng or random.Random()
        left, top, w, h = self.crop_box(*img.size, rng)
        flip = self.hflip and rng.random() < 0.5
        reduce = min(w, h) / self.img_size
        fx, fy = _draft(img, img.size[0] / reduce, img.size[1] / reduce) if reduce >= 2 else (1, 1)
        box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
        out = _rgb(img).resize((self.img_size, self.img_size), _BICUBIC, box=box)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return to_normalized_batch([self.geometry(img, rng)])[0]


class EvalTransform:
    """Resize the short side to img_size / 0.875 (bicubic), center-crop img_size, normalise."""

    def __init__(self, img_size: int) -> None:
        _check_size(img_size)
        self.img_size = img_size
        self.resize_to = int(img_size / EVAL_CROP_FRACTION)

    def geometry(self, img: Image.Image, rng: random.Random | None = None) -> Image.Image:
        width, height = img.size
        short = min(width, height)
        # Size after resizing, truncated like torchvision's Resize(int).
        rw = self.resize_to if width == short else int(self.resize_to * width / short)
        rh = self.resize_to if height == short else int(self.resize_to * height / short)
        left = int(round((rw - self.img_size) / 2.0))
        top = int(round((rh - self.img_size) / 2.0))
        sx, sy = width / rw, height / rh
        fx, fy = _draft(img, rw, rh) if short >= 2 * self.resize_to else (1, 1)
        box = (left * sx * fx, top * sy * fy, (left + self.img_size) * sx * fx,
               (top + self.img_size) * sy * fy)
        return _rgb(img).resize((self.img_size, self.img_size), _BICUBIC, box=box)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return to_normalized_batch([self.geometry(img)])[0]


def train_transform(img_size: int, min_scale: float = 0.2, hflip: bool = True) -> TrainTransform:
    """PIL.Image -> FloatTensor (3, img_size, img_size): MAE pretraining augmentation."""
    return TrainTransform(img_size, min_scale, hflip)


def eval_transform(img_size: int) -> EvalTransform:
    """PIL.Image -> FloatTensor (3, img_size, img_size): resize, center crop, normalise."""
    return EvalTransform(img_size)
