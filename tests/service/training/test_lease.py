"""One writer per run: the lease in a run's storage folder, on a local folder and on S3 (moto)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time

import pytest

from service.config import ConfigError, PretrainConfig, with_overrides
from service.training.lease import LEASE_FILE, Holder, RunLease, RunLeaseError, this_machine


@pytest.fixture(params=["local", "s3"])
def runs(request, tmp_path) -> str:
    """A ``checkpoint.storage_path``: a local folder, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("s3_bucket") + "/runs"


def lease_file(runs: str, run_name: str) -> str:
    return f"{runs}/{run_name}/{LEASE_FILE}"


def read_holder(runs: str, run_name: str) -> Holder | None:
    import fsspec

    try:
        with fsspec.open(lease_file(runs, run_name), "rb") as f:
            return Holder.from_bytes(f.read())
    except FileNotFoundError:
        return None


def plant(runs: str, run_name: str, **fields) -> Holder:
    """Writes the lease of some other run (as it would have) straight into the storage."""
    import fsspec

    now = time.time()
    holder = Holder(**{"run_name": run_name, "host": "elsewhere", "machine": "elsewhere|boot|pid:[1]", "pid": 4242,
                       "pid_started": now, "started_at": now, "renewed_at": now, "timeout_s": 300.0,
                       "token": "someone-else", **fields})
    fs, path = fsspec.core.url_to_fs(lease_file(runs, run_name))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, holder.to_bytes())
    return holder


def dead_pid() -> tuple[int, float]:
    """The pid and start time of a process of this machine that has exited."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return proc.pid, started


def test_a_second_run_is_refused_while_the_first_holds_the_lease_and_may_run_after_release(runs):
    first = RunLease(runs, "tiny").acquire()
    try:
        holder = read_holder(runs, "tiny")
        assert holder is not None and holder.token == first._holder.token
        with pytest.raises(RunLeaseError) as refused:
            RunLease(runs, "tiny").acquire()
        message = str(refused.value)
        assert isinstance(refused.value, ConfigError) and "\n" not in message
        assert "run_name='tiny' is in use by another run" in message
        assert f"host {socket.gethostname()}, pid {holder.pid}, started " in message
        RunLease(runs, "other-run").acquire().release()  # other run names are free
    finally:
        first.release()
    assert read_holder(runs, "tiny") is None
    RunLease(runs, "tiny").acquire().release()


def test_the_heartbeat_keeps_a_lease_alive_past_its_timeout(runs, monkeypatch):
    import service.training.lease as lease_mod

    lease = RunLease(runs, "beating", timeout_s=1.5)  # renewed every 0.3 s
    with lease:
        first = read_holder(runs, "beating").renewed_at
        time.sleep(2.0)
        assert read_holder(runs, "beating").renewed_at > first
        # Seen from another machine (no pid to check), the lease is only as alive as its renewals.
        monkeypatch.setattr(lease_mod, "this_machine", lambda: "another machine")
        with pytest.raises(RunLeaseError):
            RunLease(runs, "beating").acquire()


@pytest.mark.parametrize("dead", ["process gone", "not renewed"])
def test_a_dead_runs_lease_is_taken_over_with_a_warning(runs, dead, caplog):
    if dead == "process gone":  # same machine: the pid tells, no need to wait for the timeout
        pid, started = dead_pid()
        plant(runs, "crashed", host=socket.gethostname(), machine=this_machine(), pid=pid, pid_started=started)
    else:  # another machine: only the missed renewals tell
        plant(runs, "crashed", renewed_at=time.time() - 301)

    with caplog.at_level(logging.WARNING, logger="service.training.lease"), RunLease(runs, "crashed") as lease:
        assert read_holder(runs, "crashed").token == lease._holder.token
    assert "taking over the lease of a dead run (host " in caplog.text
    assert read_holder(runs, "crashed") is None


def test_a_live_lease_of_another_machine_is_not_taken_over(runs):
    plant(runs, "remote", renewed_at=time.time() - 60)  # renewed a minute ago, timeout 5 minutes
    with pytest.raises(RunLeaseError, match=r"host elsewhere, pid 4242, started .* renewed 6\d s ago"):
        RunLease(runs, "remote").acquire()
    assert read_holder(runs, "remote").token == "someone-else"


def test_only_one_of_two_runs_racing_for_a_dead_lease_wins(runs):
    plant(runs, "contested", renewed_at=time.time() - 1000)
    contenders = [RunLease(runs, "contested") for _ in range(2)]
    outcomes: list[object] = []
    start = threading.Barrier(2)

    def contend(lease: RunLease) -> None:
        start.wait()
        try:
            outcomes.append(lease.acquire())
        except RunLeaseError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=contend, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert sorted(type(o).__name__ for o in outcomes) == ["RunLease", "RunLeaseError"]
        winner = next(o for o in outcomes if isinstance(o, RunLease))
        assert read_holder(runs, "contested").token == winner._holder.token
    finally:
        for c in contenders:
            c.release()


def test_a_run_that_lost_its_lease_leaves_the_new_holders_alone(runs, caplog):
    lease = RunLease(runs, "lost", timeout_s=10).acquire()
    taker = plant(runs, "lost")  # e.g. after this driver was cut off for longer than the timeout
    with caplog.at_level(logging.ERROR, logger="service.training.lease"):
        assert lease.renew() is False
    assert "lost the lease" in caplog.text
    lease.release()
    assert read_holder(runs, "lost").token == taker.token


def test_a_training_job_is_refused_with_exit_2_naming_the_holder(tmp_path, digits_dir, capsys, monkeypatch):
    """The job's own entry point, in this process: it fails on the lease before any Ray work."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pretrain_job", Path(__file__).parents[3] / "jobs" / "pretrain.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    monkeypatch.chdir(tmp_path)
    with RunLease(str(tmp_path / "runs"), "busy"):
        with pytest.raises(SystemExit) as exit_:
            job.main(["--run_name", "busy", "--checkpoint.storage_path", str(tmp_path / "runs"),
                      "--data.embedded_dir", str(digits_dir), "--dist.ray_address", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and "run_name='busy' is in use by another run (host " in err
    assert not (tmp_path / "mlruns.db").exists()  # refused before the MLflow run was opened


def test_the_lease_timeout_is_validated():
    with pytest.raises(ConfigError, match="checkpoint.lease_timeout_s"):
        with_overrides(PretrainConfig(), {"checkpoint.lease_timeout_s": 1}).validate()


def test_a_lease_file_is_plain_json_for_people(tmp_path):
    with RunLease(str(tmp_path), "json"):
        raw = json.loads((tmp_path / "json" / LEASE_FILE).read_text())
    assert raw["host"] == socket.gethostname() and raw["started"].endswith("+00:00")


@pytest.mark.timeout(120)  # a safety net: before the deadline, this waited for ever
def test_a_lock_file_held_by_a_stuck_process_fails_the_lease_instead_of_waiting_for_ever(tmp_path, monkeypatch):
    import fcntl
    import os

    from service.training import lease as lease_module

    monkeypatch.setattr(lease_module, "LOCK_WAIT_S", 1.0)
    folder = tmp_path / "stuck"
    folder.mkdir()
    fd = os.open(folder / lease_module.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open of the file: as a stuck process holds it
        with pytest.raises(RunLeaseError, match=r"could not lock .*\.convmae-lease\.lock within 1 s: another process"):
            RunLease(str(tmp_path), "stuck").acquire()
    finally:
        os.close(fd)
    with RunLease(str(tmp_path), "stuck"):  # once it is let go, the lease is taken as usual
        assert (folder / LEASE_FILE).exists()
