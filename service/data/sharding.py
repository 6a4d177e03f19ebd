"""Which samples each rank and DataLoader worker reads in an epoch, and in what order.

Every epoch lays the shards out in a (seed, epoch)-shuffled order; sample positions 0..N-1
run along that order. Training gives rank r the contiguous positions
``[r * U, (r + 1) * U)`` with ``U = (N // world_size // batch_size) * batch_size``, so every
rank has the same number of full batches (DDP/DeepSpeed need that) and the last
``N - world_size * U`` positions of the epoch order are dropped: fewer than
``world_size * (batch_size + 1)`` samples, from shards that change every epoch. Evaluation
splits all N positions in manifest order, ``N // world_size`` or one more per rank, no drop.

A rank's positions split into batches, and its batches into ``num_streams`` contiguous blocks,
one per DataLoader worker ("stream"), so each worker reads whole runs of shards. The
DataLoader takes batches from its workers round-robin, so stream ``s`` delivers its k-th batch
at slot ``k * num_streams + s`` of the rank's epoch. Inside a stream samples are shuffled in
windows of ``shuffle_window`` consecutive positions, each with its own derived seed: the
emitted order is a pure function of the plan, so any slot can be found again without replaying
the epoch, which is what mid-epoch resume relies on.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from dataclasses import dataclass
from functools import cached_property

from service.data.errors import DataError


def derive_seed(*parts: int | str) -> int:
    """A 64-bit seed from the parts, identical in every process (unlike ``hash()``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class Segment:
    """Samples ``start..stop-1`` of shard number ``shard`` (manifest numbering)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class EpochPlan:
    """One rank's share of one epoch and how its DataLoader workers divide it."""

    shard_sizes: tuple[int, ...]
    shard_order: tuple[int, ...]  # manifest shard numbers in epoch order
    first: int  # this rank reads epoch positions [first, stop)
    stop: int
    batch_size: int
    num_streams: int
    shuffle_window: int  # 1: no shuffling inside streams
    seed_parts: tuple[int, ...]  # (seed, epoch, rank): the root of every derived seed
    world_size: int

    @property
    def num_samples(self) -> int:
        return self.stop - self.first

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def stream_batches(self, stream: int) -> range:
        """The rank-batch numbers (a contiguous block) that ``stream`` produces."""
        base, extra = divmod(self.num_batches, self.num_streams)
        begin = stream * base + min(stream, extra)
        return range(begin, begin + base + (stream < extra))

    def stream_span(self, stream: int) -> tuple[int, int]:
        """Epoch positions [start, stop) that ``stream`` reads."""
        batches = self.stream_batches(stream)
        start = self.first + batches.start * self.batch_size
        return start, min(self.first + batches.stop * self.batch_size, self.stop)

    def slot(self, stream: int, k: int) -> int:
        """The rank's delivery slot of the k-th batch of ``stream``."""
        return k * self.num_streams + stream

    def first_batch(self, stream: int, first_slot: int) -> int:
        """How many of ``stream``'s batches come before delivery slot ``first_slot``."""
        return max(0, -(-(first_slot - stream) // self.num_streams))

    @cached_property
    def _epoch_starts(self) -> list[int]:
        sizes = [self.shard_sizes[i] for i in self.shard_order]
        return [0, *itertools.accumulate(sizes)]

    def segments(self, start: int, stop: int) -> list[Segment]:
        """Epoch positions [start, stop) as runs of samples within shards."""
        starts = self._epoch_starts
        out = []
        i = bisect.bisect_right(starts, start) - 1
        while start < stop:
            shard_start, shard_stop = starts[i], starts[i + 1]
            end = min(stop, shard_stop)
            out.append(Segment(self.shard_order[i], start - shard_start, end - shard_start))
            start = end
            i += 1
        return out

    def window_order(self, stream: int, window: int, length: int) -> list[int]:
        """Emission order of the ``length`` samples in a stream's window."""
        order = list(range(length))
        if self.shuffle_window > 1:
            random.Random(derive_seed("window", *self.seed_parts, stream, window)).shuffle(order)
        return order

    def augmentation_seed(self, slot: int) -> int:
        return derive_seed("augment", *self.seed_parts, slot)


def _check_common(shard_sizes: tuple[int, ...], rank: int, world_size: int, batch_size: int,
                  num_streams: int) -> None:
    if world_size < 1:
        raise DataError(f"world_size={world_size} is not allowed: >= 1")
    if not 0 <= rank < world_size:
        raise DataError(f"rank={rank} is not allowed: 0 <= rank < world_size={world_size}")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} is not allowed: >= 1")
    if num_streams < 1:
        raise DataError(f"num_streams={num_streams} is not allowed: >= 1")
    if not shard_sizes or min(shard_sizes) < 1:
        raise DataError(f"shard sizes {shard_sizes[:8]} are not allowed: at least one shard, "
                        f"each with samples")


def plan_train_epoch(shard_sizes: tuple[int, ...], *, rank: int, world_size: int,
                     batch_size: int, num_streams: int, seed: int, epoch: int,
                     shuffle_window: int) -> EpochPlan:
    """Training: shuffled shard order, equal whole batches on every rank, remainder dropped."""
    _check_common(shard_sizes, rank, world_size, batch_size, num_streams)
    total = sum(shard_sizes)
    batches = total // world_size // batch_size
    if batches == 0:
        raise DataError(f"the data set has {total} samples: too few for world_size={world_size} "
                        f"x batch_size={batch_size} (needs at least {world_size * batch_size})")
    order = list(range(len(shard_sizes)))
    random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    per_rank = batches * batch_size
    return EpochPlan(shard_sizes=tuple(shard_sizes), shard_order=tuple(order),
                     first=rank * per_rank, stop=(rank + 1) * per_rank, batch_size=batch_size,
                     num_streams=num_streams, shuffle_window=max(1, shuffle_window),
                     seed_parts=(seed, epoch, rank), world_size=world_size)


def train_plan_for_epoch(plan: EpochPlan, epoch: int) -> EpochPlan:
    """A training ``plan``'s settings planned for ``epoch``."""
    seed, _, rank = plan.seed_parts
    return plan_train_epoch(plan.shard_sizes, rank=rank, world_size=plan.world_size,
                            batch_size=plan.batch_size, num_streams=plan.num_streams, seed=seed,
                            epoch=epoch, shuffle_window=plan.shuffle_window)


def plan_eval(shard_sizes: tuple[int, ...], *, rank: int, world_size: int, batch_size: int,
              num_streams: int) -> EpochPlan:
    """Evaluation: manifest order, every sample exactly once across ranks, last batch partial."""
    _check_common(shard_sizes, rank, world_size, batch_size, num_streams)
    total = sum(shard_sizes)
    return EpochPlan(shard_sizes=tuple(shard_sizes), shard_order=tuple(range(len(shard_sizes))),
                     first=total * rank // world_size, stop=total * (rank + 1) // world_size,
                     batch_size=batch_size, num_streams=num_streams, shuffle_window=1,
                     seed_parts=(0, 0, rank), world_size=world_size)
