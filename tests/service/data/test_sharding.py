"""Epoch plans: exactly-once coverage, equal batch counts per rank, ordered delivery slots."""

from __future__ import annotations

import pytest

from service.data.errors import DataError
from service.data.sharding import plan_eval, plan_train_epoch, plan_train_remainder

SHARDS = (7, 30, 1, 13, 13, 22, 5)  # uneven on purpose; 91 samples


def positions(plan, streams: range | None = None) -> list[tuple[int, int]]:
    """(shard, index in shard) of every sample a plan reads, stream by stream."""
    out = []
    for stream in streams or range(plan.num_streams):
        start, stop = plan.stream_span(stream)
        for seg in plan.segments(start, stop):
            out.extend((seg.shard, i) for i in range(seg.start, seg.stop))
    return out


def train_plans(world: int, batch: int, streams: int, epoch: int = 0, seed: int = 0):
    return [plan_train_epoch(SHARDS, rank=r, world_size=world, batch_size=batch,
                             num_streams=streams, seed=seed, epoch=epoch, shuffle_window=8)
            for r in range(world)]


@pytest.mark.parametrize("world,batch,streams", [(1, 4, 1), (2, 4, 2), (3, 5, 4), (4, 2, 3)])
def test_train_ranks_have_equal_full_batches_and_disjoint_samples(world, batch, streams):
    plans = train_plans(world, batch, streams)
    expected_batches = sum(SHARDS) // world // batch
    assert {p.num_batches for p in plans} == {expected_batches}
    seen = [pos for p in plans for pos in positions(p)]
    assert len(seen) == len(set(seen)) == world * expected_batches * batch
    dropped = sum(SHARDS) - len(seen)
    assert 0 <= dropped < world * (batch + 1)


def test_train_streams_split_a_rank_into_contiguous_blocks_of_batches():
    plan = train_plans(2, 4, 3)[1]
    blocks = [plan.stream_batches(s) for s in range(3)]
    assert [b.start for b in blocks] == [0, blocks[0].stop, blocks[1].stop]
    assert blocks[-1].stop == plan.num_batches
    assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def test_delivery_slots_cover_every_batch_once_in_round_robin_order():
    plan = train_plans(1, 4, 3)[0]  # 91 samples: 22 batches of 4; streams of 8, 7 and 7 batches
    assert [len(plan.stream_batches(s)) for s in range(3)] == [8, 7, 7]
    by_slot = {plan.slot(s, k): (s, k) for s in range(3) for k in range(len(plan.stream_batches(s)))}
    assert sorted(by_slot) == list(range(22))
    # (stream, its k-th batch) in delivery order: one batch of each stream in turn.
    assert [by_slot[slot] for slot in range(22)] == [
        (0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2), (0, 3), (1, 3),
        (2, 3), (0, 4), (1, 4), (2, 4), (0, 5), (1, 5), (2, 5), (0, 6), (1, 6), (2, 6), (0, 7),
    ]


# Batches of streams 0, 1 and 2 delivered before a slot, counted on the order above.
BEFORE_SLOT = {0: (0, 0, 0), 1: (1, 0, 0), 2: (1, 1, 0), 3: (1, 1, 1), 5: (2, 2, 1), 7: (3, 2, 2),
               21: (7, 7, 7), 22: (8, 7, 7)}


@pytest.mark.parametrize("first_slot", sorted(BEFORE_SLOT))
def test_first_batch_counts_the_stream_batches_delivered_before_a_slot(first_slot):
    plan = train_plans(1, 4, 3)[0]
    assert tuple(plan.first_batch(s, first_slot) for s in range(3)) == BEFORE_SLOT[first_slot]


def test_epochs_reorder_shards_and_drop_different_samples():
    kept = [set(pos for p in train_plans(2, 8, 2, epoch=e) for pos in positions(p)) for e in range(4)]
    everything = {(s, i) for s, n in enumerate(SHARDS) for i in range(n)}
    dropped = [frozenset(everything - k) for k in kept]
    assert len(set(dropped)) > 1
    same = train_plans(2, 8, 2, epoch=1)
    assert [p.shard_order for p in same] == [p.shard_order for p in train_plans(2, 8, 2, epoch=1)]
    assert same[0].shard_order != train_plans(2, 8, 2, epoch=2)[0].shard_order


def test_window_order_is_a_deterministic_permutation():
    plan = train_plans(1, 4, 1)[0]
    order = plan.window_order(0, 3, 8)
    assert sorted(order) == list(range(8))
    assert order == plan.window_order(0, 3, 8)
    assert order != plan.window_order(0, 4, 8)
    assert order != list(range(8))
    unshuffled = plan_eval(SHARDS, rank=0, world_size=1, batch_size=4, num_streams=1)
    assert unshuffled.window_order(0, 3, 8) == list(range(8))


