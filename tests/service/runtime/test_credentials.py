"""Secrets stay on the driver: object-store credentials reach the workers without appearing in
Ray's session logs, the MLflow store or the checkpoints; URLs are shown without passwords."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from service.config import PretrainConfig, redacted, with_overrides
from tests.service.training.test_pretrain_e2e import tiny_config

PASSWORD = "hunter2-url-password"
ENDPOINT = f"http://minio-user:{PASSWORD}@127.0.0.1:9000"


def files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                hits.append(str(path))
        except OSError:  # sockets, files that vanished while walking
            continue
    return hits


@pytest.mark.e2e
def test_a_planted_secret_reaches_no_ray_log_mlflow_store_or_checkpoint(ray_cluster, s3_bucket, digits_dir, tmp_path,
                                                                       monkeypatch):
    import fsspec
    import ray
    import s3fs

    from service.training.pretrain import run_pretraining

    secret = f"planted-{secrets.token_hex(16)}"
    token = f"planted-token-{secrets.token_hex(16)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    s3fs.S3FileSystem.clear_instance_cache()  # clients made with the old credentials
    fs = fsspec.filesystem("s3")
    bucket = s3_bucket.removeprefix("s3://")
    fs.put(str(digits_dir / "digits" / "train"), f"{bucket}/digits/train", recursive=True)

    cfg = tiny_config(tmp_path, digits_dir, **{
        "run_name": "secret-run", "data.url": f"{s3_bucket}/digits/train", "dist.num_workers": 1,
        "train.max_steps": 2, "train.knn_k": 0, "checkpoint.storage_path": f"{s3_bucket}/runs",
        "mlflow.register": False,
    })
    result = run_pretraining(cfg)
    assert result.checkpoint_path is not None and result.mlflow_run_id is not None

    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    assert list(session_dir.glob("logs/runtime_env_agent*.log")), "no runtime env log to search"
    stored = [p for p in fs.find(bucket) if "/runs/" in p]
    assert any("checkpoint_" in p for p in stored)
    assert not [p for p in stored if ".convmae-lease" in p]  # the run released its lease
    for needle in (secret.encode(), token.encode()):
        leaks = files_containing(session_dir, needle) + files_containing(tmp_path, needle)  # tmp_path: MLflow store
        leaks += [f"s3://{p}" for p in stored if needle in fs.cat_file(p)]
        assert not leaks, f"a credential was written to {leaks}"


@pytest.mark.e2e
def test_a_planted_secret_reaches_no_ray_log_in_a_sweep(ray_cluster, s3_bucket, digits_dir, tmp_path, monkeypatch):
    """Ray Tune copies the driver's AWS_* variables into every trial's runtime env, which Ray
    writes in plain text to runtime_env_agent.log; the sweep's trials must get them another way."""
    import ray
    import s3fs

    from service.tune.sweep import run_sweep
    from tests.service.tune.test_tune_e2e import sweep_config

    secret = f"planted-{secrets.token_hex(16)}"
    token = f"planted-token-{secrets.token_hex(16)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    s3fs.S3FileSystem.clear_instance_cache()
    cfg = with_overrides(sweep_config(f"{s3_bucket}/secret-sweeps", digits_dir, f"sqlite:///{tmp_path}/mlruns.db"), {
        "sweep.name": "secret-sweep", "sweep.space": {"train.blr": "grid [2.0e-3]"}, "sweep.scheduler": "fifo",
        "train.max_steps": 2, "mlflow.register": False,
    })
    result = run_sweep(cfg)
    # The trial trained with the shared credentials: its checkpoint is in the bucket.
    assert [t.checkpoint_path is not None and t.objective is not None for t in result.trials] == [True], result.table

    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    assert list(session_dir.glob("logs/runtime_env_agent*.log")), "no runtime env log to search"
    for needle in (secret.encode(), token.encode()):
        leaks = files_containing(session_dir, needle) + files_containing(tmp_path, needle)
        assert not leaks, f"a credential was written to {leaks}"


def test_workers_get_the_drivers_credentials_through_the_object_store(ray_cluster, monkeypatch):
    import ray

    from service.runtime.credentials import adopt_credentials, share_credentials
    from tests.fixtures.s3 import FAKE_ENV

    @ray.remote(num_cpus=0)
    def inherited() -> str | None:
        import os

        return os.environ.get("AWS_SECRET_ACCESS_KEY")

    # A local cluster's processes inherit the environment of the driver that started it (the
    # session's Ray started after the S3 fixture set its credentials), with nothing shared.
    assert ray.get(inherited.remote()) == FAKE_ENV["AWS_SECRET_ACCESS_KEY"]

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "driver-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "driver-secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"AWS_SESSION_TOKEN": "the-workers-own"}})
    def worker_env(loop_config: dict) -> dict:
        import os

        adopt_credentials(loop_config["credentials"])
        return {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}

    # Inside the workers' settings, as WorkerSettings carries it: a reference, not the value.
    got = ray.get(worker_env.remote({"credentials": share_credentials()}))
    # The driver's set travels whole: no token of the worker's own is mixed into it.
    assert got == {"AWS_ACCESS_KEY_ID": "driver-key", "AWS_SECRET_ACCESS_KEY": "driver-secret",
                   "AWS_SESSION_TOKEN": None}


def test_forwarded_env_holds_settings_but_no_credentials(monkeypatch):
    from service.runtime.cluster import forwarded_env, worker_runtime_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "container-token-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env = forwarded_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["AWS_REGION"] == "eu-west-1"
    shown = repr(worker_runtime_env())
    for secret in ("AKIAEXAMPLE", "very-secret-value", "session-token-value", "container-token-value", PASSWORD):
        assert secret not in shown


def test_print_config_shows_urls_without_passwords(capsys):
    from service.cli import build_parser, parse_config

    parser = build_parser("pretrain.py", "", PretrainConfig, "")
    with pytest.raises(SystemExit) as exit_:
        parse_config(parser, PretrainConfig, ["--storage.endpoint_url", ENDPOINT,
                                              "--mlflow.tracking_uri", f"https://u:{PASSWORD}@mlflow:5000",
                                              "--print-config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert PASSWORD not in out
    assert "endpoint_url: http://127.0.0.1:9000" in out and "tracking_uri: https://mlflow:5000" in out


def test_mlflow_gets_the_config_without_url_passwords(tmp_path):
    from mlflow import MlflowClient

    from service.tracking import open_run
    from service.training.launch import log_config

    cfg = with_overrides(PretrainConfig(), {"storage.endpoint_url": ENDPOINT})
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    tracker = open_run(uri, "redaction", identity={"convmae.run_name": "r"}, run_name="r")
    log_config(tracker, cfg, train_url=f"s3://u:{PASSWORD}@bucket/train", precision="fp32", use_gpu=False)
    tracker.finish("FINISHED")

    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.params["storage.endpoint_url"] == "http://127.0.0.1:9000"
    assert run.data.tags["data.train_url"] == "s3://bucket/train"
    assert redacted(cfg)["storage"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert not files_containing(tmp_path, PASSWORD.encode())  # the store and its artifacts
