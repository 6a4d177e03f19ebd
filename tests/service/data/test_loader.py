"""Loaders over local and in-memory data sets: batch format, determinism, equal lengths, the
pixel limit."""

from __future__ import annotations

import io
import itertools
import struct
import zlib

import fsspec
import pytest
import torch
from PIL import Image

from service.data import DataError, build_eval_loader, build_train_loader, open_dataset
from service.data.loader import close_worker_pool, worker_pool_in_use
from service.data.prepare import prepare_dataset, write_dataset
from service.data.sources import MemorySource
from service.data.streams import finish_batch
from service.data.transforms import eval_transform, normalize_batch
from tests.service.data.conftest import config, image_bytes, storage


def keys_of(loader) -> list[list[str]]:
    return [batch["keys"] for batch in loader]


def test_zero_config_trains_on_the_embedded_digits(embedded_dir):
    loader = build_train_loader(storage=storage(), cfg=config(embedded_dir=str(embedded_dir)), img_size=32,
                                batch_size=50, rank=0, world_size=1, seed=0, epoch=0)
    assert len(loader) == 1617 // 50
    batch = next(iter(loader))
    assert set(batch) == {"images", "labels", "keys"}
    assert batch["images"].shape == (50, 3, 32, 32)
    assert batch["labels"].min() >= 0 and batch["labels"].max() <= 9
    assert abs(batch["images"].mean().item()) < 3 and batch["images"].std() > 0.1


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_and_epoch_give_identical_batches_other_epochs_another_order(digits_train, workers):
    def run(epoch, seed=0):
        loader = build_train_loader(storage=storage(), cfg=config(url=digits_train, loader_workers=workers), img_size=16,
                                    batch_size=32, rank=1, world_size=3, seed=seed, epoch=epoch)
        return list(loader)

    first, again = run(0), run(0)
    assert [b["keys"] for b in first] == [b["keys"] for b in again]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, again))
    assert [b["keys"] for b in run(1)] != [b["keys"] for b in first]
    assert [b["keys"] for b in run(0, seed=1)] != [b["keys"] for b in first]


def test_worker_count_does_not_change_what_a_rank_reads(digits_train):
    def keys(workers):
        loader = build_train_loader(storage=storage(), cfg=config(url=digits_train, loader_workers=workers), img_size=8,
                                    batch_size=16, rank=0, world_size=2, seed=3, epoch=1)
        return sorted(k for batch in loader for k in batch["keys"])

    assert keys(0) == keys(2)


