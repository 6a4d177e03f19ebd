"""Resuming on the real stack (local Ray cluster, DeepSpeed over gloo) from the newest intact
checkpoint: after a stop that left the newest checkpoint unregistered with Ray (Ctrl-C), past a
damaged newest checkpoint, past one holding a file that would run code when unpickled, past
Ray's run snapshot emptied by a full disk or naming a checkpoint outside the run, past a newest
checkpoint whose content does not load, and failing clearly when no checkpoint is intact."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow.fs
import pytest
from ray.train import UserCallback

from service.config import with_overrides
from service.runtime.safe_checkpoint import CheckpointError, write_manifest
from service.training.pretrain import run_pretraining
from service.training.resume import RunStorage, snapshot_problem
from tests.service.runtime.test_safe_checkpoint import plant_payload
from tests.service.training.content_checkpoints import rng_of_another_type
from tests.service.training.test_pretrain_e2e import tiny_config

pytestmark = pytest.mark.e2e


class RecordReports(UserCallback):
    """Appends the step of every report, and whether it carried a checkpoint, to a file."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": metrics[0].get("step"), "checkpoint": checkpoint is not None}) + "\n")


def checkpoints_by_step(run_dir: Path) -> dict[int, list[Path]]:
    """The run's checkpoint folders by the optimizer step they recorded, oldest folder first."""
    out: dict[int, list[Path]] = {}
    for folder in sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()):
        step = json.loads((folder / "train_state.json").read_text())["optimizer_step"]
        out.setdefault(step, []).append(folder)
    return out


def forget_in_ray_snapshot(run_dir: Path, *folders: Path) -> None:
    """What a Ctrl-C between a worker's upload and the controller's registration leaves: the
    folder is on storage, but not in Ray's checkpoint manager snapshot."""
    path = run_dir / "checkpoint_manager_snapshot.json"
    snapshot = json.loads(path.read_text())
    names = {f.name for f in folders}
    keep = [i for i, r in enumerate(snapshot["checkpoint_results"]) if r["checkpoint_dir_name"] not in names]
    snapshot["checkpoint_results"] = [snapshot["checkpoint_results"][i] for i in keep]
    snapshot["checkpoint_report_indices"] = [snapshot["checkpoint_report_indices"][i] for i in keep]
    snapshot["latest_checkpoint_result"] = snapshot["checkpoint_results"][-1]
    path.write_text(json.dumps(snapshot))


def rerun(cfg, tmp_path: Path, max_steps: int, name: str) -> list[int]:
    """Runs ``cfg`` on to ``max_steps``; returns the steps of its checkpointed reports."""
    log = tmp_path / f"{name}.jsonl"
    run_pretraining(with_overrides(cfg, {"train.max_steps": max_steps}), callbacks=[RecordReports(str(log))])
    return [r["step"] for r in map(json.loads, log.read_text().splitlines()) if r["checkpoint"]]


def wait_for_output(capfd, *needles: str, timeout: float = 15.0) -> str:
    """Worker logs reach the driver's stderr asynchronously."""
    seen = ""
    deadline = time.monotonic() + timeout
    while True:
        out, err = capfd.readouterr()
        seen += out + err
        if all(n in seen for n in needles) or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


RUN = "safe-resume"


def config(tmp_path: Path, digits_dir: Path, max_steps: int = 10):
    return tiny_config(tmp_path, digits_dir, **{
        "run_name": RUN, "dist.num_workers": 1, "train.max_steps": max_steps, "train.knn_k": 0,
        "checkpoint.every_steps": 2, "checkpoint.keep_last": 10, "mlflow.enabled": False,
    })


