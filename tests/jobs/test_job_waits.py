"""Every wait of a training job ends: a request the cluster can never hold is refused at once,
one that does not fit now waits at most ``dist.placement_timeout_s``, Ctrl+C stops the wait, and
an address without a Ray cluster fails in seconds; each with its run's lease released.

The cases run the real jobs (``jobs/pretrain.py``'s, ``jobs/tune.py``'s ``main``) in one subprocess, on
a fresh local Ray cluster of 2 CPUs that it starts once (the test session's shared Ray lives in
this process). The subprocess timeouts are safety nets only: before these fixes the jobs
waited for ever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.training.lease import LEASE_FILE
from tests.fixtures.mlflow_server import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SAFETY_NET_S = 300

# Runs each case of argv[1] (a JSON list) through a job's main (pretraining unless named) on one local
# cluster of 2 CPUs, optionally with all of them taken by another holder, and prints its outcome.
DRIVER = """
import contextlib, importlib.util, io, json, sys
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from service.cli import setup_logging
from service.runtime.cluster import connect_ray

setup_logging()  # the log goes to the real stderr, also while a case's stderr is captured
connect_ray(None, num_cpus=2)
jobs = {}
for name in ("pretrain", "tune"):
    spec = importlib.util.spec_from_file_location(f"{name}_job", f"jobs/{name}.py")
    jobs[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jobs[name])
for case in json.loads(sys.argv[1]):
    holder = placement_group([{"CPU": 2}]) if case["cluster_busy"] else None
    if holder is not None:
        assert holder.wait(120), "could not take the cluster's CPUs"
    print("CASE-START " + case["name"], flush=True)
    err = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stderr(err):
            code = jobs[case.get("job", "pretrain")].main(case["args"])
    except SystemExit as exit_:
        code = exit_.code
    finally:
        if holder is not None:
            remove_placement_group(holder)
    print("CASE " + json.dumps({"name": case["name"], "code": code, "stderr": err.getvalue()}), flush=True)
