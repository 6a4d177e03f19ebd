"""A sweep as its user runs it, `python jobs/tune.py`, with ASHA stopping a trial: the stopped
trial ends as what it is, and Ray's teardown of its Train run shows nowhere. Slow (a few
minutes: two trials, each a local Ray Train run): `pytest -m slow`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_an_asha_stopped_trial_ends_killed_stopped_by_asha_and_no_run_or_line_holds_an_actor_died_error(
    digits_dir, tmp_path
):
    from mlflow import MlflowClient

    from service.tracking import ERROR_TAG
    from service.tune.sweep import STOPPED_BY_TAG, TRIAL_TAG

    tracking_uri = f"sqlite:///{tmp_path}/mlruns.db"
    out = subprocess.run(
        [sys.executable, str(JOBS / "tune.py"), "--model.img_size", "32", "--data.embedded_dir", str(digits_dir),
         "--data.loader_workers", "0", "--train.epochs", "2", "--train.batch_size_per_worker", "16",
         "--train.warmup_epochs", "0.1", "--train.knn_train_samples", "256", "--dist.num_workers", "1",
         "--dist.use_gpu", "false", "--checkpoint.every_steps", "1000", "--mlflow.tracking_uri", tracking_uri,
         "--mlflow.experiment", "sweep-cli", "--mlflow.system_metrics", "false", "--mlflow.register", "false",
         "--sweep.name", "asha", "--sweep.storage_path", str(tmp_path / "sweeps"),
         # A learning rate that learns and one that cannot, one trial at a time (a fixed order,
         # so ASHA's verdict is fixed): ASHA stops the second at its first rung.
         "--sweep.space.train.blr", "grid [2.0e-3, 1.0e-8]", "--sweep.max_concurrent_trials", "1",
         "--sweep.objective", "val/recon_loss"],
        capture_output=True, text=True, timeout=1100, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ActorDiedError" not in out.stdout + out.stderr

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("sweep-cli").experiment_id
    trials = {r.data.tags[TRIAL_TAG]: r for r in client.search_runs([experiment]) if TRIAL_TAG in r.data.tags}
    [completed, stopped] = sorted(trials)  # trial 0 learns, trial 1 (blr 1e-8) is stopped
    assert {t: trials[t].data.tags[ERROR_TAG] for t in trials if ERROR_TAG in trials[t].data.tags} == {}
    assert (trials[stopped].info.status, trials[stopped].data.tags.get(STOPPED_BY_TAG)) == ("KILLED", "asha")
    assert (trials[completed].info.status, trials[completed].data.tags.get(STOPPED_BY_TAG)) == ("FINISHED", None)
    assert "stopped early" in out.stdout
