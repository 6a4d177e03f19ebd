"""Train and eval loaders: torch DataLoaders over :class:`BatchStream`, with resumable state.

``len(train_loader)`` is the same on every rank (see ``sharding`` for which samples are
dropped); the state of any rank resumes every rank, because it holds only the epoch position
and the settings that must match. A state saved by another number of ranks resumes too: the
loader then reads the rest of that epoch, split over the ranks there are now
(``sharding.plan_train_remainder``), and says so in the log.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from service.config import DataConfig, StorageConfig
from service.data.dataset import ShardDataset, open_dataset
from service.data.embedded import resolve_data_urls
from service.data.errors import DataError
from service.data.gpu_decode import GpuDecoder, decode_device
from service.data.sharding import (
    EpochPlan,
    plan_eval,
    plan_train_epoch,
    plan_train_remainder,
    train_plan_for_epoch,
)
from service.data.storage import redact_url
from service.data.streams import BatchStream, Geometry, SlotBatches, finish_batch
from service.data.transforms import eval_transform, normalize_batch, train_transform

log = logging.getLogger(__name__)

STATE_FORMAT = "convmae-train-loader"
STATE_VERSION = 1
# Settings that fix the epoch's batches; resuming with any of them changed would not
# reproduce the remaining batches, so it is refused.
_STATE_KEYS = ("epoch", "seed", "world_size", "batch_size", "num_streams", "shuffle_window",
               "num_samples")


# Batches each worker prepares ahead (DataLoader's prefetch_factor): enough to cover the
# jitter of one slow batch, without holding many (B, 3, H, W) float batches per worker.
PREFETCH_PER_WORKER = 2


class EpochSlots(Sampler):
    """Addresses (epoch, slot) from ``start`` on, through the rest of that epoch and on into
    the following ones without end, so workers prepare the next epoch's first batches while
    the current one finishes."""

    def __init__(self, batches_per_epoch: int) -> None:
        self.batches_per_epoch = batches_per_epoch
        self.start = (0, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, slot = self.start
        while True:
            for s in range(slot, self.batches_per_epoch):
                yield epoch, s
            epoch, slot = epoch + 1, 0


class WorkerPool:
    """One rank's persistent training DataLoader workers, kept from epoch to epoch (and from
    one TrainLoader to the next with the same settings).

    They are started on first use and keep their processes, open connections and position:
    when an epoch's loader asks for the batches that come next, prefetched ones are already
    waiting; asking for another position (another epoch, a resume) drops what was prefetched
    and restarts the addresses there, without restarting the processes.
    """

    def __init__(self, key: tuple[Any, ...], batches: SlotBatches, num_workers: int,
                 batches_per_epoch: int) -> None:
        self.key = key
        self.batches_per_epoch = batches_per_epoch
        self.slots = EpochSlots(batches_per_epoch)
        self.loader = DataLoader(batches, batch_size=None, sampler=self.slots,
                                 num_workers=num_workers, persistent_workers=True,
                                 prefetch_factor=PREFETCH_PER_WORKER,
                                 pin_memory=torch.cuda.is_available())
        self.restarts = 0  # how often addresses were restarted (the processes stay)
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._next: tuple[int, int] | None = None  # address of the batch the iterator yields next

    def prepare(self, epoch: int, slot: int) -> None:
        """Has the workers prepare the batches from (epoch, slot) on, unless they already are."""
        if self._iterator is None or self._next != (epoch, slot):
            self.slots.start = (epoch, slot)
            if self._iterator is not None:
                self.restarts += 1
            # The first call starts the worker processes; later ones reset the same workers.
            self._iterator = iter(self.loader)
            self._next = (epoch, slot)

    def batches(self, epoch: int, slot: int) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` from ``slot`` to its end."""
        self.prepare(epoch, slot)
        assert self._iterator is not None
        while slot < self.batches_per_epoch:
            batch = next(self._iterator)
            slot += 1
            self._next = (epoch, slot) if slot < self.batches_per_epoch else (epoch + 1, 0)
            yield batch

    def close(self) -> None:
        """Stops the worker processes: the DataLoader's iterator does, once nothing holds it."""
        self._iterator = None
        self.loader = None  # type: ignore[assignment]


_train_pool: WorkerPool | None = None


