import socket

from mlflow import MlflowClient

from service.tracking import Tracker, ensure_experiment, resolve_tracking_uri


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
