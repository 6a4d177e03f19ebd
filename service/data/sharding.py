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

Resuming mid-epoch on another number of ranks (``plan_train_remainder``): the samples the
interrupted plan had not yet delivered are recomputed from its settings and the batches each of
its ranks had consumed (the same on every rank), sorted back into epoch order and split afresh:
rank r of W takes a contiguous ``R * r // W .. R * (r + 1) // W`` of the R left, in batches of
``batch_size`` with a last partial one, the same number of batches on every rank. The rest of
the epoch is then read exactly once: nothing delivered before is read again and nothing
undelivered is skipped, except, when every rank cannot get the same number of batches, the
fewer than W last samples (``RemainderPlan.dropped``). Such a plan indexes its samples through
``positions``; it can itself be interrupted and resharded again (a history of (world size,
batches consumed) pairs).
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
    seed_parts: tuple[int, ...]  # (seed, epoch, rank[, reshards]): the root of every derived seed
    world_size: int
    # Epoch positions of this plan's samples when they are not simply 0..N-1 (a resharded
    # remainder): plan index i stands for epoch position positions[i].
    positions: tuple[int, ...] | None = None

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
        """Plan indices [start, stop) as runs of samples within shards."""
        if self.positions is None:
            return self._position_segments(start, stop)
        out: list[Segment] = []
        for run_start, run_stop in _runs(self.positions[start:stop]):
            out.extend(self._position_segments(run_start, run_stop))
        return out

    def _position_segments(self, start: int, stop: int) -> list[Segment]:
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

    def emission_order(self, stream: int) -> list[int]:
        """The plan indices ``stream`` delivers, in delivery order (``BatchStream`` emits them
        so: window by window, each window in ``window_order``)."""
        start, stop = self.stream_span(stream)
        order: list[int] = []
        for number, window_start in enumerate(range(start, stop, self.shuffle_window)):
            length = min(self.shuffle_window, stop - window_start)
            order.extend(window_start + i for i in self.window_order(stream, number, length))
        return order

    def undelivered(self, batches_consumed: int) -> list[int]:
        """Epoch positions this rank has not delivered after ``batches_consumed`` batches."""
        left: list[int] = []
        for stream in range(self.num_streams):
            done = min(self.first_batch(stream, batches_consumed), len(self.stream_batches(stream)))
            left.extend(self.emission_order(stream)[done * self.batch_size:])
        return left if self.positions is None else [self.positions[i] for i in left]


def _runs(positions: tuple[int, ...]) -> list[tuple[int, int]]:
    """Consecutive runs of ``positions`` as [start, stop) pairs, in order."""
    runs: list[tuple[int, int]] = []
    for position in positions:
        if runs and runs[-1][1] == position:
            runs[-1] = (runs[-1][0], position + 1)
        else:
            runs.append((position, position + 1))
    return runs


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
    per_rank = batches * batch_size
    return EpochPlan(shard_sizes=tuple(shard_sizes), shard_order=_shard_order(len(shard_sizes), seed, epoch),
                     first=rank * per_rank, stop=(rank + 1) * per_rank, batch_size=batch_size,
                     num_streams=num_streams, shuffle_window=max(1, shuffle_window),
                     seed_parts=(seed, epoch, rank), world_size=world_size)


def train_plan_for_epoch(plan: EpochPlan, epoch: int) -> EpochPlan:
    """A training ``plan``'s settings planned for ``epoch``."""
    seed, _, rank = plan.seed_parts
    return plan_train_epoch(plan.shard_sizes, rank=rank, world_size=plan.world_size,
                            batch_size=plan.batch_size, num_streams=plan.num_streams, seed=seed,
                            epoch=epoch, shuffle_window=plan.shuffle_window)


def _shard_order(num_shards: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(num_shards))
    random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    return tuple(order)


def plan_eval(shard_sizes: tuple[int, ...], *, rank: int, world_size: int, batch_size: int,
              num_streams: int) -> EpochPlan:
    """Evaluation: manifest order, every sample exactly once across ranks, last batch partial."""
    _check_common(shard_sizes, rank, world_size, batch_size, num_streams)
    total = sum(shard_sizes)
    return EpochPlan(shard_sizes=tuple(shard_sizes), shard_order=tuple(range(len(shard_sizes))),
                     first=total * rank // world_size, stop=total * (rank + 1) // world_size,
                     batch_size=batch_size, num_streams=num_streams, shuffle_window=1,
                     seed_parts=(0, 0, rank), world_size=world_size)


@dataclass(frozen=True)
class RemainderPlan:
    """A rank's share of the rest of an epoch resumed on another number of ranks."""

    plan: EpochPlan
    read: int  # samples of the epoch the earlier plans delivered, all ranks together
    left: int  # samples they had not delivered
    dropped: int  # of those, left out so that every rank gets the same number of batches


def plan_train_remainder(shard_sizes: tuple[int, ...], *, rank: int, world_size: int, batch_size: int,
                         num_streams: int, seed: int, epoch: int, shuffle_window: int,
                         history: list[tuple[int, int]]) -> RemainderPlan:
    """The rest of epoch ``epoch`` for ``rank`` of ``world_size``, after the plans of
    ``history``: (world size, batches consumed per rank) of each earlier plan of this epoch,
    first the original, then each remainder plan resumed from it."""
    _check_common(shard_sizes, rank, world_size, batch_size, num_streams)
    if not history:
        raise DataError("history is empty: a remainder follows at least one interrupted plan")
    settings = {"batch_size": batch_size, "num_streams": num_streams, "seed": seed, "epoch": epoch,
                "shuffle_window": shuffle_window}
    first_world, first_consumed = history[0]
    planned = [plan_train_epoch(shard_sizes, rank=r, world_size=first_world, **settings)
               for r in range(first_world)]
    delivered_total = first_world * planned[0].num_samples
    left = sorted(p for plan in planned for p in plan.undelivered(first_consumed))
    for generation, (world, consumed) in enumerate(history[1:], start=1):
        planned = [_remainder_share(shard_sizes, left, rank=r, world_size=world, generation=generation, **settings)
                   for r in range(world)]
        left = sorted(p for plan in planned for p in plan.undelivered(consumed))
    kept = _even_batches(len(left), world_size, batch_size)
    plan = _remainder_share(shard_sizes, left[:kept], rank=rank, world_size=world_size,
                            generation=len(history), **settings)
    return RemainderPlan(plan, read=delivered_total - len(left), left=len(left), dropped=len(left) - kept)


def _even_batches(left: int, world_size: int, batch_size: int) -> int:
    """How many of ``left`` samples to keep so that every rank gets the same number of batches
    (its share split into batches of ``batch_size``, the last partial): all, unless the last
    round of batches would have fewer samples than ranks; then that round is dropped."""
    rounds = -(-left // (world_size * batch_size))
    if rounds and left // world_size <= (rounds - 1) * batch_size:
        return (rounds - 1) * world_size * batch_size
    return left


def _remainder_share(shard_sizes: tuple[int, ...], left: list[int], *, rank: int, world_size: int, batch_size: int,
                     num_streams: int, seed: int, epoch: int, shuffle_window: int, generation: int) -> EpochPlan:
    lo, hi = len(left) * rank // world_size, len(left) * (rank + 1) // world_size
    return EpochPlan(shard_sizes=tuple(shard_sizes), shard_order=_shard_order(len(shard_sizes), seed, epoch),
                     first=0, stop=hi - lo, batch_size=batch_size, num_streams=num_streams,
                     shuffle_window=max(1, shuffle_window), seed_parts=(seed, epoch, rank, generation),
                     world_size=world_size, positions=tuple(left[lo:hi]))