@pytest.fixture(scope="module")
def finished_run(ray_cluster, digits_dir, tmp_path_factory) -> Path:
    """A 10-step run with checkpoints at steps 2, 4, 6, 8, 10 (all registered with Ray)."""
    root = tmp_path_factory.mktemp("finished")
    run_pretraining(config(root, digits_dir))
    assert sorted(checkpoints_by_step(root / "runs" / RUN)) == [2, 4, 6, 8, 10]
    # The snapshot Ray Train wrote passes the checks that set a damaged one aside.
    assert snapshot_problem(RunStorage(pyarrow.fs.LocalFileSystem(), str(root / "runs" / RUN))) is None
    return root / "runs"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> tuple[Path, dict[int, Path]]:
    """This test's own copy of the finished run: (run folder, checkpoint folder by step)."""
    shutil.copytree(finished_run, tmp_path / "runs")
    run_dir = tmp_path / "runs" / RUN
    return run_dir, {step: folders[0] for step, folders in checkpoints_by_step(run_dir).items()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_refuses_a_payload_and_skips_damage_in_the_newest_checkpoints(run_copy, digits_dir, tmp_path,
                                                                            capfd):
    """The newest checkpoint (Ray's latest, step 10) holds a payload, its checksums rewritten to
    match; the one before (8) is damaged. Both are named and skipped; resume from 6."""
    run_dir, by_step = run_copy
    marker = tmp_path / "MARKER"
    plant_payload(by_step[10], marker)
    write_manifest(by_step[10], rank=0, world_size=1)
    truncate(by_step[8] / "ds" / "mp_rank_00_model_states.pt")
    capfd.readouterr()
    try:
        steps = rerun(config(tmp_path, digits_dir), tmp_path, 12, "resumed")
    finally:
        assert not marker.exists(), "the payload ran"
    assert steps == [8, 10, 12]
    assert not list(run_dir.glob("checkpoint_manager_snapshot.json.corrupt-*"))  # Ray's own: kept
    refused = f"refusing to load checkpoint file {by_step[10]}/ds/mp_rank_00_model_states.pt: it needs posix.system"
    skipped = (f"skipping checkpoint {by_step[8]}: checkpoint {by_step[8]} is damaged or incomplete: "
               "ds/mp_rank_00_model_states.pt has")
    out = wait_for_output(capfd, refused, skipped)
    assert refused in out and skipped in out


def test_resume_takes_the_newest_checkpoint_on_storage_not_only_rays(run_copy, digits_dir, tmp_path):
    """After a Ctrl-C, step 10 is on storage but Ray registered only up to 8, which is damaged
    too: the rerun resumes from 10 (it resumed from 8, or died on it)."""
    run_dir, by_step = run_copy
    forget_in_ray_snapshot(run_dir, by_step[10])
    truncate(by_step[8] / "ds" / "mp_rank_00_model_states.pt")
    assert rerun(config(tmp_path, digits_dir), tmp_path, 12, "resumed") == [12]


def test_without_an_intact_checkpoint_the_run_fails_naming_them(run_copy, digits_dir, tmp_path):
    """Rather than starting over, or dying on DeepSpeed's bare assertion."""
    run_dir, by_step = run_copy
    for folder in by_step.values():
        shutil.rmtree(folder / "checksums", ignore_errors=True)
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from") as err:
        run_pretraining(config(tmp_path, digits_dir, max_steps=12))
    for folder in by_step.values():
        assert f"{folder}: checkpoint {folder} is damaged or incomplete: it has no checksums manifest" in str(err.value)


# The two below rerun Ray Train (75-80 s each on the shared 2-core machine): tests/service/training/
# test_resume_untrusted.py covers the same cases in the default run, without Ray.
@pytest.mark.slow
def test_a_rerun_resumes_past_an_empty_run_snapshot_and_a_newest_checkpoint_that_does_not_load(
        run_copy, digits_dir, tmp_path, capfd):
    """A full disk left Ray's run snapshot empty: every rerun failed (Ray Train's
    CheckpointManagerInitializationError). The newest checkpoint (10) passes its checksums but
    holds an RNG state of another type: it crashed the resume. The snapshot is set aside, 10 is
    skipped, naming why, and the run resumes from 8."""
    run_dir, by_step = run_copy
    (run_dir / "checkpoint_manager_snapshot.json").write_bytes(b"")
    rng_of_another_type(by_step[10])
    write_manifest(by_step[10], rank=0, world_size=1)
    capfd.readouterr()
    assert rerun(config(tmp_path, digits_dir), tmp_path, 12, "resumed") == [10, 12]
    skipped = f"skipping checkpoint {by_step[10]}: rng/rank_00000.pt holds a list as the torch RNG state"
    assert skipped in wait_for_output(capfd, skipped)
    assert len(list(run_dir.glob("checkpoint_manager_snapshot.json.corrupt-*"))) == 1


@pytest.mark.slow
def test_a_run_snapshot_naming_a_checkpoint_outside_the_run_is_not_resumed_from(run_copy, digits_dir, tmp_path):
    """Ray's snapshot names ``../../elsewhere`` as the latest checkpoint: a copy of step 6 whose
    train state claims step 50. The run resumed from it, silently; now from its own newest, 10."""
    run_dir, by_step = run_copy
    elsewhere = shutil.copytree(by_step[6], tmp_path / "elsewhere")
    state = json.loads((elsewhere / "train_state.json").read_text())
    (elsewhere / "train_state.json").write_text(json.dumps({**state, "optimizer_step": 50}))
    write_manifest(elsewhere, rank=0, world_size=1)
    path = run_dir / "checkpoint_manager_snapshot.json"
    snapshot = json.loads(path.read_text())
    outside = {**snapshot["latest_checkpoint_result"], "checkpoint_dir_name": "../../elsewhere"}
    assert (run_dir / outside["checkpoint_dir_name"]).resolve() == elsewhere
    snapshot["checkpoint_results"].append(outside)
    snapshot["checkpoint_report_indices"].append(max(snapshot["checkpoint_report_indices"]) + 1)
    snapshot["latest_checkpoint_result"] = outside
    path.write_text(json.dumps(snapshot))
    assert rerun(config(tmp_path, digits_dir), tmp_path, 12, "resumed") == [12]