def close_worker_pool() -> None:
    """Stops this process's persistent training workers, if any (they also end with it)."""
    global _train_pool
    if _train_pool is not None:
        _train_pool.close()
        _train_pool = None


def worker_pool_in_use() -> WorkerPool | None:
    """This process's persistent training workers, if started."""
    return _train_pool


def worker_pool(key: tuple[Any, ...], make: Any) -> WorkerPool:
    """This process's training worker pool for ``key``; one for other settings replaces it."""
    global _train_pool
    if _train_pool is None or _train_pool.key != key:
        close_worker_pool()
        _train_pool = make()
    return _train_pool


class _Loader:
    def __init__(self, dataset: ShardDataset, plan: EpochPlan, transform: Geometry,
                 num_workers: int, fill_corrupt: bool, max_pixels: int) -> None:
        self.dataset, self.plan, self.transform = dataset, plan, transform
        self.num_workers = num_workers
        self._fill_corrupt, self._max_pixels = fill_corrupt, max_pixels
        self._consumed = 0
        self._corrupt = 0
        # Set for GPU decoding: workers then deliver undecoded samples.
        self.gpu_decoder: GpuDecoder | None = None
        # Where batches are normalised: the training device (None: this process's CPU).
        self.device: torch.device | None = None

    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def corrupt_samples(self) -> int:
        """Images skipped so far, undecodable or over the pixel limit (each also logged at
        WARNING with its key and why)."""
        return self._corrupt

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The batches from the current position to the end of the epoch."""
        if self._consumed >= len(self):
            return
        for batch in map(self._decoded, self._raw_batches()):
            self._count_corrupt(batch.pop("corrupt"))
            self._consumed += 1
            if batch["keys"] or self._fill_corrupt:
                batch["images"] = self._normalized(batch["images"])
                yield batch

    def _normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) from the workers (pinned where CUDA is) or the GPU decoder ->
        normalised float32 on the training device: there a single kernel, on four times
        fewer bytes copied than float batches would be."""
        if self.device is not None and pixels.device != self.device:
            pixels = pixels.to(self.device, non_blocking=True)
        return normalize_batch(pixels)

    def _decoded(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A batch prepared for GPU decoding, decoded here; others as they are."""
        if self.gpu_decoder is None:
            return batch
        crops, failed = self.gpu_decoder.decode(batch["encoded"], batch["crops"])
        for i, image in enumerate(batch["decoded"]):  # decoded by the workers' CPU path
            if image is not None:
                crops[i] = image.to(self.gpu_decoder.device, non_blocking=True)
        keys, labels = batch["keys"], batch["labels"]
        corrupt = [(keys[i], batch["shards"][i], why) for i, why in sorted(batch["failed"] + failed)]
        order = sorted(crops)
        return finish_batch([crops[i] for i in order], [labels[i] for i in order],
                            [keys[i] for i in order], corrupt, len(keys),
                            self.transform.img_size, self._fill_corrupt)

    def _raw_batches(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position, as the workers (or this process) make them."""
        stream = BatchStream(self.dataset, self.plan, self.transform, first_slot=self._consumed,
                             fill_corrupt=self._fill_corrupt, max_pixels=self._max_pixels,
                             raw=self.gpu_decoder is not None)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                               pin_memory=torch.cuda.is_available(), persistent_workers=False))

    def _count_corrupt(self, corrupt: list[tuple[str, str, str]]) -> None:
        for key, shard, reason in corrupt:
            log.warning("skipped image %r in %s/%s: %s", key,
                        redact_url(self.dataset.url), shard, reason)
        self._corrupt += len(corrupt)


