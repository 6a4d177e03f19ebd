"""Resuming treats everything on storage as untrusted input: Ray Train's run snapshot when it is
unreadable or names checkpoints outside the run, checkpoint folders outside the run, and
checkpoints whose files pass their checksums but whose content does not fit (``service.training
.resume``, ``service.training.checkpoints.restore``). On real files: a local folder and the S3
server, and real DeepSpeed checkpoints (tests/service/training/content_checkpoints.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs
import pytest
import ray
from ray.train import Checkpoint

from service.config import StorageConfig
from service.training.checkpoints import STATE_FILE
from service.training.launch import storage_location
from service.training.resume import (
    RAY_SNAPSHOT,
    RunStorage,
    find_candidates,
    newest_train_state,
    set_aside_unusable_snapshot,
    snapshot_problem,
)
from tests.service.training.content_checkpoints import NEWER, OLDER

RUN = "r"


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> RunStorage:
    """The folder of run ``r`` under runs/, on local disk or in a bucket of the S3 server."""
    if request.param == "local":
        (tmp_path / "runs" / RUN).mkdir(parents=True)
        return RunStorage(pyarrow.fs.LocalFileSystem(), str(tmp_path / "runs" / RUN))
    root, fs = storage_location(f"{request.getfixturevalue('s3_bucket')}/runs", StorageConfig())
    return RunStorage(fs, f"{root}/{RUN}")


def write(storage: RunStorage, path: str, data: bytes) -> None:
    folder = path.rsplit("/", 1)[0]
    storage.fs.create_dir(folder, recursive=True)
    with storage.fs.open_output_stream(path) as f:
        f.write(data)


def add_checkpoint(storage: RunStorage, folder: str, step: int) -> str:
    """A checkpoint folder (train state only: what choosing among them reads) at ``folder``."""
    write(storage, f"{folder}/{STATE_FILE}", json.dumps({"optimizer_step": step}).encode())
    return folder


def ray_snapshot(*names: str) -> dict:
    """Ray Train's snapshot of a run whose checkpoints are ``names`` (the last the latest)."""
    results = [{"version": 0, "checkpoint_dir_name": name, "metrics": {"step": i}} for i, name in enumerate(names)]
    return {"ray_version": ray.__version__, "checkpoint_results": results,
            "checkpoint_report_indices": list(range(len(names))),
            "latest_checkpoint_result": results[-1] if results else None, "pending_training_results": [],
            "pending_validation_specs": [], "current_report_index": len(names),
            "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
            "failed_validation_checkpoint_dir_names": []}


def snapshot_path(storage: RunStorage) -> str:
    return f"{storage.folder}/{RAY_SNAPSHOT}"


def set_aside_ones(storage: RunStorage) -> list[str]:
    infos = storage.fs.get_file_info(pyarrow.fs.FileSelector(storage.folder))
    return [i.base_name for i in infos if i.base_name.startswith(f"{RAY_SNAPSHOT}.corrupt-")]


def test_an_empty_snapshot_is_set_aside_and_the_run_resumes_from_its_folder(storage, caplog):
    """What a full disk left: Ray Train refused every rerun (CheckpointManagerInitializationError)."""
    add_checkpoint(storage, f"{storage.folder}/{OLDER}", 2)
    write(storage, snapshot_path(storage), b"")
    with caplog.at_level(logging.WARNING, logger="service.training.resume"):
        assert set_aside_unusable_snapshot(storage) == "it is empty (0 bytes)"
    assert storage.fs.get_file_info(snapshot_path(storage)).type == pyarrow.fs.FileType.NotFound
    assert len(set_aside_ones(storage)) == 1
    assert RAY_SNAPSHOT in caplog.text and "it is empty (0 bytes)" in caplog.text
    assert newest_train_state(storage.folder, storage.fs, STATE_FILE) == {"optimizer_step": 2}
    assert set_aside_unusable_snapshot(storage) is None  # nothing left to set aside


@pytest.mark.parametrize("content,why", [
    (b"{\"checkpoint_res", "it is not JSON"),
    (b"\xff\xfe", "it is not JSON"),
    (b"[]", "it holds a JSON list, not an object"),
    (json.dumps({**ray_snapshot(OLDER), "checkpoint_results": "all"}).encode(),
     "its checkpoint_results is not a list"),
    (json.dumps({**ray_snapshot(OLDER), "checkpoint_report_indices": []}).encode(), "differ in length"),
    (json.dumps({**ray_snapshot(OLDER), "latest_checkpoint_result": {"checkpoint_dir_name": NEWER, "metrics": {}}})
     .encode(), f"it names checkpoint '{NEWER}' outside its checkpoint_results"),
    (json.dumps({**ray_snapshot(OLDER), "current_report_index": "one"}).encode(), "current_report_index"),
    (json.dumps({**ray_snapshot(OLDER), "pending_validation_specs": [7], "pending_training_results": [
        {"checkpoint_dir_name": OLDER, "metrics": {}}]}).encode(), "pending_validation_specs"),
], ids=["cut-off", "not-utf8", "a-list", "results-not-a-list", "indices-short", "latest-unlisted",
        "index-not-a-number", "pending-spec-not-a-spec"])
def test_a_snapshot_of_another_shape_is_set_aside(storage, content, why):
    add_checkpoint(storage, f"{storage.folder}/{OLDER}", 2)
    write(storage, snapshot_path(storage), content)
    assert why in set_aside_unusable_snapshot(storage)
    assert set_aside_ones(storage) and storage.fs.get_file_info(snapshot_path(storage)).type == \
        pyarrow.fs.FileType.NotFound


