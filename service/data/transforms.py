"""MAE/ConvMAE image transforms with PIL and torch (no torchvision).

Each transform has two halves: ``geometry(img, rng)`` does the work per image (decode, crop,
resize, flip) and returns an ``img_size`` RGB image as a uint8 tensor (3, H, W);
normalisation is done on a whole uint8 batch at once by :func:`normalize_batch`, on the device
that trains (the loader's batches stay uint8 until then). Calling a transform does both for one image.

Decoding only what the crop needs: the training crop box is drawn from the image size (PIL
reads only the header on open), before any pixel is decoded. When the box's shorter side is
at least ``s`` times the output size (s = 2, 4 or 8), a JPEG is decoded at 1/s scale by
libjpeg's DCT scaling (``Image.draft``), which still leaves at least ``img_size`` decoded
pixels across the box in both directions, so the resize never enlarges. What changes
numerically: the 1/s-scale IDCT keeps only each block's lowest frequencies, close to an
s x s average of the full decode, and the bicubic resize then starts from those (mean
difference to the full decode about 1.5 levels of 255 on photos, tested under 3). The box, the
flip and the distribution of both are unchanged.

At full scale JPEGs are decoded by libjpeg-turbo directly (``service.data.jpeg``: PIL's pixels,
faster), and the crop and bicubic (antialiased) resize run as torch ops on the uint8 pixels
(:func:`resized_crop`, ~4x faster than PIL's resize on one core); they match PIL's resize to
within 3 levels of 255, and the same function crops GPU-decoded batches.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate

from service.data.jpeg import decode_jpeg_rgb, encoded_jpeg

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eval resizes the short side to img_size / EVAL_CROP_FRACTION, then center-crops img_size
# (256 -> 224 as in MAE's evaluation).
EVAL_CROP_FRACTION = 0.875
# libjpeg's DCT scaling factors PIL's draft can ask for, largest first.
DCT_SCALES = (8, 4, 2)

_BICUBIC = Image.Resampling.BICUBIC
_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
_INV_STD_255 = 1.0 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)
_RATIO = (3 / 4, 4 / 3)


def normalize_batch(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) RGB on any device -> float32 (N, 3, H, W) ImageNet-normalised."""
    mean = _MEAN_255.to(pixels.device)
    inv_std = _INV_STD_255.to(pixels.device)
    return pixels.float().sub_(mean).mul_(inv_std)


def stack_pixels(images: Sequence[torch.Tensor | Image.Image]) -> torch.Tensor:
    """Same-size RGB images (uint8 (3, H, W) tensors or PIL images, on one device) -> uint8
    (N, 3, H, W). In a DataLoader worker the batch is made in shared memory, as the transfer
    to the main process needs (default_collate does that). Batches stay uint8 until they
    reach the device that trains on them (:func:`normalize_batch` there): a quarter of the
    bytes through shared memory, pinning and the host-to-device copy, and no float work on
    the loader's cores (measured: normalising into fresh float memory cost a 2-core box
    0.5-0.9 ms per 224 image, about as much as the decode)."""
    pixels = [to_chw(img) if isinstance(img, Image.Image) else img for img in images]
    if pixels[0].device.type != "cpu":
        return torch.stack(pixels)
    return default_collate(pixels)


def hwc_pixels(img: Image.Image) -> torch.Tensor:
    """A decoded image as uint8 (H, W, 3) RGB, read-only: never write into it."""
    array = np.asarray(_rgb(img), dtype=np.uint8)
    with warnings.catch_warnings():
        # PIL hands out a read-only buffer; everything done with it here makes new tensors.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def full_size_pixels(img: Image.Image) -> torch.Tensor:
    """An opened, not drafted image decoded at full size as uint8 (H, W, 3) RGB, read-only:
    JPEGs straight through libjpeg-turbo (the same pixels as PIL's, faster), others by PIL."""
    encoded = encoded_jpeg(img)
    if encoded is not None:
        with encoded:
            pixels = decode_jpeg_rgb(encoded)
        if pixels is not None:
            return pixels
    return hwc_pixels(img)


def to_chw(img: Image.Image) -> torch.Tensor:
    """A PIL image as a new uint8 (3, H, W) RGB tensor."""
    return hwc_pixels(img).permute(2, 0, 1).contiguous()


