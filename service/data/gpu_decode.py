"""Batched JPEG decoding on the GPU (nvJPEG through torchvision.io) with the training crop,
flip and normalisation done there too.

For CUDA training processes (``data.decode: gpu|auto``): DataLoader workers (which cannot
use CUDA: they are forked) read the samples, parse the headers and draw each JPEG's crop box
and flip from the batch's seed in the CPU path's order (:meth:`TrainTransform.draw`); the
training process decodes the batch's JPEGs on its GPU and crops them with the CPU path's
torch code (:func:`resized_crop`). So the geometry is the CPU path's exactly; pixels differ
only by decoder (nvJPEG's IDCT and chroma upsampling vs libjpeg-turbo's, a few levels of 255)
and because the GPU always decodes at full size.

Images nvJPEG is not given (PNG, WebP, CMYK JPEGs) are decoded by the CPU path in the
workers; a JPEG nvJPEG fails on is decoded by PIL in the training process, with its box.

torchvision is imported only here, when a GPU decoder is made; CPU machines do not need it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from service.config import DECODE_MODES
from service.data.errors import DataError
from service.data.transforms import TrainTransform, hwc_pixels, resized_crop

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


def gpu_decodable(img: Image.Image) -> bool:
    """Whether an opened image goes to nvJPEG: a colour or grey JPEG (others take the CPU path)."""
    return img.format == "JPEG" and img.mode in ("RGB", "L")


Crop = tuple[tuple[int, int, int, int], bool]  # ((left, top, width, height), flip)


class GpuDecoder:
    """Decodes JPEG bytes on ``device`` and crops, resizes and flips them there.

    ``decode(encoded, crops)`` takes a batch's bytes (None: not for this decoder) with each
    image's crop box and flip, drawn beforehand (in the DataLoader workers, by
    :meth:`TrainTransform.draw`), and returns ({index: uint8 (3, S, S) on ``device``},
    [(index, why)] of the images neither nvJPEG nor PIL could decode).
    """

    def __init__(self, transform: TrainTransform, device: torch.device,
                 jpeg_decoder: JpegDecoder | None = None) -> None:
        self.transform = transform
        self.device = device
        self.jpeg_decoder = jpeg_decoder or nvjpeg_decoder()

    def decode(self, encoded: Sequence[bytes | None], crops: Sequence[Crop | None]
               ) -> tuple[dict[int, torch.Tensor], list[tuple[int, str]]]:
        wanted = [i for i, data in enumerate(encoded) if data is not None]
        pixels = self._decode_jpegs([encoded[i] for i in wanted])  # type: ignore[misc]
        out: dict[int, torch.Tensor] = {}
        failed: list[tuple[int, str]] = []
        for i, image in zip(wanted, pixels):
            if image is None:  # nvJPEG refused it: PIL, then the same crop
                image = self._cpu_decode(encoded[i])  # type: ignore[arg-type]
                if image is None:
                    failed.append((i, "neither nvJPEG nor PIL could decode it"))
                    continue
            box, flip = crops[i]  # type: ignore[misc]
            out[i] = resized_crop(image, box, self.transform.img_size, flip)
        return out, failed

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