class TrainLoader(_Loader):
    """One epoch of training batches for one rank.

    Iterating yields ``{"images": FloatTensor (B, 3, H, W), "labels": LongTensor (B,),
    "keys": list[str]}`` from the current position to the end of the epoch; ``len()`` is the
    number of batches in the whole epoch, identical on every rank. ``state_dict()`` after any
    batch, given back as ``resume_state``, yields exactly the remaining batches.
    """

    def __init__(self, dataset: ShardDataset, plan: EpochPlan, transform: Geometry, *,
                 num_workers: int, seed: int, epoch: int, max_pixels: int,
                 resume_state: dict[str, Any] | None = None, reshards: list[tuple[int, int]] | None = None) -> None:
        super().__init__(dataset, plan, transform, num_workers, fill_corrupt=True, max_pixels=max_pixels)
        self.seed, self.epoch = seed, epoch
        # (world size, batches consumed) of each earlier plan of this epoch: ``plan`` is the
        # rest of the epoch after them (empty: the epoch's own plan).
        self.reshards = [tuple(pair) for pair in reshards or []]
        if resume_state is not None:
            self._consumed, self._corrupt = _resume_position(resume_state, self._settings(), len(self))

    @property
    def uses_worker_pool(self) -> bool:
        """Persistent workers serve whole epochs' plans; the rest of an epoch resharded on
        resume is another plan, read by workers of its own (once, then the pool again)."""
        return self.num_workers > 0 and not self.reshards

    def prepare(self) -> None:
        """Starts the workers on this loader's next batches now, so they are ready by the time
        iteration starts (build_train_loader does this)."""
        if self.uses_worker_pool and self._consumed < len(self):
            worker_pool(self._pool_key(), self._make_pool).prepare(self.epoch, self._consumed)

    def _raw_batches(self) -> Iterator[dict[str, Any]]:
        if not self.uses_worker_pool:
            return super()._raw_batches()
        return self._from_pool()

    def _from_pool(self) -> Iterator[dict[str, Any]]:
        # Persistent workers: the same processes serve every epoch of these settings.
        pool = worker_pool(self._pool_key(), self._make_pool)
        try:
            yield from pool.batches(self.epoch, self._consumed)
        except Exception:
            close_worker_pool()  # a worker failed: the next epoch starts afresh
            raise

    def _pool_key(self) -> tuple[Any, ...]:
        """Everything that decides the batches of any epoch, except the epoch."""
        plan, dataset = self.plan, self.dataset
        return (dataset.url, repr(sorted(dataset.options.items())), dataset.manifest.shards,
                type(self.transform).__name__, tuple(sorted(vars(self.transform).items())),
                self.num_workers, self._max_pixels, plan.world_size, plan.seed_parts[::2],
                plan.batch_size, plan.num_streams, plan.shuffle_window,
                self.gpu_decoder is not None)

    def _make_pool(self) -> WorkerPool:
        batches = SlotBatches(self.dataset, functools.partial(train_plan_for_epoch, self.plan),
                              self.transform, fill_corrupt=True, max_pixels=self._max_pixels,
                              raw=self.gpu_decoder is not None)
        return WorkerPool(self._pool_key(), batches, self.num_workers, len(self))

    @property
    def batches_consumed(self) -> int:
        return self._consumed

    @property
    def batches_remaining(self) -> int:
        return len(self) - self._consumed

    def _settings(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed,
                "world_size": self.plan.world_size, "batch_size": self.plan.batch_size,
                "num_streams": self.plan.num_streams, "shuffle_window": self.plan.shuffle_window,
                "num_samples": self.dataset.num_samples}

    def state_dict(self) -> dict[str, Any]:
        """Small, JSON-serialisable position after the batches consumed so far."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, **self._settings(),
                "batches_consumed": self._consumed, "corrupt_samples": self._corrupt,
                "reshards": [list(pair) for pair in self.reshards]}


def check_resume_state(state: Any, settings: dict[str, int], *, other_world_size: bool = False) -> None:
    """Raises DataError unless ``state`` (a ``TrainLoader.state_dict()``) can resume a loader
    with ``settings``; ``other_world_size``: saved by another number of ranks is fine."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DataError(f"resume_state {state!r:.200} is not a train loader state "
                        f"(from TrainLoader.state_dict())")
    if state.get("version") != STATE_VERSION:
        raise DataError(f"resume_state version {state.get('version')!r} is not supported; "
                        f"expected {STATE_VERSION}")
    wrong = [f"{k}: saved {state.get(k)!r}, now {settings[k]!r}" for k in _STATE_KEYS
             if state.get(k) != settings[k] and not (other_world_size and k == "world_size")]
    if wrong:
        raise DataError("resume_state does not match this loader, so the rest of its epoch "
                        "cannot be reproduced (" + "; ".join(wrong) + "); num_streams is "
                        "data.loader_workers (at least 1)")