@pytest.mark.parametrize("world,batch,streams", [(1, 10, 1), (3, 4, 2), (5, 7, 3), (200, 4, 2)])
def test_eval_covers_every_sample_exactly_once(world, batch, streams):
    plans = [plan_eval(SHARDS, rank=r, world_size=world, batch_size=batch, num_streams=streams)
             for r in range(world)]
    seen = [pos for p in plans for pos in positions(p)]
    assert sorted(seen) == sorted((s, i) for s, n in enumerate(SHARDS) for i in range(n))
    assert max(p.num_samples for p in plans) - min(p.num_samples for p in plans) <= 1


def test_too_small_a_data_set_for_the_cluster_is_refused_with_numbers():
    with pytest.raises(DataError, match=r"91 samples.*world_size=8.*batch_size=16"):
        plan_train_epoch(SHARDS, rank=0, world_size=8, batch_size=16, num_streams=1, seed=0,
                         epoch=0, shuffle_window=1)


@pytest.mark.parametrize("kwargs,match", [({"rank": 2, "world_size": 2}, "rank=2"),
                                          ({"batch_size": 0}, "batch_size=0"),
                                          ({"world_size": 0, "rank": 0}, "world_size=0")])
def test_bad_arguments_are_named(kwargs, match):
    args = {"rank": 0, "world_size": 1, "batch_size": 4, "num_streams": 1, "seed": 0,
            "epoch": 0, "shuffle_window": 1, **kwargs}
    with pytest.raises(DataError, match=match):
        plan_train_epoch(SHARDS, **args)


def delivered(plan, batches: int) -> list[int]:
    """Epoch positions of the first ``batches`` delivery slots of a rank (plan indices mapped)."""
    out = []
    for stream in range(plan.num_streams):
        done = min(plan.first_batch(stream, batches), len(plan.stream_batches(stream)))
        out.extend(plan.emission_order(stream)[: done * plan.batch_size])
    return [plan.positions[i] for i in out] if plan.positions is not None else out


def remainder_plans(world, history, batch, streams):
    return [plan_train_remainder(SHARDS, rank=r, world_size=world, batch_size=batch, num_streams=streams,
                                 seed=3, epoch=2, shuffle_window=8, history=history) for r in range(world)]


@pytest.mark.parametrize("batch,streams,chain", [
    (4, 1, [(2, 3), (1, 4), (3, None)]),   # 2 -> 1 -> 3 ranks
    (4, 3, [(2, 5), (1, 7), (3, None)]),   # streams: slots interleave the streams' batches
    (3, 2, [(3, 2), (2, 1), (4, None)]),
    (5, 2, [(1, 0), (2, 2), (1, None)]),   # nothing read yet when first resharded
])
def test_an_epoch_resharded_mid_way_reads_every_sample_once(batch, streams, chain):
    first_world, consumed = chain[0]
    first = train_plans(first_world, batch, streams, epoch=2, seed=3)
    everything = [pos for p in first for pos in positions_of(p)]  # what the epoch would have read
    read = [pos for p in first for pos in delivered(p, consumed)]
    history = [chain[0]]
    dropped = 0
    for world, consumed in chain[1:]:
        plans = remainder_plans(world, history, batch, streams)
        assert len({p.plan.num_batches for p in plans}) == 1  # equal batch counts: DeepSpeed's steps
        assert {p.dropped for p in plans} == {plans[0].dropped} and plans[0].dropped < world
        assert plans[0].read == len(read)
        dropped += plans[0].dropped
        take = plans[0].plan.num_batches if consumed is None else consumed
        read += [pos for p in plans for pos in delivered(p.plan, take)]
        history.append((world, take))
    assert len(read) == len(set(read))  # nothing twice
    assert len(set(everything) - set(read)) == dropped  # nothing skipped but the dropped
    assert set(read) <= set(everything)


def positions_of(plan) -> list[int]:
    return [i for s in range(plan.num_streams) for i in plan.emission_order(s)]


def test_a_remainder_too_small_for_one_sample_per_rank_is_dropped_and_counted():
    # 2 ranks x 11 batches of 4 (88 samples); each read 10 batches: 8 left. On 3 ranks of batch
    # 4: 2 or 3 samples each = 1 batch each. On 9 ranks: the 8 cannot give every rank one.
    for world, batches, dropped in ((3, 1, 0), (9, 0, 8)):
        plans = remainder_plans(world, [(2, 10)], 4, 1)
        assert plans[0].left == 8 and plans[0].read == 80
        assert {p.plan.num_batches for p in plans} == {batches}
        assert plans[0].dropped == dropped