def test_a_snapshot_naming_a_checkpoint_outside_the_run_is_set_aside(storage):
    """``../../elsewhere``, an absolute path: Ray Train would hand the workers that folder."""
    elsewhere = add_checkpoint(storage, storage.folder.rsplit("/", 2)[0] + "/elsewhere", 50)
    add_checkpoint(storage, f"{storage.folder}/{OLDER}", 2)
    for name in ("../../elsewhere", "/" + elsewhere.lstrip("/"), f"{OLDER}/../../../elsewhere"):
        write(storage, snapshot_path(storage), json.dumps(ray_snapshot(OLDER, name)).encode())
        problem = snapshot_problem(storage)
        assert problem is not None and f"it names checkpoint {name!r}, which is outside the run's folder" in problem
    assert set_aside_unusable_snapshot(storage) is not None
    assert storage.fs.get_file_info(snapshot_path(storage)).type == pyarrow.fs.FileType.NotFound


def test_a_snapshot_naming_a_checkpoint_no_longer_there_is_set_aside(storage):
    """As after moving a damaged checkpoint away: Ray Train refused the run."""
    add_checkpoint(storage, f"{storage.folder}/{OLDER}", 2)
    write(storage, snapshot_path(storage), json.dumps(ray_snapshot(OLDER, NEWER)).encode())
    assert snapshot_problem(storage) == f"it names checkpoint {NEWER!r}, which is not there"


def test_a_sound_snapshot_is_kept(storage):
    add_checkpoint(storage, f"{storage.folder}/{OLDER}", 2)
    add_checkpoint(storage, f"{storage.folder}/{NEWER}", 4)
    content = json.dumps(ray_snapshot(OLDER, NEWER)).encode()
    write(storage, snapshot_path(storage), content)
    assert set_aside_unusable_snapshot(storage) is None
    with storage.fs.open_input_stream(snapshot_path(storage)) as f:
        assert f.read() == content
    assert not set_aside_ones(storage)


def test_a_checkpoint_outside_the_run_is_never_a_candidate(storage, caplog):
    """Ray's pick from a snapshot naming ``../../elsewhere`` (a newer position than any in the
    run): refused, named in a warning; the run's own checkpoints are the candidates."""
    elsewhere = add_checkpoint(storage, f"{storage.folder}/../../elsewhere", 50)
    add_checkpoint(storage, f"{storage.folder}/{OLDER}", 2)
    reported = Checkpoint(path=elsewhere, filesystem=storage.fs)
    with caplog.at_level(logging.WARNING, logger="service.training.resume"):
        candidates = find_candidates(STATE_FILE, storage, reported)
    assert [(c.name, c.position) for c in candidates] == [(OLDER, (2, 0, 0))]
    assert f"refusing checkpoint {candidates[0].label.rsplit('/', 1)[0]}/../../elsewhere" in caplog.text
    assert "outside the run's folder" in caplog.text


def test_a_checkpoint_folder_linking_outside_the_run_is_refused(tmp_path, caplog):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / STATE_FILE).write_text(json.dumps({"optimizer_step": 50}))
    run = tmp_path / "runs" / RUN
    (run / OLDER).mkdir(parents=True)
    (run / OLDER / STATE_FILE).write_text(json.dumps({"optimizer_step": 2}))
    os.symlink(outside, run / NEWER)
    storage = RunStorage(pyarrow.fs.LocalFileSystem(), str(run))
    with caplog.at_level(logging.WARNING, logger="service.training.resume"):
        assert [c.name for c in find_candidates(STATE_FILE, storage)] == [OLDER]
        assert newest_train_state(str(run), storage.fs, STATE_FILE) == {"optimizer_step": 2}
    assert f"refusing checkpoint {run / NEWER}" in caplog.text


# ---------------------------------------------------------------- content that does not fit


@pytest.fixture(scope="module")
def content_cases(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("content")
    script = Path(__file__).with_name("content_checkpoints.py")
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case,why", [
    ("rng_of_another_type", "rng/rank_00000.pt holds a list as the torch RNG state, not a torch.uint8 tensor"),
    ("no_model_weights", "ds/mp_rank_00_model_states.pt holds no model weights"),
    ("a_weight_of_another_shape", "ds/mp_rank_00_model_states.pt holds encoder.pos_embed as (3,), the model's is"),
    ("train_state_of_another_type", "its train state is a str, not a mapping"),
    ("no_optimizer_state", "it does not load (AssertionError"),  # found by DeepSpeed's own loading
], ids=["rng", "no-weights", "a-shape", "train-state", "optimizer-state"])
def test_a_newest_checkpoint_that_does_not_load_gives_way_to_the_one_before(content_cases, case, why):
    out, report = content_cases
    assert report["intact"] == {"step": 4, "warnings": []}  # the newest, when nothing is wrong with it
    assert report[case]["step"] == 2
    [warning] = report[case]["warnings"]  # one: the newest, named, and why
    assert warning.startswith(f"skipping checkpoint {out / case / NEWER}: ") and why in warning


def test_when_no_checkpoint_loads_the_run_fails_naming_each(content_cases):
    out, report = content_cases
    error = report["none_loads"]["error"]
    assert error.startswith("DamagedCheckpointError: no intact checkpoint to resume from")
    for name in (NEWER, OLDER):
        assert f"{out / 'none_loads' / name}: ds/mp_rank_00_model_states.pt holds no model weights" in error
