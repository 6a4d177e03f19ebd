"""What a driver hands to Ray: storage filesystems without secrets, absolute local paths."""

from __future__ import annotations

import pickle
from pathlib import Path

from service.config import StorageConfig
from service.training.launch import absolute_url, persistable_storage_options, storage_location


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
