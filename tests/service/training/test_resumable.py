"""Which checkpoints a config can resume, decided on the driver before any worker starts: from
the newest checkpoint's train_state.json in the run's storage."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import pyarrow.fs
import pytest

from service.config import ConfigError, PretrainConfig, with_overrides
from service.training.checkpoints import STATE_FILE, TrainState, check_resumable
from service.training.resume import newest_train_state

LOADER_STATE = {"format": "convmae-train-loader", "version": 1, "epoch": 2, "seed": 0, "world_size": 2,
                "batch_size": 16, "num_streams": 2, "shuffle_window": 512, "num_samples": 1617,
                "batches_consumed": 7, "corrupt_samples": 0, "reshards": []}


def config(**overrides) -> PretrainConfig:
    return with_overrides(PretrainConfig(), {"run_name": "r", "dist.num_workers": 2, "dist.zero_stage": 2,
                                             "train.batch_size_per_worker": 16, "data.loader_workers": 2,
                                             "train.seed": 0, **overrides})


def saved(**fields) -> dict:
    return asdict(TrainState(**{"epoch": 2, "optimizer_step": 107, "world_size": 2, "zero_stage": 2,
                                "loader_state": dict(LOADER_STATE), **fields}))


def test_another_number_of_workers_resumes_and_says_it_will_reshard(caplog):
    with caplog.at_level(logging.INFO, logger="service.training.checkpoints"):
        for workers in (1, 3):
            check_resumable(saved(), config(**{"dist.num_workers": workers}), "runs/r")
    assert "from a checkpoint of 2 worker(s) on 1" in caplog.text and "resharded" in caplog.text
    check_resumable(None, config(), "runs/r")  # nothing to resume yet
    check_resumable(saved(zero_stage=None, world_size=0), config(), "runs/r")  # older checkpoints: nothing recorded


def test_another_zero_stage_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match=r"ZeRO-2 \(dist.zero_stage=3 now\).*--dist.zero_stage 2.*new run_name"):
        check_resumable(saved(), config(**{"dist.zero_stage": 3}), "runs/r")


@pytest.mark.parametrize("override,match", [
    ({"train.batch_size_per_worker": 8}, r"epoch 3.*batch_size 16 then, 8 now.*--train.batch_size_per_worker 16"),
    ({"data.loader_workers": 4}, r"num_streams 2 then, 4 now.*--data.loader_workers 2"),
    ({"data.shuffle_buffer": 64}, r"--data.shuffle_buffer 512"),
    ({"train.seed": 5}, r"--train.seed 0"),
])
def test_mid_epoch_the_settings_that_fix_the_rest_of_the_epoch_must_stay(override, match):
    with pytest.raises(ConfigError, match=match):
        check_resumable(saved(), config(**override), "runs/r")
    check_resumable(saved(loader_state=None), config(**override), "runs/r")  # at an epoch boundary: fine


def test_the_driver_reads_the_newest_checkpoint_by_training_position(tmp_path):
    fs = pyarrow.fs.LocalFileSystem()
    for name, step in (("checkpoint_2026-01-01_00-00-03", 40), ("checkpoint_2026-01-01_00-00-01", 80),
                       ("checkpoint_2026-01-01_00-00-02", 60)):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_text(json.dumps(saved(optimizer_step=step)))
    (tmp_path / "checkpoint_2026-01-01_00-00-04").mkdir()  # incomplete: no train state
    (tmp_path / "checkpoint_2026-01-01_00-00-05").mkdir()
    (tmp_path / "checkpoint_2026-01-01_00-00-05" / STATE_FILE).write_text("{not json")
    assert newest_train_state(str(tmp_path), fs, STATE_FILE)["optimizer_step"] == 80
    assert newest_train_state(str(tmp_path / "none"), fs, STATE_FILE) is None


TRAINS = {"data": "/data/digits/train", "model": "convmae_tiny at 96 px"}


@pytest.mark.parametrize("now,named", [({**TRAINS, "data": "/data/photos"}, "data /data/digits/train, not /data/photos"),
                                       ({**TRAINS, "model": "convmae_small at 96 px"},
                                        "model convmae_tiny at 96 px, not convmae_small at 96 px")])
def test_another_runs_checkpoints_are_refused_naming_what_differs(now, named):
    with pytest.raises(ConfigError, match=f"run_name='r' is another run's: .*{named}.*--run_name NAME"):
        check_resumable(saved(trains=TRAINS), config(), "runs/r", now)


def test_the_same_run_and_older_checkpoints_resume():
    check_resumable(saved(trains=TRAINS), config(), "runs/r", dict(TRAINS))
    check_resumable(saved(), config(), "runs/r", {**TRAINS, "data": "/data/photos"})  # nothing recorded


def test_pretraining_other_data_under_a_used_run_name_stops_before_ray_and_mlflow(digits_dir, tmp_path):
    """The README's path: the zero-flag run, then `pretrain.py --data.url <your shards>`: with the
    same (default) run_name it resumed the finished digits run and registered that model under the
    new data's name."""
    from mlflow import MlflowClient

    from service.training.pretrain import run_pretraining

    base = {"data.embedded_dir": str(digits_dir), "checkpoint.storage_path": str(tmp_path / "runs"),
            "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlruns.db", "model.img_size": 32}
    first = with_overrides(PretrainConfig(), base)
    folder = tmp_path / "runs" / first.run_name / "checkpoint_2026-01-01_00-00-00"
    folder.mkdir(parents=True)
    digits_train = str(digits_dir / "digits" / "train")
    (folder / STATE_FILE).write_text(json.dumps(asdict(TrainState(
        epoch=12, optimizer_step=600, world_size=1, zero_stage=2,
        trains={"data": digits_train, "model": "convmae_tiny at 32 px"}))))
    other_data = digits_dir / "digits" / "val"
    other = with_overrides(first, {"data.url": str(other_data)})  # other data, same run_name
    with pytest.raises(ConfigError, match=rf"is another run's: .*data {digits_train}, not {other_data}"):
        run_pretraining(other)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")  # no run opened, none changed
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