def _resume_position(state: dict[str, Any], settings: dict[str, int], num_batches: int) -> tuple[int, int]:
    check_resume_state(state, settings)
    consumed = state.get("batches_consumed")
    if not isinstance(consumed, int) or not 0 <= consumed <= num_batches:
        raise DataError(f"resume_state batches_consumed={consumed!r} is not allowed: "
                        f"0..{num_batches}")
    return consumed, int(state.get("corrupt_samples", 0))


class EvalLoader(_Loader):
    """Evaluation batches for one rank: fixed order, no augmentation, nothing dropped.

    Iterating starts over each time. Undecodable images are left out of their batch (and a
    batch left empty is not yielded).
    """

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._consumed = 0
        yield from super().__iter__()


def build_train_loader(cfg: DataConfig, *, storage: StorageConfig | None = None, img_size: int, batch_size: int, rank: int,
                       world_size: int, seed: int, epoch: int,
                       resume_state: dict[str, Any] | None = None,
                       device: torch.device | None = None) -> TrainLoader:
    """The training loader of ``rank`` for ``epoch`` over ``cfg.url`` (or the embedded set).

    ``device``: the training device; batches arrive there, normalised (None: on this CPU).
    With ``cfg.decode`` gpu/auto in a CUDA process, images are also decoded on ``device``
    (default: the current CUDA device)."""
    on = decode_device(cfg.decode, device)
    if epoch < 0:
        raise DataError(f"epoch={epoch} is not allowed: >= 0")
    train_url, _ = resolve_data_urls(cfg)
    dataset = open_dataset(train_url, storage)
    streams = max(1, cfg.loader_workers)
    settings = {"batch_size": batch_size, "num_streams": streams, "seed": seed, "epoch": epoch,
                "shuffle_window": cfg.shuffle_buffer}
    reshards: list[tuple[int, int]] = []
    if resume_state is not None:
        check_resume_state(resume_state, {**settings, "shuffle_window": max(1, cfg.shuffle_buffer),
                                          "world_size": world_size, "num_samples": dataset.num_samples},
                           other_world_size=True)
        reshards = [tuple(pair) for pair in resume_state.get("reshards") or []]
        if resume_state["world_size"] != world_size:  # the rest of the epoch, on the ranks there are now
            reshards.append((resume_state["world_size"], resume_state["batches_consumed"]))
            resume_state = {**resume_state, "world_size": world_size, "batches_consumed": 0}
    if reshards:
        remainder = plan_train_remainder(dataset.shard_sizes, rank=rank, world_size=world_size,
                                         history=reshards, **settings)
        plan = remainder.plan
        if rank == 0 and resume_state is not None and resume_state["batches_consumed"] == 0:
            log.info("epoch %d resharded from %d to %d rank(s): %d of its samples read before, %d left, "
                     "now %d batch(es) of up to %d per rank%s", epoch, reshards[-1][0], world_size,
                     remainder.read, remainder.left, plan.num_batches, batch_size,
                     f", {remainder.dropped} left out (fewer than the ranks, for equal batch counts)"
                     if remainder.dropped else "")
    else:
        plan = plan_train_epoch(dataset.shard_sizes, rank=rank, world_size=world_size, **settings)
    transform = train_transform(img_size, cfg.min_crop_scale, cfg.hflip)
    loader = TrainLoader(dataset, plan, transform, num_workers=cfg.loader_workers, seed=seed,
                         epoch=epoch, max_pixels=cfg.max_image_pixels, resume_state=resume_state,
                         reshards=reshards)
    loader.device = on if on is not None else device
    if on is not None:
        loader.gpu_decoder = GpuDecoder(transform, on)
    # The first batches are decoded while the caller sets up the rest (model, optimizer).
    loader.prepare()
    return loader


def build_eval_loader(url: str, cfg: DataConfig, *, storage: StorageConfig | None = None, img_size: int,
                      batch_size: int, rank: int = 0, world_size: int = 1) -> EvalLoader:
    """Eval loader of ``rank`` over ``url``: every sample exactly once across ranks."""
    dataset = open_dataset(url, storage)
    plan = plan_eval(dataset.shard_sizes, rank=rank, world_size=world_size,
                     batch_size=batch_size, num_streams=max(1, cfg.loader_workers))
    return EvalLoader(dataset, plan, eval_transform(img_size), cfg.loader_workers,
                      fill_corrupt=False, max_pixels=cfg.max_image_pixels)