def resized_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: int,
                 flip: bool = False) -> torch.Tensor:
    """uint8 (3, H, W) on any device (any strides) -> uint8 (3, size, size): the
    ``(left, top, width, height)`` region resized with antialiased bicubic, as PIL's
    ``resize(box=...)`` (within 3 levels of 255), then mirrored left-right if ``flip``."""
    left, top, width, height = box
    region = image[:, top:top + height, left:left + width].unsqueeze(0)  # (1, 3, h, w)
    if image.device.type == "cpu":
        # torch's CPU kernel takes uint8 directly (vectorised for channels-last, which is
        # the layout of PIL's pixels seen as (3, H, W)).
        out = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True)
    else:  # CUDA's antialiased kernels take floating point only
        out = F.interpolate(region.float(), size=(size, size), mode="bicubic", antialias=True)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    out = out[0]
    return out.flip(-1) if flip else out


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def dct_scale(img: Image.Image, box_width: float, box_height: float, img_size: int) -> int:
    """Asks libjpeg (through ``Image.draft``) to decode a not-yet-decoded JPEG at the smallest
    scale 1/s that leaves at least ``img_size`` pixels across a box of ``box_width`` x
    ``box_height`` source pixels; returns s (1: full size, or not a JPEG)."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return 1
    wanted = next((s for s in DCT_SCALES if min(box_width, box_height) >= s * img_size), 1)
    if wanted == 1:
        return 1
    width, height = img.size
    # PIL picks the largest s in (8, 4, 2, 1) with s <= size // requested size in both axes;
    # requesting size // s makes that exactly ``wanted``.
    drafted = img.draft(img.mode, (width // wanted, height // wanted))
    if drafted is None:  # not a single-tile JPEG: decoded at full size
        return 1
    _, (_, _, scaled_width, _) = drafted
    return round(width / scaled_width)


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

    def draw(self, width: int, height: int,
             rng: random.Random) -> tuple[tuple[int, int, int, int], bool]:
        """The crop box and flip of one image, in the order every decode path draws them."""
        box = self.crop_box(width, height, rng)
        return box, self.hflip and rng.random() < 0.5

    def geometry(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """An opened (not yet decoded) image -> uint8 (3, img_size, img_size) RGB."""
        (left, top, w, h), flip = self.draw(*img.size, rng or random.Random())
        scale = dct_scale(img, w, h, self.img_size)
        if scale == 1:
            pixels = full_size_pixels(img).permute(2, 0, 1)  # (3, H, W) view
            return resized_crop(pixels, (left, top, w, h), self.img_size, flip)
        # Decoded at 1/scale: the box has fractional edges in decoded pixels, which PIL's
        # resize takes as they are (the crop is not moved to the coarser grid).
        box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        out = _rgb(img).resize((self.img_size, self.img_size), _BICUBIC, box=box)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_chw(out)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return normalize_batch(self.geometry(img, rng).unsqueeze(0))[0]


class EvalTransform:
    """Resize the short side to img_size / 0.875 (bicubic), center-crop img_size, normalise."""

    def __init__(self, img_size: int) -> None:
        _check_size(img_size)
        self.img_size = img_size
        self.resize_to = int(img_size / EVAL_CROP_FRACTION)

    def geometry(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """An opened (not yet decoded) image -> uint8 (3, img_size, img_size) RGB."""
        width, height = img.size
        short = min(width, height)
        # Size after resizing, truncated like torchvision's Resize(int).
        rw = self.resize_to if width == short else int(self.resize_to * width / short)
        rh = self.resize_to if height == short else int(self.resize_to * height / short)
        left = int(round((rw - self.img_size) / 2.0))
        top = int(round((rh - self.img_size) / 2.0))
        # In source pixels; then in decoded pixels, exactly, whatever DCT scale is used.
        sx, sy = width / rw, height / rh
        scale = dct_scale(img, self.img_size * sx, self.img_size * sy, self.img_size)
        box = (left * sx / scale, top * sy / scale, (left + self.img_size) * sx / scale,
               (top + self.img_size) * sy / scale)
        return to_chw(_rgb(img).resize((self.img_size, self.img_size), _BICUBIC, box=box))

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return normalize_batch(self.geometry(img).unsqueeze(0))[0]


def train_transform(img_size: int, min_scale: float = 0.2, hflip: bool = True) -> TrainTransform:
    """PIL.Image -> FloatTensor (3, img_size, img_size): MAE pretraining augmentation."""
    return TrainTransform(img_size, min_scale, hflip)


def eval_transform(img_size: int) -> EvalTransform:
    """PIL.Image -> FloatTensor (3, img_size, img_size): resize, center crop, normalise."""
    return EvalTransform(img_size)
