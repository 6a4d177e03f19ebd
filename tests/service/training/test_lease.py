"""One writer per run: the lease in a run's storage folder, on a local folder and on S3 (moto)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
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

    fs, path = fsspec.core.url_to_fs(lease_file(runs, run_name))
    fs.invalidate_cache()
    try:  # one GET: a file opened for reading fails when the heartbeat replaces it meanwhile
        return Holder.from_bytes(fs.cat_file(path))
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
    renewals = threading.Semaphore(0)
    renew = lease.renew
    monkeypatch.setattr(lease, "renew", lambda: renewals.release() or renew())
    with lease:
        taken = read_holder(runs, "beating")
        # Wait for the event, not for a time: renewals until the lease has outlived its first
        # expiry. The bound only stops a broken heartbeat from hanging the test.
        renewed = taken
        for _ in range(1000):
            assert renewals.acquire(timeout=120), "the heartbeat stopped renewing"
            renewed = read_holder(runs, "beating")
            if renewed.renewed_at > taken.started_at + taken.timeout_s:
                break
        assert renewed.token == taken.token and renewed.started_at == taken.started_at
    # Seen from another machine (no pid to check), a lease is only as alive as its renewals: at
    # a moment past the first expiry the unrenewed lease is dead and the renewed one alive.
    monkeypatch.setattr(lease_mod, "this_machine", lambda: "another machine")
    moment = renewed.renewed_at + taken.timeout_s / 2
    never_renewed = dataclasses.replace(taken, renewed_at=taken.started_at)  # (the first read may be a renewal)
    assert never_renewed.stale_because(moment) is not None
    assert renewed.stale_because(moment) is None


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
    planted = time.time()
    plant(runs, "remote", renewed_at=planted - 60)  # renewed a minute ago, timeout 5 minutes
    with pytest.raises(RunLeaseError, match=r"host elsewhere, pid 4242, started .* renewed (\d+) s ago") as refused:
        RunLease(runs, "remote").acquire()
    age = int(re.search(r"renewed (\d+) s ago", str(refused.value)).group(1))
    assert 60 <= age <= 60 + math.ceil(time.time() - planted)  # the age when refused, however slow that was
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


# ---------------------------------------------------------------- lease files are untrusted input


def plant_raw(runs: str, run_name: str, **fields: object) -> None:
    """A lease file of another machine's run with some fields replaced by anything JSON can hold."""
    import fsspec

    now = time.time()
    raw = {"run_name": run_name, "host": "elsewhere", "machine": "elsewhere|boot|pid:[1]", "pid": 4242,
           "pid_started": now, "started_at": now, "renewed_at": now, "timeout_s": 300.0, "token": "someone-else",
           **fields}
    fs, path = fsspec.core.url_to_fs(lease_file(runs, run_name))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(raw).encode())  # NaN and Infinity as Python's json writes them


@pytest.mark.parametrize("field,value", [
    ("renewed_at", time.time() + 10 * 365 * 86400),  # renewed "in ten years": never expired before
    ("started_at", time.time() + 10 * 365 * 86400),
    ("timeout_s", float("nan")),  # age > NaN is never true: never expired before
    ("timeout_s", float("inf")),
    ("timeout_s", -1.0),
    ("renewed_at", float("nan")),
    ("renewed_at", "yesterday"),  # a traceback (str minus float) before
    ("pid", "4242"),
    ("pid", 4242.5),
    ("pid", True),
    ("host", ["elsewhere"]),
    ("host", "evil\nsecond line"),  # would split the one-line refusal in two
])
def test_a_malformed_lease_file_is_taken_over_with_a_warning_naming_the_file_and_field(runs, field, value, caplog):
    plant_raw(runs, "odd", **{field: value})
    with caplog.at_level(logging.WARNING, logger="service.training.lease"), RunLease(runs, "odd") as lease:
        assert read_holder(runs, "odd").token == lease._holder.token
    warning = next(r.getMessage() for r in caplog.records if "taking over" in r.getMessage())
    assert f"{LEASE_FILE}" in warning and f"field {field!r}" in warning and "\n" not in warning


def test_a_malformed_lease_of_this_machine_with_a_string_pid_is_taken_over(runs):
    plant_raw(runs, "odd-here", machine=this_machine(), host=socket.gethostname(), pid=str(4242))
    RunLease(runs, "odd-here").acquire().release()  # a TypeError traceback from psutil before
    assert read_holder(runs, "odd-here") is None


def test_a_renewal_slightly_ahead_of_this_clock_is_clock_skew_not_a_malformed_lease(runs):
    plant_raw(runs, "skewed", renewed_at=time.time() + 5)  # another machine's clock a little ahead
    with pytest.raises(RunLeaseError, match=r"is in use by another run \(.*, renewed 0 s ago\)"):
        RunLease(runs, "skewed").acquire()


def test_a_folder_at_the_lease_path_is_refused_naming_it(tmp_path):
    (tmp_path / "runs" / "dir" / LEASE_FILE).mkdir(parents=True)
    with pytest.raises(ConfigError) as refused:
        RunLease(str(tmp_path / "runs"), "dir").acquire()
    message = str(refused.value)
    assert "\n" not in message and not isinstance(refused.value, RunLeaseError)
    assert message.startswith(f"{tmp_path / 'runs' / 'dir' / LEASE_FILE} is a folder, not a lease file")


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