def test_every_rank_gets_the_same_number_of_batches_even_with_uneven_shards(tmp_path,
                                                                          make_image_folder):
    src = make_image_folder(classes=2, per_class=23)  # 46 images
    prepare_dataset(str(src), str(tmp_path / "ds"), samples_per_shard=7)  # 6x7 + 4
    for world in (1, 2, 3, 5):
        lengths = []
        for rank in range(world):
            loader = build_train_loader(storage=storage(), cfg=config(url=str(tmp_path / "ds"), loader_workers=2),
                                        img_size=8, batch_size=4, rank=rank, world_size=world,
                                        seed=0, epoch=0)
            lengths.append((len(loader), len(list(loader))))
        assert lengths == [(46 // world // 4, 46 // world // 4)] * world


def test_resume_with_in_process_loading(digits_train):
    cfg = config(url=digits_train)
    reference = keys_of(build_train_loader(cfg, storage=storage(), img_size=8, batch_size=64, rank=0, world_size=1,
                                           seed=0, epoch=2))
    loader = build_train_loader(cfg, storage=storage(), img_size=8, batch_size=64, rank=0, world_size=1, seed=0,
                                epoch=2)
    batches = iter(loader)
    head = [next(batches)["keys"] for _ in range(5)]
    state = loader.state_dict()
    resumed = build_train_loader(cfg, storage=storage(), img_size=8, batch_size=64, rank=0, world_size=1, seed=0,
                                 epoch=2, resume_state=state)
    assert head + keys_of(resumed) == reference
    assert keys_of(resumed) == []  # the epoch is used up


def test_an_epoch_resumed_on_1_then_3_ranks_after_2_reads_each_image_once(tmp_path, make_image_folder):
    src = make_image_folder(classes=3, per_class=23)  # 69 images: 2 ranks x 8 batches of 4, 5 left out
    prepare_dataset(str(src), str(tmp_path / "ds"), samples_per_shard=7)
    cfg = config(url=str(tmp_path / "ds"), loader_workers=2, shuffle_buffer=5)

    def loader(rank, world, resume_state=None):
        return build_train_loader(cfg, storage=storage(), img_size=8, batch_size=4, rank=rank, world_size=world,
                                  seed=1, epoch=3, resume_state=resume_state)

    def read(loader_, batches=None):
        keys = [k for batch in itertools.islice(loader_, batches) for k in batch["keys"]]
        return keys, loader_.state_dict()

    whole_epoch = [k for rank in range(2) for k in read(loader(rank, 2))[0]]  # what 2 ranks would read
    seen, states = [], []
    for rank in range(2):  # 2 ranks read 3 batches each, then stop
        keys, state = read(loader(rank, 2), 3)
        seen += keys
        states.append(state)
    assert states[0] == states[1]
    one = loader(0, 1, resume_state=states[0])  # 1 rank: the 40 left, in 10 batches; it reads 4
    assert len(one) == 10 and one.batches_consumed == 0
    keys, state = read(one, 4)
    seen += keys
    three = [loader(rank, 3, resume_state=state) for rank in range(3)]  # 3 ranks: 24 left, 2 batches each
    assert [len(rest) for rest in three] == [2, 2, 2]
    for rest in three:
        seen += read(rest)[0]
    assert len(seen) == len(set(seen)) == len(whole_epoch)  # nothing twice, nothing skipped
    assert set(seen) == set(whole_epoch)

    # Resuming a resharded epoch at the same size goes on where it stopped.
    again = loader(0, 1, resume_state=states[0])
    first_two, mid = read(again, 2)
    assert loader(0, 1, resume_state=mid).batches_consumed == 2
    assert first_two + read(loader(0, 1, resume_state=mid))[0] == read(loader(0, 1, resume_state=states[0]))[0]


def test_a_state_saved_with_another_batch_size_is_refused_also_on_other_ranks(digits_train):
    cfg = config(url=digits_train)
    state = build_train_loader(cfg, storage=storage(), img_size=8, batch_size=64, rank=0, world_size=2, seed=0,
                               epoch=0).state_dict()
    with pytest.raises(DataError, match=r"batch_size: saved 64, now 32"):
        build_train_loader(cfg, storage=storage(), img_size=8, batch_size=32, rank=0, world_size=1, seed=0,
                           epoch=0, resume_state=state)


def test_memory_urls_work(digits_val):
    fs = fsspec.filesystem("memory")
    local = fsspec.filesystem("file")
    for path in local.ls(digits_val, detail=False):
        fs.pipe_file(f"/digits-val/{path.rsplit('/', 1)[1]}", local.cat_file(path))
    try:
        dataset = open_dataset("memory://digits-val", storage())
        assert dataset.num_samples == 180
        loader = build_eval_loader("memory://digits-val", config(loader_workers=2), storage=storage(), img_size=8,
                                   batch_size=50)
        assert sorted(len(b["keys"]) for b in loader) == [30, 50, 50, 50]
    finally:
        fs.rm("/digits-val", recursive=True)


def test_unlabeled_data_sets_give_minus_one_labels(tmp_path, make_image_folder):
    src = make_image_folder(classes=0, per_class=12)
    prepare_dataset(str(src), str(tmp_path / "flat"))
    loader = build_train_loader(storage=storage(), cfg=config(url=str(tmp_path / "flat")), img_size=8, batch_size=4,
                                rank=0, world_size=1, seed=0, epoch=0)
    assert {label for batch in loader for label in batch["labels"].tolist()} == {-1}


def test_eval_is_unaugmented_and_repeatable(digits_val):
    loader = build_eval_loader(digits_val, config(), storage=storage(), img_size=32, batch_size=64)
    first, second = list(loader), list(loader)
    assert len(first) == len(loader) == 3
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, second))


def test_workers_hand_over_uint8_pixels_and_batches_arrive_normalised(digits_val):
    """The workers' batches cross process boundaries as uint8; the loader normalises them in
    the training process, to the same floats as decoding there."""
    def by_key(workers):
        loader = build_eval_loader(digits_val, config(loader_workers=workers), storage=storage(), img_size=16,
                                   batch_size=64)
        batches = list(loader)
        assert all(b["images"].dtype == torch.float32 for b in batches)
        return {k: image for b in batches for k, image in zip(b["keys"], b["images"])}

    in_process, from_workers = by_key(0), by_key(2)
    assert in_process.keys() == from_workers.keys()
    assert all(torch.equal(in_process[k], from_workers[k]) for k in in_process)
    dataset = open_dataset(digits_val, storage())
    sample = next(iter(dataset.read(0, 0, 1)))
    with Image.open(io.BytesIO(sample.image)) as img:
        expected = normalize_batch(eval_transform(16).geometry(img).unsqueeze(0))[0]
    torch.testing.assert_close(in_process[sample.key], expected)
    handed_over = finish_batch([torch.zeros(3, 16, 16, dtype=torch.uint8)], [0], ["k"], [], 1, 16, False)
    assert handed_over["images"].dtype == torch.uint8  # what a worker's batch carries


