"""Batched JPEG decoding on the GPU (nvJPEG through torchvision.io) with the training crop,
flip and normalisation done there too.

For CUDA training processes (``data.decode: gpu|auto``): DataLoader workers only read the
samples' bytes (CUDA cannot run in forked workers); the training process decodes each batch
on its GPU. The crop boxes and flips come from the same per-batch seed and are drawn in the
same order as on the CPU path (:class:`TrainTransform`'s ``crop_box``, then the flip), and
the crop/resize/flip is the same torch code (:func:`resized_crop`), so the geometry is the
CPU path's exactly; pixels differ only by decoder (nvJPEG's IDCT and chroma upsampling vs
libjpeg-turbo's, a few levels of 255) and because the GPU always decodes at full size.

Images nvJPEG cannot take (PNG, WebP, CMYK or otherwise unusual JPEGs, anything it fails on)
are decoded by the CPU path one by one, in the training process, and copied over.

torchvision is imported only here, when a GPU decoder is made; CPU machines do not need it.
"""

from __future__ import annotations

import io
import logging
import random
import warnings
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from service.config import DECODE_MODES
from service.data.errors import DataError
from service.data.transforms import (
    TrainTransform,
    check_pixels,
    hwc_pixels,
    resized_crop,
)

log = logging.getLogger(__name__)

# Decodes JPEG byte tensors to uint8 (3, H, W) RGB tensors on a device, all at once.
JpegDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def nvjpeg_decoder() -> JpegDecoder:
    """torchvision's batched GPU JPEG decode; ImportError when torchvision is missing."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


def pil_decoder() -> JpegDecoder:
    """The same contract with PIL on the CPU: what the GPU path's batch assembly is tested with
    on machines without CUDA."""

    def decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return [hwc_pixels(Image.open(io.BytesIO(d.numpy().tobytes()))).permute(2, 0, 1).to(device)
                for d in data]

    return decode


def gpu_decode_available() -> bool:
    """Whether this process can decode on the GPU: CUDA and torchvision's nvJPEG."""
    if not torch.cuda.is_available():
        return False
    try:
        nvjpeg_decoder()
    except ImportError:
        return False
    return True


def decode_device(mode: str, device: torch.device | None = None) -> torch.device | None:
    """The device that decodes training JPEGs for ``data.decode=mode``: None for the CPU
    path (always so without CUDA: CPU workers keep the CPU path); ``device`` or the current
    CUDA device for the GPU path."""
    if mode not in DECODE_MODES:
        raise DataError(f"data.decode={mode!r} is not allowed: one of {', '.join(DECODE_MODES)}")
    if mode == "cpu" or not torch.cuda.is_available():
        return None
    if not gpu_decode_available():
        if mode == "gpu":
            raise DataError("data.decode=gpu needs torchvision (for nvJPEG) in this CUDA process: "
                            "scripts/install.sh installs the build matching torch; or use "
                            "data.decode=auto or cpu")
        return None
    return device or torch.device("cuda", torch.cuda.current_device())


class GpuDecoder:
    """Decodes a training batch's image bytes on ``device`` into normalised images.

    ``decode(images, rng, max_pixels)`` -> (uint8 (N', 3, S, S) on ``device``, the indices
    of the N' decoded images, [(index, why)] of the others). ``rng`` is the batch's
    augmentation generator, used in sample order like the CPU path's.
    """

    def __init__(self, transform: TrainTransform, device: torch.device,
                 jpeg_decoder: JpegDecoder | None = None) -> None:
        self.transform = transform
        self.device = device
        self.jpeg_decoder = jpeg_decoder or nvjpeg_decoder()

    def decode(self, images: Sequence[bytes | None], rng: random.Random,
               max_pixels: int = 2**62) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
        size = self.transform.img_size
        boxes: dict[int, tuple[tuple[int, int, int, int], bool]] = {}
        on_cpu: dict[int, torch.Tensor] = {}
        failed: list[tuple[int, str]] = []
        jpegs: list[int] = []
        for i, data in enumerate(images):
            try:
                if data is None:
                    raise ValueError("the sample has no image member")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    img = Image.open(io.BytesIO(data))  # reads the header only
                with img:
                    check_pixels(img, max_pixels)
                    if img.format == "JPEG" and img.mode in ("RGB", "L"):
                        # Drawn now, in sample order, as the CPU path draws them.
                        box = self.transform.crop_box(*img.size, rng)
                        boxes[i] = (box, self.transform.hflip and rng.random() < 0.5)
                        jpegs.append(i)
                    else:
                        on_cpu[i] = self.transform.geometry(img, rng)
            except Exception as exc:  # a bad image, not a bad run: the caller counts it
                failed.append((i, f"{type(exc).__name__}: {exc}"))
        decoded = self._decode_jpegs([images[i] for i in jpegs])  # type: ignore[misc]
        crops: dict[int, torch.Tensor] = {}
        for i, pixels in zip(jpegs, decoded):
            box, flip = boxes[i]
            if pixels is None:  # nvJPEG refused it: the CPU path, with the box already drawn
                pixels = self._cpu_decode(images[i])  # type: ignore[arg-type]
                if pixels is None:
                    failed.append((i, "neither nvJPEG nor PIL could decode it"))
                    continue
            crops[i] = resized_crop(pixels, box, size, flip)
        for i, crop in on_cpu.items():
            crops[i] = crop.to(self.device, non_blocking=True)
        order = sorted(crops)
        batch = (torch.stack([crops[i] for i in order]) if order
                 else torch.empty((0, 3, size, size), dtype=torch.uint8, device=self.device))
        return batch, order, sorted(failed)

    def _decode_jpegs(self, data: list[bytes]) -> list[torch.Tensor | None]:
        if not data:
            return []
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        try:
            return list(self.jpeg_decoder(tensors, self.device))
        except Exception:  # one bad image fails the whole batched call: retry one by one
            out: list[torch.Tensor | None] = []
            for tensor in tensors:
                try:
                    out.append(self.jpeg_decoder([tensor], self.device)[0])
                except Exception as exc:
                    log.debug("nvJPEG could not decode an image (%s); trying PIL", exc)
                    out.append(None)
            return out

    def _cpu_decode(self, data: bytes) -> torch.Tensor | None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                return hwc_pixels(img).permute(2, 0, 1).to(self.device)
        except Exception:
            return None