"""


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="waits") as tmp:
        yield Path(tmp)


def job_args(work: Path, digits_dir: Path, run_name: str, *extra: str) -> list[str]:
    return ["--run_name", run_name, "--checkpoint.storage_path", str(work / "runs"),
            "--data.embedded_dir", str(digits_dir), "--train.max_steps", "1", "--mlflow.enabled", "false", *extra]


def lease_of(work: Path, run_name: str) -> Path:
    return work / "runs" / run_name / LEASE_FILE


def driver_env(work: Path) -> dict[str, str]:
    ray_tmp = work / "ray"
    ray_tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)}


@pytest.fixture(scope="module")
def outcomes(work, digits_dir) -> dict[str, dict]:
    """Runs the cases; the last one, waiting for a busy cluster without end, gets Ctrl+C once it
    says it is waiting for placement."""
    tracking_uri = f"sqlite:///{work / 'mlruns.db'}"
    cases = [
        {"name": "huge_worker", "cluster_busy": False,
         "args": job_args(work, digits_dir, "huge-worker", "--dist.cpus_per_worker", "1000")},
        {"name": "too_many_workers", "cluster_busy": False,
         "args": job_args(work, digits_dir, "too-many", "--dist.num_workers", "3")},
        {"name": "sweep_trial_too_big", "cluster_busy": False, "job": "tune",
         "args": ["--sweep.name", "too-big", "--sweep.storage_path", str(work / "sweeps"), "--sweep.driver_cpus", "1",
                  "--sweep.num_samples", "1", *job_args(work, digits_dir, "unused", "--dist.num_workers", "2")[2:]]},
        {"name": "busy_cluster", "cluster_busy": True,
         "args": job_args(work, digits_dir, "busy", "--dist.placement_timeout_s", "2")},
        {"name": "ctrl_c", "cluster_busy": True,
         "args": job_args(work, digits_dir, "ctrl-c", "--dist.placement_timeout_s", "600",
                          "--mlflow.enabled", "true", "--mlflow.tracking_uri", tracking_uri)},
    ]
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=ROOT, env=driver_env(work),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    safety_net = threading.Timer(SAFETY_NET_S, proc.kill)
    safety_net.start()
    lines: list[str] = []
    interrupted = False
    try:
        in_ctrl_c = False
        for line in proc.stdout:
            lines.append(line)
            in_ctrl_c = in_ctrl_c or line.startswith("CASE-START ctrl_c")
            if in_ctrl_c and not interrupted and "waiting for placement" in line:
                proc.send_signal(signal.SIGINT)
                interrupted = True
        proc.wait()
    finally:
        safety_net.cancel()
        if proc.poll() is None:
            proc.kill()
    found = {c["name"]: c for c in (json.loads(x.removeprefix("CASE ")) for x in lines if x.startswith("CASE {"))}
    found["ctrl_c"] = {**found.get("ctrl_c", {}), "interrupted": interrupted, "log": "".join(lines[-60:]),
                       "tracking_uri": tracking_uri}
    return {"cases": found, "log": "".join(lines)[-6000:]}


def one_error_line(outcome: dict) -> str:
    errors = outcome["stderr"].strip().splitlines()
    assert len(errors) == 1, outcome["stderr"]
    return errors[0]


def test_a_worker_bigger_than_the_machine_exits_2_at_once_naming_the_value(outcomes, work):
    case = outcomes["cases"].get("huge_worker")
    assert case is not None, outcomes["log"]
    assert case["code"] == 2
    assert one_error_line(case).startswith(
        "pretrain.py: error: dist.cpus_per_worker=1000: no node of the local Ray cluster this job started "
        "(it cannot grow) can hold one worker (1000 CPU); its nodes have 2 CPU")
    assert not lease_of(work, "huge-worker").exists()


def test_more_workers_than_the_machine_has_cpus_exits_2_at_once_naming_num_workers(outcomes, work):
    case = outcomes["cases"].get("too_many_workers")
    assert case is not None, outcomes["log"]
    assert case["code"] == 2
    assert one_error_line(case).startswith("pretrain.py: error: dist.num_workers=3: 3 workers of 1 CPU need 3 CPU "
                                           "but the local Ray cluster this job started (it cannot grow) has 2 in all")
    assert not lease_of(work, "too-many").exists()


def test_a_sweep_whose_trial_is_bigger_than_the_machine_exits_2_at_once_naming_the_values(outcomes, work):
    case = outcomes["cases"].get("sweep_trial_too_big")
    assert case is not None, outcomes["log"]
    assert case["code"] == 2
    assert one_error_line(case).startswith(
        "tune.py: error: sweep.driver_cpus=1 with dist.num_workers=2: one trial (its driver and its workers) needs "
        "3 CPU but the local Ray cluster this job started (it cannot grow) has 2 CPU in all")
    assert not (work / "sweeps" / "too-big" / LEASE_FILE).exists()


def test_a_cluster_without_room_now_fails_after_the_placement_timeout_naming_it(outcomes, work):
    case = outcomes["cases"].get("busy_cluster")
    assert case is not None, outcomes["log"]
    assert case["code"] == 2
    line = one_error_line(case)
    assert line.startswith("pretrain.py: error: dist.placement_timeout_s=2: the Ray cluster had no room for "
                           "1 worker(s) of 1 CPU within 2 s (free now: "), line
    assert "its nodes have 2 CPU" in line
    assert not lease_of(work, "busy").exists()


def test_ctrl_c_while_waiting_for_placement_stops_the_job_and_its_run_ends_killed(outcomes, work):
    import mlflow

    case = outcomes["cases"]["ctrl_c"]
    assert case["interrupted"], f"the job never said it was waiting for placement:\n{case['log']}"
    assert case.get("code") == 130, case["log"]  # 128 + SIGINT, and one line instead of a stack dump
    assert case["stderr"].strip() == "pretrain.py: stopped by Ctrl+C; run the same command again to resume"
    assert not lease_of(work, "ctrl-c").exists()
    runs = mlflow.MlflowClient(case["tracking_uri"]).search_runs(
        [mlflow.MlflowClient(case["tracking_uri"]).get_experiment_by_name("convmae-pretrain").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("ctrl-c", "KILLED")]


def test_an_address_without_a_ray_cluster_exits_2_in_seconds_and_releases_the_lease(digits_dir, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "pretrain.py"),
                          *job_args(tmp_path, digits_dir, "nowhere", "--dist.ray_address", address)],
                         cwd=tmp_path, env=driver_env(tmp_path), capture_output=True, text=True, timeout=SAFETY_NET_S)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(
        f"pretrain.py: error: dist.ray_address='{address}': no Ray cluster there: nothing accepts connections at "
        f"{address} (ConnectionRefusedError"), errors
    assert "Traceback" not in out.stderr and "Started a local Ray instance" not in out.stderr
    assert not lease_of(tmp_path, "nowhere").exists()


@pytest.mark.slow
def test_an_address_where_something_else_listens_exits_2_after_the_connect_deadline(digits_dir, tmp_path):
    import socket

    with socket.socket() as other:  # accepts connections (the kernel does), never speaks Ray
        other.bind(("127.0.0.1", 0))
        other.listen(16)
        address = f"127.0.0.1:{other.getsockname()[1]}"
        out = subprocess.run([sys.executable, str(ROOT / "jobs" / "pretrain.py"),
                              *job_args(tmp_path, digits_dir, "not-ray", "--dist.ray_address", address)],
                             cwd=tmp_path, env=driver_env(tmp_path), capture_output=True, text=True,
                             timeout=SAFETY_NET_S)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("pretrain.py: error")]
    assert len(errors) == 1 and errors[0].startswith(
        f"pretrain.py: error: dist.ray_address='{address}': no Ray cluster answered there within "), errors
    assert not lease_of(tmp_path, "not-ray").exists()