def test_too_few_samples_for_the_cluster_is_a_clear_error(digits_val):
    with pytest.raises(DataError, match="180 samples: too few for world_size=4 x batch_size=64"):
        build_train_loader(storage=storage(), cfg=config(url=digits_val), img_size=8, batch_size=64, rank=0,
                           world_size=4, seed=0, epoch=0)


def test_local_paths_that_are_not_data_sets_are_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/nope: no such prefix or directory"):
        open_dataset(str(tmp_path / "nope"), storage())
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not a prepared data set.*prepare_data.py") as err:
        open_dataset(f"file://{tmp_path}/photos", storage())
    # The shards it suggests go beside the source folder, not into it.
    assert f"prepare_data.py file://{tmp_path}/photos file://{tmp_path}/photos-shards," in str(err.value)
    with pytest.raises(DataError, match="data URL is empty"):
        open_dataset("", storage())


def huge_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of ``width`` x ``height``: a few KB on disk however large,
    but decoding it would take width x height bytes (x3 as RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_images_over_the_pixel_limit_are_skipped_counted_and_never_decoded(tmp_path, caplog):
    bomb = huge_png(13000, 13000)
    assert len(bomb) < 300_000
    items = [(f"ok{i}", "png", image_bytes(i, (20, 20), "PNG"), 0) for i in range(7)]
    items += [("big", "png", image_bytes(9, (40, 40), "PNG"), 0), ("bomb", "png", bomb, 0)]
    write_dataset(MemorySource("test", items), str(tmp_path / "ds"))
    url = str(tmp_path / "ds")

    with caplog.at_level("WARNING", logger="service.data"):
        loader = build_train_loader(storage=storage(), cfg=config(url=url), img_size=16, batch_size=9, rank=0,
                                    world_size=1, seed=0, epoch=0)
        (batch,) = list(loader)  # the default limit, 8192 x 8192
    assert loader.corrupt_samples == 1 and "bomb" not in batch["keys"] and "big" in batch["keys"]
    assert batch["images"].shape == (9, 3, 16, 16)  # the slot refilled, as for corrupt images
    assert ("skipped image 'bomb'" in caplog.text
            and "13000x13000 is 169000000 pixels, over data.max_image_pixels=67108864; not decoded" in caplog.text)

    # The limit is data.max_image_pixels; evaluation leaves such images out too.
    small = config(url=url, max_image_pixels=20 * 20)
    evaluated = build_eval_loader(url, small, storage=storage(), img_size=16, batch_size=9)
    keys = [k for b in evaluated for k in b["keys"]]
    assert sorted(keys) == [f"ok{i}" for i in range(7)] and evaluated.corrupt_samples == 2


def test_persistent_workers_serve_consecutive_epochs_exactly_once_as_fresh_workers_would(digits_train):
    def epoch(number):
        loader = build_train_loader(config(url=digits_train, loader_workers=2), storage=storage(), img_size=8,
                                    batch_size=32, rank=0, world_size=1, seed=0, epoch=number)
        return len(loader), list(loader)

    close_worker_pool()
    build_train_loader(config(url=digits_train, loader_workers=2), storage=storage(), img_size=8,
                       batch_size=32, rank=0, world_size=1, seed=0, epoch=0)
    assert worker_pool_in_use() is not None  # building a loader already starts its workers
    served = [epoch(e) for e in range(3)]
    pool = worker_pool_in_use()
    assert pool is not None and pool.restarts == 0  # each epoch continued where the last ended
    for length, batches in served:
        keys = [k for b in batches for k in b["keys"]]
        assert len(batches) == length == 1617 // 32 and len(set(keys)) == len(keys) == length * 32
    assert [b["keys"] for b in served[1][1]] != [b["keys"] for b in served[0][1]]
    close_worker_pool()
    _, fresh = epoch(1)  # new processes, straight into epoch 1
    assert [b["keys"] for b in fresh] == [b["keys"] for b in served[1][1]]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(fresh, served[1][1]))
    close_worker_pool()


@pytest.mark.parametrize("detour", [False, True])
def test_resume_mid_epoch_with_persistent_workers(digits_train, detour):
    cfg = config(url=digits_train, loader_workers=2)

    def loader(epoch, state=None):
        return build_train_loader(cfg, storage=storage(), img_size=8, batch_size=32, rank=1, world_size=2,
                                  seed=4, epoch=epoch, resume_state=state)

    reference = keys_of(loader(1))
    interrupted = loader(1)
    batches = iter(interrupted)
    head = [next(batches)["keys"] for _ in range(5)]
    state = interrupted.state_dict()
    batches.close()
    if detour:  # the workers move on to another epoch before the resume
        next(iter(loader(3)))
    assert head + keys_of(loader(1, state)) == reference
    close_worker_pool()
