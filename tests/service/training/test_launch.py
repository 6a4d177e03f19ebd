"""What a driver hands to Ray: storage filesystems without secrets, absolute local paths, and a
storage path checked reachable and writable before anything starts."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import boto3
import pytest

from service.config import StorageConfig
from service.data import DataError
from service.training.launch import (
    absolute_url,
    persistable_storage_options,
    require_writable,
    storage_location,
)


def test_storage_filesystems_carry_no_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    options = persistable_storage_options(StorageConfig())
    assert options["endpoint_url"] == "http://127.0.0.1:9"
    assert not {"key", "secret", "token"} & set(options)
    # Ray pickles this into run and experiment state kept in the bucket
    _, fs = storage_location("s3://bucket/runs", StorageConfig())
    blob = pickle.dumps(fs)
    for secret in (b"very-secret-value", b"session-token-value", b"AKIAEXAMPLE"):
        assert secret not in blob


def test_local_storage_and_data_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, fs = storage_location("runs", StorageConfig())
    assert (fs, path) == (None, str(tmp_path / "runs")) and Path(path).is_dir()
    assert absolute_url("data/train") == str(tmp_path / "data" / "train")
    assert absolute_url("file://data/x") == str(tmp_path / "data" / "x")
    assert absolute_url("s3://bucket/x") == "s3://bucket/x"
    assert absolute_url(None) is None


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_missing_bucket_is_named_and_never_created(s3_server):
    with pytest.raises(DataError) as err:
        require_writable("s3://no-such-bucket-4f1c/runs", StorageConfig(), "checkpoint.storage_path")
    assert str(err.value) == ("checkpoint.storage_path='s3://no-such-bucket-4f1c/runs': bucket 'no-such-bucket-4f1c' "
                              "does not exist; create it first (jobs never create buckets)")
    buckets = boto3.client("s3", endpoint_url=s3_server).list_buckets()["Buckets"]
    assert "no-such-bucket-4f1c" not in {b["Name"] for b in buckets}


def test_an_unreachable_endpoint_fails_with_the_probes_short_timeouts_naming_the_url(s3_server, monkeypatch):
    import copy

    import service.data.storage as storage_mod

    clients: list[dict] = []  # the botocore settings of each filesystem the check opened (botocore edits them)
    opened = storage_mod.filesystem

    def recording(url: str, options: dict | None = None):
        clients.append(copy.deepcopy((options or {}).get("config_kwargs")))
        return opened(url, options)

    monkeypatch.setattr(storage_mod, "filesystem", recording)
    port = _closed_port()
    with pytest.raises(DataError, match=r"^checkpoint.storage_path='s3://bucket/runs': cannot be reached "
                                        rf"\(EndpointConnectionError: .*127.0.0.1:{port}/bucket/runs/"):
        require_writable("s3://bucket/runs", StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", max_retries=5),
                         "checkpoint.storage_path")
    # Short timeouts and one retry, not the run's max_retries=5 (6 attempts of up to 60 s each).
    assert clients == [{"retries": {"max_attempts": storage_mod.PROBE_ATTEMPTS, "mode": "standard"},
                        "connect_timeout": storage_mod.PROBE_CONNECT_TIMEOUT_S,
                        "read_timeout": storage_mod.PROBE_READ_TIMEOUT_S}]
    assert storage_mod.PROBE_ATTEMPTS < 5 + 1


def test_a_writable_location_passes_and_keeps_no_trace(s3_bucket, s3_server, tmp_path):
    require_writable(f"{s3_bucket}/runs", StorageConfig(), "checkpoint.storage_path")
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket.removeprefix("s3://"))
    assert not listed.get("Contents")
    require_writable(str(tmp_path / "runs"), StorageConfig(), "checkpoint.storage_path")
    assert (tmp_path / "runs").is_dir() and not list((tmp_path / "runs").iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"sweep.storage_path='.*/file/runs': not writable \(NotADirectoryError"):
        require_writable(str(tmp_path / "file" / "runs"), StorageConfig(), "sweep.storage_path")
