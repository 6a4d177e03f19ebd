import socket

import pytest
from mlflow import MlflowClient

from service.tracking import ERROR_TAG, Tracker, ensure_experiment, resolve_tracking_uri, warm_up


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_server_warns_and_never_raises(caplog):
    tracker = Tracker(f"http://127.0.0.1:{_closed_port()}", run_id="abc", pause_after_failure_s=0.0)
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.log_params({"train.lr": 0.1})
    tracker.log_dict({"a": 1}, "x.json")
    assert tracker.failures == 3
    assert "training continues" in caplog.text


def test_logs_metrics_params_and_artifacts_to_a_real_store(tmp_path):
    uri = resolve_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    client = MlflowClient(uri)
    exp = ensure_experiment(client, uri, "unit")
    run_id = client.create_run(exp).info.run_id
    tracker = Tracker(uri, run_id)
    tracker.log_params({f"p{i}": i for i in range(150)})  # more than one batch of 100
    for step in range(3):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    tracker.log_dict({"zero_optimization": {"stage": 2}}, "deepspeed_config.json")
    run = client.get_run(run_id)
    assert len(run.data.params) == 150
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert "deepspeed_config.json" in [a.path for a in client.list_artifacts(run_id)]
    assert tracker.failures == 0


def test_relative_local_stores_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path}/mlruns.db"
    assert resolve_tracking_uri("sqlite:///x.db") == f"sqlite:///{tmp_path}/x.db"
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


def new_run(tmp_path) -> tuple[MlflowClient, Tracker]:
    uri = resolve_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    client = MlflowClient(uri)
    return client, Tracker(uri, client.create_run(ensure_experiment(client, uri, "unit")).info.run_id)


def test_a_run_ends_with_the_status_its_job_deserves(tmp_path):
    client, finished = new_run(tmp_path)
    with finished.ending_run():
        pass
    assert client.get_run(finished.run_id).info.status == "FINISHED"

    _, failed = new_run(tmp_path)
    with pytest.raises(ValueError), failed.ending_run():
        raise ValueError("loss is nan at step 7")
    run = client.get_run(failed.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[ERROR_TAG] == "ValueError: loss is nan at step 7"

    # Ctrl+C, SIGTERM (the jobs make it a KeyboardInterrupt) and Ray Train's abort (SystemExit).
    for stop in (KeyboardInterrupt("stopped by SIGTERM"), SystemExit(0)):
        _, killed = new_run(tmp_path)
        with pytest.raises(type(stop)), killed.ending_run():
            raise stop
        run = client.get_run(killed.run_id)
        assert run.info.status == "KILLED" and ERROR_TAG not in run.data.tags

    _, chosen = new_run(tmp_path)  # a block that ends the run itself keeps its status
    with chosen.ending_run():
        chosen.finish("KILLED")
    assert chosen.status() == "KILLED"


def test_sigterm_stops_a_job_like_ctrl_c_and_is_restored_after(tmp_path):
    import os
    import signal

    from service.cli import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    client, tracker = new_run(tmp_path)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), sigterm_as_interrupt(), tracker.ending_run():
        os.kill(os.getpid(), signal.SIGTERM)  # what `ray job stop` sends the job
    assert client.get_run(tracker.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_resumed_tracker_logs_no_second_point_for_a_redone_step(tmp_path):
    client, before = new_run(tmp_path)
    for step in range(1, 6):
        before.log_metrics({"train/loss": 10.0 - step}, step=step)
    before.log_metrics({"val/recon_loss": 0.9}, step=4)

    resumed = Tracker(before.tracking_uri, before.run_id)  # a worker restarted from the step-3 checkpoint
    resumed.skip_logged_steps()
    for step in range(4, 8):
        resumed.log_metrics({"train/loss": 100.0 + step, "train/lr": 0.1}, step=step)
    resumed.log_metrics({"val/recon_loss": 0.8}, step=6)

    loss = client.get_metric_history(before.run_id, "train/loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6, 7]  # one point per step
    assert {m.step: m.value for m in loss}[5] == 5.0  # the first point of a step stays
    assert sorted(m.step for m in client.get_metric_history(before.run_id, "train/lr")) == [4, 5, 6, 7]
    assert [m.step for m in client.get_metric_history(before.run_id, "val/recon_loss")] == [4, 6]


def test_a_disabled_tracker_touches_no_mlflow_store(tmp_path, monkeypatch):
    """Non-chief ranks and MLflow-off runs log through a NullTracker: no client, no ./mlflow.db."""
    from service.tracking import NullTracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = NullTracker()
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.set_tags({"git_commit": "abc"})
    tracker.finish("FINISHED")
    assert list(tmp_path.iterdir()) == []


def test_warm_up_sets_up_the_store_in_the_background_and_never_raises(tmp_path):
    uri = resolve_tracking_uri(f"sqlite:///{tmp_path}/warm.db")
    warming = warm_up(uri, "unit")
    warming.join(timeout=120)
    assert not warming.is_alive() and (tmp_path / "warm.db").exists()  # tables made, off the caller's thread
    client = MlflowClient(uri)
    assert ensure_experiment(client, uri, "unit")  # the warmed store is a working one
    unreachable = warm_up(f"http://127.0.0.1:{_closed_port()}", "unit")
    unreachable.join(timeout=120)
    assert not unreachable.is_alive()  # it failed quietly; open_run reports such a store
