"""The GPU decode path: its batch assembly runs on the CPU here (PIL standing in for nvJPEG)
and must give the CPU path's batches exactly; with CUDA, nvJPEG's crops must match the CPU
path's geometry (the test is skipped without CUDA)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.data_throughput import photo_like_jpeg
from service.config import ConfigError, PretrainConfig, load_config
from service.data import DataError, build_train_loader
from service.data.gpu_decode import GpuDecoder, decode_device, gpu_decode_available, pil_decoder
from service.data.transforms import train_transform
from tests.service.data.conftest import config, image_bytes, storage
from tests.service.data.hostile import write_unchecked_dataset


@pytest.fixture
def mixed_url(tmp_path) -> str:
    return write_mixed(tmp_path, truncated=True)


def write_mixed(tmp_path, truncated: bool) -> str:
    """JPEGs (colour and grey), PNGs and two undecodable images (a non-image and, with
    ``truncated``, a cut JPEG; else a second non-image), shuffled across batches."""
    rng = np.random.default_rng(0)
    items = [(f"jpg{i}", "jpg", photo_like_jpeg(rng, 96 + 8 * (i % 5), 72), i % 3) for i in range(30)]
    items += [(f"png{i}", "png", image_bytes(100 + i, (50, 40), "PNG"), 1) for i in range(6)]
    grey = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (60, 80), dtype=np.uint8)).save(grey, format="JPEG")
    items += [("grey", "jpg", grey.getvalue(), 2), ("broken", "jpg", b"\xff\xd8\xff not a jpeg", 0),
              ("cut", "jpg", items[0][2][:200] if truncated else b"not an image", 0)]
    # As they are: preparation would refuse the cut JPEG (and the broken one) when packing.
    return write_unchecked_dataset(tmp_path / "ds", items, num_classes=3, samples_per_shard=7)


def epoch(url: str, workers: int, on_device: bool) -> tuple[list[dict], int]:
    # img_size 40: no crop of these <= 136x72 images reaches twice that, so the CPU path
    # decodes at full size too (the GPU always does).
    loader = build_train_loader(config(url=url, loader_workers=workers), storage=storage(), img_size=40,
                                batch_size=13, rank=0, world_size=1, seed=1, epoch=2)  # 39 = 3 x 13: none dropped
    if on_device:  # the GPU path's assembly, decoding with PIL on the CPU
        loader.gpu_decoder = GpuDecoder(loader.transform, torch.device("cpu"), pil_decoder())
    return list(loader), loader.corrupt_samples


@pytest.mark.parametrize("workers", [0, 2])
def test_device_path_gives_the_cpu_paths_batches(mixed_url, workers):
    cpu, cpu_corrupt = epoch(mixed_url, workers, on_device=False)
    device, device_corrupt = epoch(mixed_url, workers, on_device=True)
    assert cpu_corrupt == device_corrupt == 2
    assert [b["keys"] for b in device] == [b["keys"] for b in cpu]
    for a, b in zip(device, cpu):
        assert torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["images"], b["images"])  # same decoder here: same pixels
        assert a["images"].dtype == torch.float32 and a["images"].shape == (13, 3, 40, 40)


def test_decode_modes(monkeypatch):
    assert decode_device("cpu") is None
    if not torch.cuda.is_available():  # CPU processes keep the CPU path whatever is asked
        assert decode_device("gpu") is None and decode_device("auto") is None
    with pytest.raises(DataError, match=r"data.decode='tpu' is not allowed: one of cpu, gpu, auto"):
        decode_device("tpu")
    with pytest.raises(ConfigError, match=r"data.decode='tpu' is not allowed"):
        load_config(PretrainConfig, None, {"data.decode": "tpu"})
    assert load_config(PretrainConfig, None, {"data.decode": "auto"}).data.decode == "auto"
    assert PretrainConfig().data.decode == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_decode_available(), reason="needs CUDA and torchvision (nvJPEG)")
def test_nvjpeg_crops_have_the_cpu_paths_geometry():
    # Geometry: same boxes and flips from the same generator, same torch crop/resize. Pixels
    # differ by decoder (nvJPEG vs libjpeg-turbo): mean |difference| under 3 levels of 255.
    rng = np.random.default_rng(3)
    images = [photo_like_jpeg(rng, 500, 375) for _ in range(16)]
    transform = train_transform(224)
    decoder = GpuDecoder(transform, torch.device("cuda"))
    rng = random.Random(7)
    crops = [transform.draw(*Image.open(io.BytesIO(d)).size, rng) for d in images]
    pixels, failed = decoder.decode(images, crops)
    assert sorted(pixels) == list(range(16)) and failed == [] and pixels[0].is_cuda
    cpu_rng = random.Random(7)
    cpu = torch.stack([transform.geometry(Image.open(io.BytesIO(d)), cpu_rng) for d in images])
    difference = (torch.stack([pixels[i] for i in range(16)]).cpu().int() - cpu.int()).abs().float()
    assert difference.mean() < 3
    assert difference.mean(dim=(1, 2, 3)).max() < 5  # no image cropped elsewhere or flipped otherwise


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_decode_available(), reason="needs CUDA and torchvision (nvJPEG)")
@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_decoding_loader_yields_the_cpu_loaders_batches_on_the_gpu(tmp_path, workers):
    # No truncated JPEG here: whether nvJPEG refuses one or decodes what is there is its call.
    url = write_mixed(tmp_path, truncated=False)

    def batches(decode):
        loader = build_train_loader(config(url=url, loader_workers=workers, decode=decode),
                                    storage=storage(), img_size=40, batch_size=13, rank=0, world_size=1,
                                    seed=1, epoch=2)
        return list(loader), loader.corrupt_samples

    (gpu, gpu_corrupt), (cpu, cpu_corrupt) = batches("gpu"), batches("cpu")
    assert gpu_corrupt == cpu_corrupt == 2
    assert [b["keys"] for b in gpu] == [b["keys"] for b in cpu]
    for a, b in zip(gpu, cpu):
        assert a["images"].is_cuda and a["images"].shape == b["images"].shape
        # Normalised units: 3 levels of 255 are about 0.05.
        assert (a["images"].cpu() - b["images"]).abs().mean() < 0.05
