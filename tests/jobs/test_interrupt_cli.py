"""Ctrl+C in the middle of training, as a user presses it: ``python3 jobs/pretrain.py`` ends with
one line and exit status 130, its MLflow run KILLED, and the same command again resumes it.

Ray Train answers Ctrl+C with its own handler (it aborts the run and leaves through
``sys.exit(0)``): before the job handled that, the job exited 0 or 1 as if it had ended. Slow
(two tiny runs, each starting its own local Ray cluster): `pytest -m slow`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(1500)]  # two runs, each up to SAFETY_NET_S

ROOT = Path(__file__).resolve().parents[2]
SAFETY_NET_S = 600  # only stops a hung job; nothing waits on time


def pretrain_args(work: Path, digits_dir: Path, tracking_uri: str) -> list[str]:
    # The tiny preset at 32 px on one CPU worker; a step logged (a line to wait on) and a
    # checkpoint every 2 steps; 2 epochs, so the interrupted run cannot finish on its own before
    # the signal and the resumed one ends soon.
    return [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--run_name", "ctrl-c", "--model.name",
            "convmae_tiny", "--model.img_size", "32", "--data.embedded_dir", str(digits_dir),
            "--data.loader_workers", "0", "--train.epochs", "2", "--train.batch_size_per_worker", "16",
            "--train.log_every_steps", "1", "--train.knn_k", "0", "--checkpoint.every_steps", "2",
            "--dist.num_workers", "1", "--dist.use_gpu", "false", "--checkpoint.storage_path", str(work / "runs"),
            "--mlflow.tracking_uri", tracking_uri, "--mlflow.system_metrics", "false",
            "--mlflow.register", "false"]


def job_env(ray_tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)}


def run_interrupted(args: list[str], env: dict[str, str], cwd: Path, ready: Callable[[], bool]) -> tuple[int, str, bool]:
    """Runs the job and sends it SIGINT (Ctrl+C) at its first training step logged once ``ready()``;
    returns (exit status, output, sent)."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    safety_net = threading.Timer(SAFETY_NET_S, proc.kill)
    safety_net.start()
    lines: list[str] = []
    sent = False
    try:
        for line in proc.stdout:
            lines.append(line)
            if not sent and "service.training.loop INFO epoch" in line and ready():
                proc.send_signal(signal.SIGINT)
                sent = True
        return proc.wait(), "".join(lines), sent
    finally:
        safety_net.cancel()
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep for them.
    with tempfile.TemporaryDirectory(prefix="ctrlc", ignore_cleanup_errors=True) as tmp:
        yield tmp


def test_ctrl_c_during_training_exits_130_with_one_line_the_run_killed_and_resumable(digits_dir, tmp_path, ray_tmp):
    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    args = pretrain_args(tmp_path, digits_dir, tracking_uri)
    env = job_env(ray_tmp)

    # Once Ray Train recorded a checkpoint (its run snapshot exists), so there is one to resume.
    snapshot = tmp_path / "runs" / "ctrl-c" / "checkpoint_manager_snapshot.json"
    code, output, sent = run_interrupted(args, env, tmp_path, snapshot.exists)

    assert sent, f"the job logged no step after a checkpoint:\n{output[-4000:]}"
    assert code == 130, output[-4000:]  # 128 + SIGINT, as the shell reports a command stopped by Ctrl+C
    assert output.rstrip().splitlines()[-1] == "pretrain.py: stopped by Ctrl+C; run the same command again to resume"
    assert "Traceback" not in output, output[-4000:]
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name("convmae-pretrain").experiment_id
    [run] = client.search_runs([experiment_id])
    assert run.info.status == "KILLED"

    # The same command again resumes from the checkpoint, continuing the same MLflow run.
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SAFETY_NET_S)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from " in again.stdout + again.stderr, again.stderr[-4000:]  # a worker's line
    [resumed] = client.search_runs([experiment_id])
    assert (resumed.info.run_id, resumed.info.status) == (run.info.run_id, "FINISHED")


def test_ctrl_c_during_a_sweep_exits_130_with_one_line_and_the_sweep_run_killed(digits_dir, tmp_path, ray_tmp):
    """Tune answers Ctrl+C itself and returns; the job then ends as any stopped job (before: the
    trial table, a sentence, exit status 1). Resuming a sweep is test_tune_e2e's."""
    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    args = [sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", str(ROOT / "jobs/configs/sweep_tiny_cpu.yaml"),
            "--sweep.name", "ctrl-c", "--sweep.storage_path", str(tmp_path / "sweeps"), "--model.img_size", "32",
            "--sweep.space.model.mask_ratio", "grid [0.6, 0.75]",  # 0.9 leaves no patch at 32 px
            "--data.embedded_dir", str(digits_dir), "--train.log_every_steps", "1", "--train.knn_k", "0",
            "--checkpoint.storage_path", str(tmp_path / "runs"), "--mlflow.tracking_uri", tracking_uri,
            "--mlflow.system_metrics", "false"]

    code, output, sent = run_interrupted(args, job_env(ray_tmp), tmp_path, lambda: True)

    assert sent, f"no trial logged a step:\n{output[-4000:]}"
    assert code == 130, output[-4000:]
    assert output.rstrip().splitlines()[-1] == "tune.py: stopped by Ctrl+C; run the same command again to resume"
    assert "Traceback" not in output, output[-4000:]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("convmae-sweep").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"
