"""Data pipeline throughput: images/s from local disk and from an S3-compatible server.

    python benchmarks/data_throughput.py                      # 2000 ImageNet-sized JPEGs
    python benchmarks/data_throughput.py --images 500 --max-workers 4 --img-size 224
    python benchmarks/data_throughput.py --images 600 --max-workers 2 --skip-s3 --json

Generates synthetic photo-like JPEGs (default 500x375, like ImageNet's average), packs them
with prepare_dataset into a local directory and into a bucket on a moto S3 server on loopback,
then reads one training epoch per setting and prints images/s for 0 (in-process) and 1..N
DataLoader workers, plus the raw shard read rate without decoding. Compare the figures with
the model's images/s per GPU to know whether the loader keeps up. The moto server is a pure
Python server in this same process, so S3 figures are a lower bound for a real object store.

Per core (images per CPU-second of this process, so other load on a shared machine does not
count), on one thread and the same images and crops, best of ``--rounds`` alternating runs:
our decode + crop into a uint8 batch, as the loader's workers hand it over (``ours_per_core``;
the float normalisation then runs on the training device; ``ours_normalised_on_cpu_per_core``
adds it here, on this core) against a reference, plain PIL
decode + crop + bicubic resize + flip + per-image float normalisation as torchvision's
RandomResizedCrop/ToTensor/Normalize do, stacked into batches as default collation does
(``reference_per_core``; ``reference_unbatched_per_core`` leaves the stacking out).
``epoch_over_steady`` and ``first_batch_s`` are those of the local-disk epoch 1 with the most
workers (epoch 0 starts the persistent workers: its figures are ``*_first_epoch``).
``gpu_decode_img_per_s``: batched GPU decode + crop + normalise, where CUDA is present (null
otherwise).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# This checkout's code, also where another checkout is pip-installed (editable) elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.config import DataConfig, StorageConfig  # noqa: E402
from service.data import build_train_loader, close_worker_pool, open_dataset, storage_options  # noqa: E402
from service.data.prepare import prepare_dataset  # noqa: E402
from service.data.transforms import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize_batch,
    stack_pixels,
    train_transform,
)


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """Smooth colour fields plus sensor-like noise: compresses like a real photo."""
    coarse = Image.fromarray(rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3),
                                          dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    noisy = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_images(root: Path, count: int, size: tuple[int, int], classes: int = 10) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for i in range(count):
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = photo_like_jpeg(rng, *size)
        (folder / f"img_{i:06d}.jpg").write_bytes(data)
        total += len(data)
    return total


def read_raw(url: str) -> tuple[float, float]:
    """(images/s, MB/s) streaming every shard without decoding."""
    dataset = open_dataset(url, StorageConfig())
    started, count, nbytes = time.perf_counter(), 0, 0
    for shard, size in enumerate(dataset.shard_sizes):
        for sample in dataset.read(shard, 0, size):
            count += 1
            nbytes += len(sample.image or b"")
    seconds = time.perf_counter() - started
    return count / seconds, nbytes / seconds / 2**20


def read_epoch(cfg: DataConfig, img_size: int, batch_size: int,
               epoch: int = 0) -> tuple[float, float, float]:
    """(images/s over the epoch, images/s after the first batch, seconds to the first batch),
    timed from building the epoch's loader, as the trainer does every epoch."""
    started = time.perf_counter()
    loader = build_train_loader(cfg, img_size=img_size, batch_size=batch_size, rank=0,
                                world_size=1, seed=0, epoch=epoch)
    first_at, count = None, 0
    for batch in loader:
        if first_at is None:
            first_at = time.perf_counter()
        count += batch["images"].shape[0]
    ended = time.perf_counter()
    first_at = first_at or ended
    steady = (count - batch_size) / max(ended - first_at, 1e-9)
    return count / (ended - started), steady, first_at - started


def reference_per_core(images: list[bytes], img_size: int, min_scale: float,
                       batch_size: int | None) -> float:
    """images per CPU-second of the plain loop, one image at a time: PIL decode of the whole
    image, crop, bicubic resize, flip, float conversion and normalisation per image (as
    torchvision's RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize), then, with a
    ``batch_size``, stacked into (B, 3, H, W) batches as a DataLoader's default collation does
    (the loader's output is such a batch; None leaves the images unstacked)."""
    transform = train_transform(img_size, min_scale)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    started = time.process_time()
    batch = []
    for i, data in enumerate(images):
        rng = random.Random(i)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        left, top, w, h = transform.crop_box(*img.size, rng)
        img = img.crop((left, top, left + w, top + h)).resize((img_size, img_size), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)  # (3, H, W)
        batch.append(pixels.sub_(mean).div_(std))
        if batch_size is None or len(batch) == batch_size or i == len(images) - 1:
            if batch_size is not None:
                torch.stack(batch)  # (B, 3, H, W)
            batch = []
    return len(images) / (time.process_time() - started)


