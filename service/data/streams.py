"""The per-worker half of a loader: read a stream's samples, shuffle them, decode batches.

An instance is pickled (or forked) into every DataLoader worker; the worker's id picks which
stream of the :class:`EpochPlan` it produces. Batches leave the worker stacked, as uint8
pixels (the loader normalises them on the training device), along with the keys of images that
could not be decoded.
"""

from __future__ import annotations

import io
import itertools
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from service.data.dataset import ShardDataset
from service.data.gpu_decode import Crop, gpu_decodable
from service.data.jpeg import check_jpeg_stream
from service.data.sharding import EpochPlan
from service.data.shards import RawSample
from service.data.transforms import check_pixels, stack_pixels


class Geometry(Protocol):
    img_size: int

    def geometry(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """An opened image -> uint8 (3, img_size, img_size) RGB."""


class BatchStream(IterableDataset):
    """A rank's batches for delivery slots ``first_slot`` onwards.

    DataLoader worker ``w`` produces stream ``(w + first_slot) % num_streams``, so that the
    DataLoader's round-robin over workers starts with the stream owning ``first_slot`` and
    delivers slots in order, also when resuming mid-epoch.

    ``fill_corrupt``: keep every batch full (training shapes must not change) by repeating
    the batch's decodable images in place of undecodable ones; a batch with none decodable is
    filled with mean-colour images labelled -1. Without it (evaluation) undecodable images are
    just left out.

    ``max_pixels``: images whose header announces more pixels are treated as undecodable
    (skipped and counted) without being decoded.

    ``raw``: batches for the GPU decoder in the training process (see ``_for_device``).
    """

    def __init__(self, dataset: ShardDataset, plan: EpochPlan, transform: Geometry,
                 first_slot: int, fill_corrupt: bool, max_pixels: int, raw: bool = False) -> None:
        super().__init__()
        self.dataset, self.plan, self.transform = dataset, plan, transform
        self.first_slot, self.fill_corrupt, self.max_pixels = first_slot, fill_corrupt, max_pixels
        self.raw = raw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.plan.num_streams:
            raise RuntimeError(f"{workers} DataLoader workers for a plan of "
                               f"{self.plan.num_streams} streams")
        yield from self.batches((worker + self.first_slot) % self.plan.num_streams)

    def batches(self, stream: int) -> Iterator[dict[str, Any]]:
        plan = self.plan
        count = len(plan.stream_batches(stream))
        first = plan.first_batch(stream, self.first_slot)
        if first >= count:
            return
        start, stop = plan.stream_span(stream)
        samples = self._emitted(stream, start, stop, skip=first * plan.batch_size)
        for k in range(first, count):
            size = min(plan.batch_size, stop - start - k * plan.batch_size)
            yield self._assemble(list(itertools.islice(samples, size)), plan.slot(stream, k))

    def _emitted(self, stream: int, start: int, stop: int, skip: int) -> Iterator[RawSample]:
        """The stream's samples in shuffled order, from the ``skip``-th on, reading only from
        the window that holds it."""
        window = self.plan.shuffle_window
        number, offset = divmod(skip, window)
        position = start + number * window
        reader = self._read(position, stop)
        while position < stop:
            length = min(window, stop - position)
            buffered = list(itertools.islice(reader, length))
            for i in self.plan.window_order(stream, number, length)[offset:]:
                yield buffered[i]
            position, number, offset = position + length, number + 1, 0

    def _read(self, start: int, stop: int) -> Iterator[RawSample]:
        for segment in self.plan.segments(start, stop):
            yield from self.dataset.read(segment.shard, segment.start, segment.stop)

    def _assemble(self, samples: list[RawSample], slot: int) -> dict[str, Any]:
        # Per-image tensors are far too small to split across threads; with several (in-process
        # loading: the trainer's thread count) the threads mostly wait for each other, 10x
        # slower on a busy machine. DataLoader workers run one thread anyway.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._assemble_on_one_thread(samples, slot)
        finally:
            torch.set_num_threads(threads)

    def _assemble_on_one_thread(self, samples: list[RawSample], slot: int) -> dict[str, Any]:
        # Seeded per slot, so a resumed epoch reproduces the same crops and flips.
        rng = random.Random(self.plan.augmentation_seed(slot))
        if self.raw:
            return self._for_device(samples, rng)
        images, labels, keys, corrupt = [], [], [], []
        for sample in samples:
            try:
                with open_image(sample) as img:
                    check_image(img, sample, self.max_pixels)
                    images.append(self.transform.geometry(img, rng))
            except Exception as exc:  # any decoder failure (or oversize) means a bad image, not a bad run
                corrupt.append((sample.key, sample.shard, f"{type(exc).__name__}: {exc}"))
                continue
            labels.append(sample.label)
            keys.append(sample.key)
        return finish_batch(images, labels, keys, corrupt, len(samples), self.transform.img_size,
                            self.fill_corrupt)

    def _for_device(self, samples: list[RawSample], rng: random.Random) -> dict[str, Any]:
        """A batch for the GPU decoder of the training process: the JPEGs' bytes with their
        crop boxes and flips, drawn here in the CPU path's order; other images decoded here
        by the CPU path; (index, why) of the undecodable."""
        encoded: list[bytes | None] = [None] * len(samples)
        crops: list[Crop | None] = [None] * len(samples)
        decoded: list[torch.Tensor | None] = [None] * len(samples)
        failed = []
        for i, sample in enumerate(samples):
            try:
                with open_image(sample) as img:
                    check_image(img, sample, self.max_pixels)
                    if gpu_decodable(img):
                        crops[i] = self.transform.draw(*img.size, rng)  # type: ignore[attr-defined]
                        encoded[i] = sample.image
                    else:
                        decoded[i] = self.transform.geometry(img, rng)
            except Exception as exc:  # any decoder failure (or oversize) means a bad image
                failed.append((i, f"{type(exc).__name__}: {exc}"))
        return {"encoded": encoded, "crops": crops, "decoded": decoded, "failed": failed,
                "labels": [s.label for s in samples], "keys": [s.key for s in samples],
                "shards": [s.shard for s in samples]}


def open_image(sample: RawSample) -> Image.Image:
    """The sample's image opened (only its header read), or ValueError without one."""
    if sample.image is None:
        raise ValueError("the sample has no image member")
    with warnings.catch_warnings():
        # data.max_image_pixels decides (check_pixels); PIL's own warning would only repeat
        # it for every such image. (PIL still refuses over twice its own limit.)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(sample.image))


def check_image(img: Image.Image, sample: RawSample, max_pixels: int) -> None:
    """Raises (so the sample counts as corrupt) for an image over ``max_pixels`` by its header,
    and for a JPEG cut short or of too many scans (``service.data.jpeg.check_jpeg_stream``)."""
    check_pixels(img, max_pixels)
    if img.format == "JPEG" and sample.image is not None:
        check_jpeg_stream(sample.image)


def finish_batch(images: list[torch.Tensor], labels: list[int], keys: list[str],
                 corrupt: list[tuple[str, str, str]], count: int, img_size: int,
                 fill_corrupt: bool) -> dict[str, Any]:
    """The batch dict from the decoded uint8 (3, S, S) images of a batch of ``count`` samples
    (on any device), with undecodable ones filled in as the class says; its images are uint8
    (N, 3, S, S), normalised where they are trained on (the loader does that)."""
    if fill_corrupt and corrupt:
        missing = count - len(images)
        if images:
            good = list(zip(images, labels, keys))
            for image, label, key in itertools.islice(itertools.cycle(good), missing):
                images.append(image)
                labels.append(label)
                keys.append(key)
        else:
            blank = torch.tensor(_MEAN_RGB, dtype=torch.uint8).view(3, 1, 1).expand(3, img_size, img_size)
            images, labels, keys = [blank] * missing, [-1] * missing, [c[0] for c in corrupt]
    return {
        "images": (stack_pixels(images) if images
                   else torch.empty((0, 3, img_size, img_size), dtype=torch.uint8)),
        "labels": torch.tensor(labels, dtype=torch.long),
        "keys": keys,
        "corrupt": corrupt,
    }


class SlotBatches(Dataset):
    """The batches of many epochs, by address: ``self[(epoch, slot)]`` is the batch at
    delivery slot ``slot`` of ``epoch`` (the same batch :class:`BatchStream` yields there).

    For persistent DataLoader workers that serve epoch after epoch: the main process sends
    addresses, in slot order, so each worker keeps reading the stream it served last where
    it stopped; an address elsewhere (another epoch, a resumed position) opens that stream
    at that batch. ``plan_for(epoch)`` gives the epoch's plan (same in every process).
    """

    def __init__(self, dataset: ShardDataset, plan_for: Callable[[int], EpochPlan],
                 transform: Geometry, fill_corrupt: bool, max_pixels: int,
                 raw: bool = False) -> None:
        self.dataset, self.plan_for, self.transform = dataset, plan_for, transform
        self.fill_corrupt, self.max_pixels, self.raw = fill_corrupt, max_pixels, raw
        self._plans: dict[int, EpochPlan] = {}
        # stream -> (epoch, number of its next batch, the batches from there on)
        self._open: dict[int, tuple[int, int, Iterator[dict[str, Any]]]] = {}

    def __len__(self) -> int:
        raise TypeError("SlotBatches is addressed by (epoch, slot), without a length")

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = self.plan_for(epoch)
        return self._plans[epoch]

    def __getitem__(self, address: tuple[int, int]) -> dict[str, Any]:
        epoch, slot = address
        plan = self.plan(epoch)
        stream, k = slot % plan.num_streams, slot // plan.num_streams
        opened = self._open.get(stream)
        if opened is None or opened[:2] != (epoch, k):
            # Streams of other epochs are done with (their files close with them).
            self._open = {s: o for s, o in self._open.items() if o[0] == epoch and s != stream}
            batches = BatchStream(self.dataset, plan, self.transform, first_slot=slot,
                                  fill_corrupt=self.fill_corrupt, max_pixels=self.max_pixels,
                                  raw=self.raw).batches(stream)
        else:
            batches = opened[2]
        batch = next(batches)
        self._open[stream] = (epoch, k + 1, batches)
        return batch


# ImageNet mean as 8-bit RGB: normalises to (about) zero.
_MEAN_RGB = (124, 116, 104)
