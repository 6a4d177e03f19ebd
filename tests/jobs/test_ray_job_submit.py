"""The front door, as a user meets it: `ray job submit` to a token-auth cluster on loopback.

A real `ray start --head` (own ports, token auth as Ray 2.60 enables it), a tiny pretraining
job submitted with a persistent root, resubmitted to continue, and its registered model loaded
by `models:/` from a fresh process. Slow (a few minutes): `pytest -m slow`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_cluster(marker: str) -> None:
    """Kills the processes of the cluster whose command lines name ``marker`` (its temp dir),
    with their children; `ray stop` would stop every Ray on the machine."""
    procs = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for proc in procs:
        try:
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def token_cluster() -> Iterator[dict[str, str]]:
    """A head node on loopback with token auth; yields the environment a user's shell has."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "HOME": f"{temp}/home", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=120)
    dashboard = free_port()
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                    "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "3",
                    "--temp-dir", f"{temp}/ray", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=300)
    try:
        yield {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    finally:
        stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def submit(env: dict[str, str], *args: str) -> str:
    """`ray job submit` of ``jobs/pretrain.py args`` from the checkout; returns its log."""
    command = [RAY, "job", "submit", "--working-dir", ".", "--runtime-env", "infra/runtime_env.yaml", "--",
               "python", "jobs/pretrain.py", *args]
    for _ in range(10):  # the job agent may need a moment after `ray start` returns
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in done.stderr:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_submitted_pretraining_persists_resumes_and_registers(token_cluster, tmp_path):
    root = tmp_path / "convmae-home"
    tiny = ["--storage.root", str(root), "--run_name", "front-door", "--model.img_size", "32", "--data.loader_workers", "0",
            "--train.batch_size_per_worker", "16", "--train.log_every_steps", "2", "--train.knn_k", "0",
            "--checkpoint.every_steps", "2", "--mlflow.system_metrics", "false",
            "--mlflow.registered_model_name", "front-door"]

    # Without the token mode the job client cannot reach a token-auth cluster.
    refused = subprocess.run([RAY, "job", "list"], env={**token_cluster, "RAY_AUTH_MODE": "disabled"},
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0

    first = submit(token_cluster, *tiny, "--train.max_steps", "4")
    # The run's preemption watcher is on (a joined cluster); Ray core's E line about its restart
    # arguments is known noise (service.runtime.logs) and stays out of the job's log.
    assert "PreemptionWatcher" not in first, first[-3000:]
    runs = root / "convmae_runs" / "front-door"
    assert sorted(p.name for p in runs.glob("checkpoint_*")), first[-2000:]
    assert (root / "mlruns.db").is_file() and (root / "convmae_data" / "digits").is_dir()

    second = submit(token_cluster, *tiny, "--train.max_steps", "6")
    assert re.search(r"resumed from .* step 4", second), second[-3000:]
    assert "registered model: models:/front-door/2" in second

    # Another process, no MLFLOW_TRACKING_URI, a clean working directory: the URI given is used.
    loader = ("from service.tracking.registry import load_model; "
              f"m = load_model('models:/front-door/2', tracking_uri='sqlite:///{root}/mlruns.db'); "
              "print('img_size', m.config.img_size)")
    clean = {k: v for k, v in token_cluster.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    clean["PYTHONPATH"] = str(REPO)
    loaded = subprocess.run([sys.executable, "-c", loader], env=clean, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert loaded.returncode == 0 and "img_size 32" in loaded.stdout, loaded.stderr[-2000:]
    assert not list(tmp_path.glob("mlflow.db")) and not (tmp_path / "mlruns").exists()


def job_cli(env: dict[str, str], *args: str) -> str:
    """`ray job ARGS` as the submitting user runs it (the token travels in ``env``)."""
    done = subprocess.run([RAY, "job", *args], env=env, capture_output=True, text=True, timeout=300)
    return done.stdout + done.stderr


def job_status(env: dict[str, str], submission_id: str) -> str:
    """The job's status word, or the CLI's whole answer when it has none (an error to show)."""
    answer = job_cli(env, "status", submission_id)
    found = re.search(r"Status for job '[^']+': (\w+)", answer)
    if found:
        return found.group(1)
    # Ray's CLI words the end states as sentences instead.
    ended = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}
    found = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", answer)
    return ended[found.group(1)] if found else f"UNKNOWN: {answer[-1500:]}"


def test_a_submitted_job_carries_the_submitters_provenance_and_ends_killed_when_stopped(
    token_cluster, digits_dir, tmp_path
):
    """``ray job submit`` as README's "Run on a cluster" shows it: the upload has no .git, the
    submitting shell passes the provenance; ``ray job stop`` (SIGTERM) ends the run KILLED."""
    import uuid

    from mlflow import MlflowClient

    from service.tracking.provenance import provenance

    tracking_uri = f"sqlite:///{tmp_path}/mlruns.db"
    submission_id = f"provenance-{uuid.uuid4().hex[:8]}"
    submit = (
        f"ray job submit --submission-id {submission_id} --no-wait --working-dir . "
        "--runtime-env infra/runtime_env.yaml -- env $(python3 -m service.tracking.provenance) "
        f"python3 jobs/pretrain.py --run_name submitted --model.name convmae_tiny --model.img_size 32 "
        f"--data.embedded_dir {digits_dir} --data.loader_workers 0 --train.epochs 50 "
        f"--train.batch_size_per_worker 16 --train.log_every_steps 1 --train.knn_k 0 --dist.num_workers 1 "
        f"--dist.use_gpu false --checkpoint.storage_path {tmp_path}/runs --mlflow.tracking_uri {tracking_uri} "
        "--mlflow.system_metrics false"
    )
    out = subprocess.run(["bash", "-c", submit], cwd=REPO, env=token_cluster, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    mlflow = MlflowClient(tracking_uri)
    deadline = time.monotonic() + 600
    run = None
    while run is None or not mlflow.get_metric_history(run.info.run_id, "train/loss"):
        status = job_status(token_cluster, submission_id)
        assert status in ("PENDING", "RUNNING"), job_cli(token_cluster, "logs", submission_id)[-3000:]
        assert time.monotonic() < deadline, "the job logged no training step"
        time.sleep(1)
        experiment = mlflow.get_experiment_by_name("convmae-pretrain")
        runs = mlflow.search_runs([experiment.experiment_id]) if experiment else []
        run = runs[0] if runs else None

    job_cli(token_cluster, "stop", submission_id)  # SIGTERM to the driver, SIGKILL 3 s later
    stop_deadline = time.monotonic() + 180
    while (status := job_status(token_cluster, submission_id)) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < stop_deadline, f"the job did not stop (status {status})"
        time.sleep(1)
    run = mlflow.get_run(run.info.run_id)
    assert run.info.status == "KILLED", job_cli(token_cluster, "logs", submission_id)[-3000:]
    expected = provenance(REPO)  # taken here, on the submitting side
    assert expected["git_commit"] != "unknown"
    assert (run.data.tags["git_commit"], run.data.tags["git_dirty"]) == (expected["git_commit"], expected["git_dirty"])