def ours_per_core(images: list[bytes], img_size: int, min_scale: float, batch_size: int,
                  normalise: bool = False) -> float:
    """images per CPU-second of the loader's own decode path (the crops and flips of the
    reference) into uint8 batches, as its workers make them; ``normalise``: also the float
    normalisation on this CPU that the training device otherwise does (what a CPU-only run
    pays in all)."""
    transform = train_transform(img_size, min_scale)
    started = time.process_time()
    for first in range(0, len(images), batch_size):
        crops = [transform.geometry(Image.open(io.BytesIO(data)), random.Random(first + i))
                 for i, data in enumerate(images[first:first + batch_size])]
        pixels = stack_pixels(crops)  # (B, 3, H, W) uint8
        if normalise:
            normalize_batch(pixels)
    return len(images) / (time.process_time() - started)


def per_core_figures(images: list[bytes], img_size: int, min_scale: float, batch_size: int,
                     rounds: int = 3) -> tuple[float, float, float, float]:
    """(reference, reference without batching, ours, ours normalised on the CPU) in images per
    CPU-second on one torch
    thread: a warm-up, then ``rounds`` alternating runs of each, best of each kept. CPU time
    (``time.process_time``), not wall time: on a shared machine, time spent waiting for a
    core is counted against none of them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference_per_core(images[:batch_size], img_size, min_scale, batch_size)  # first-call costs
        ours_per_core(images[:batch_size], img_size, min_scale, batch_size)
        reference, unbatched, ours, ours_normalised = 0.0, 0.0, 0.0, 0.0
        for _ in range(rounds):
            reference = max(reference, reference_per_core(images, img_size, min_scale, batch_size))
            unbatched = max(unbatched, reference_per_core(images, img_size, min_scale, None))
            ours = max(ours, ours_per_core(images, img_size, min_scale, batch_size))
            ours_normalised = max(ours_normalised, ours_per_core(images, img_size, min_scale, batch_size,
                                                                 normalise=True))
        return reference, unbatched, ours, ours_normalised
    finally:
        torch.set_num_threads(threads)


def gpu_decode_rate(images: list[bytes], img_size: int, min_scale: float, batch_size: int) -> float | None:
    """images/s of batched GPU decode + crop + normalise in the training process (the
    workers' header parsing not included), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from service.data.gpu_decode import GpuDecoder

    transform = train_transform(img_size, min_scale)
    decoder = GpuDecoder(transform, torch.device("cuda"))
    # Boxes and flips are drawn by the DataLoader workers from the headers: not timed here.
    rng = random.Random(0)
    crops = [transform.draw(*Image.open(io.BytesIO(data)).size, rng) for data in images]

    def run() -> None:
        for first in range(0, len(images), batch_size):
            pixels, _ = decoder.decode(images[first:first + batch_size], crops[first:first + batch_size])
            normalize_batch(torch.stack(list(pixels.values())))  # (B, 3, H, W) float on the GPU
        torch.cuda.synchronize()

    run()
    started = time.perf_counter()
    run()
    return len(images) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--source-size", default="500x375", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--img-size", type=int, default=224, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--shard-size", type=int, default=16 * 2**20, help="bytes per shard")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--decode-images", type=int, default=300,
                        help="images (of the generated ones) for the per-core comparison")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating per-core runs of each; the best of each is reported")
    parser.add_argument("--min-scale", type=float, default=0.2, help="RandomResizedCrop's smallest area")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.source_size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="convmae-bench-") as tmp:
        tmp_path = Path(tmp)
        started = time.perf_counter()
        nbytes = write_images(tmp_path / "src", args.images, size)  # type: ignore[arg-type]
        print(f"generated {args.images} JPEGs of {size[0]}x{size[1]} "
              f"({nbytes / args.images / 1024:.0f} KB each) in {time.perf_counter() - started:.1f}s")

        blobs = [p.read_bytes() for p in sorted((tmp_path / "src").rglob("*.jpg"))][:args.decode_images]
        reference, unbatched, ours, ours_normalised = per_core_figures(blobs, args.img_size, args.min_scale,
                                                      args.batch_size, args.rounds)
        gpu_rate = gpu_decode_rate(blobs, args.img_size, args.min_scale, args.batch_size)

        targets = {"disk": str(tmp_path / "shards")}
        server = None
        if not args.skip_s3:
            server, endpoint = start_s3()
            targets["s3"] = "s3://bench/shards"
        rows = []
        try:
            for source, url in targets.items():
                started = time.perf_counter()
                prepare_dataset(str(tmp_path / "src"), url, shard_bytes=args.shard_size,
                                storage_options=storage_options(StorageConfig()))
                prep = args.images / (time.perf_counter() - started)
                print(f"{source}: prepare_dataset packed {prep:.0f} images/s")
                raw_images, raw_mb = read_raw(url)
                rows.append((source, "raw read, no decode", raw_images, raw_images, 0.0, raw_mb))
                for workers in range(0, args.max_workers + 1):
                    cfg = DataConfig(url=url, loader_workers=workers, shuffle_buffer=256)
                    # Epoch 0 starts the workers; epoch 1 finds them running, with its first
                    # batches prepared while epoch 0 ended.
                    close_worker_pool()
                    cold = read_epoch(cfg, args.img_size, args.batch_size, epoch=0)
                    rows.append((source, f"{workers} workers, epoch 0", *cold, None))
                    warm = cold
                    if workers:
                        warm = read_epoch(cfg, args.img_size, args.batch_size, epoch=1)
                        rows.append((source, f"{workers} workers, epoch 1", *warm, None))
                    close_worker_pool()
                    if source == "disk":
                        last_disk = {"workers": workers, "cold": cold, "warm": warm}
        finally:
            if server is not None:
                server.stop()

    print(f"\nimg_size={args.img_size} batch_size={args.batch_size} cpus={os.cpu_count()} "
          f"torch threads={__import__('torch').get_num_threads()}")
    print(f"{'source':<7} {'setting':<20} {'images/s':>9} {'steady':>9} {'1st batch':>10} {'MB/s':>7}")
    for source, setting, rate, steady, first, mb in rows:
        mb_text = f"{mb:7.1f}" if mb is not None else f"{'':>7}"
        print(f"{source:<7} {setting:<20} {rate:9.0f} {steady:9.0f} {first:9.2f}s {mb_text}")
    print(f"\nper core, {len(blobs)} images, same crops, best of {args.rounds}: ours {ours:.0f} images/s "
          f"(uint8 batches; normalised on the training device), reference (PIL decode + crop/resize/flip + "
          f"per-image normalise, batched) {reference:.0f} images/s: {ours / reference:.2f}x; reference "
          f"without batching {unbatched:.0f} images/s: {ours / unbatched:.2f}x; ours with the "
          f"normalisation on this CPU too {ours_normalised:.0f} images/s: {ours_normalised / reference:.2f}x")
    print("GPU decode: " + (f"{gpu_rate:.0f} images/s" if gpu_rate is not None else "no CUDA device"))
    if args.json:
        print(json.dumps({
            "images": args.images, "source_size": args.source_size, "img_size": args.img_size,
            "batch_size": args.batch_size, "cpus": os.cpu_count(),
            "ours_per_core": round(ours, 1), "reference_per_core": round(reference, 1),
            "ours_over_reference": round(ours / reference, 3),
            "reference_unbatched_per_core": round(unbatched, 1),
            "ours_normalised_on_cpu_per_core": round(ours_normalised, 1),
            "epoch_over_steady": round(last_disk["warm"][0] / last_disk["warm"][1], 3),
            "first_batch_s": round(last_disk["warm"][2], 4),
            "epoch_over_steady_first_epoch": round(last_disk["cold"][0] / last_disk["cold"][1], 3),
            "first_batch_first_epoch_s": round(last_disk["cold"][2], 4),
            "epoch_workers": last_disk["workers"],
            "gpu_decode_img_per_s": None if gpu_rate is None else round(gpu_rate, 1),
            "rows": [{"source": r[0], "setting": r[1], "img_per_s": round(r[2], 1),
                      "steady_img_per_s": round(r[3], 1), "first_batch_s": round(r[4], 4)} for r in rows],
        }))


def start_s3():
    """A moto S3 server on a free loopback port, with the AWS_* variables pointing at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, endpoint


if __name__ == "__main__":
    main()
