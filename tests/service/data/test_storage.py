"""s3fs options from config and environment; secrets never reach a repr or a log line."""

from __future__ import annotations

import logging

import pytest

from service.config import StorageConfig
from service.data import DataError, storage_options
from service.data.storage import filesystem, is_transient, redact_url, retrying

AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@pytest.fixture
def clean_env(monkeypatch):
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_environment_fills_in_what_the_config_leaves_out(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:9000")
    clean_env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    clean_env.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    options = storage_options(StorageConfig(max_retries=3))
    assert options["endpoint_url"] == "http://s3-specific:9000"
    assert options["client_kwargs"] == {"region_name": "eu-west-1"}
    assert (options["key"], options["secret"]) == ("AKIAEXAMPLE", "very-secret-value")
    assert options["config_kwargs"]["retries"]["max_attempts"] == 4
    clean_env.setenv("AWS_REGION", "us-west-2")
    assert storage_options(StorageConfig())["client_kwargs"] == {"region_name": "us-west-2"}


def test_config_wins_over_environment(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://env:9000")
    clean_env.setenv("AWS_REGION", "eu-west-1")
    options = storage_options(StorageConfig(endpoint_url="http://minio:9000", region="ap-south-1"))
    assert options["endpoint_url"] == "http://minio:9000"
    assert options["client_kwargs"]["region_name"] == "ap-south-1"


def test_nothing_set_leaves_credentials_to_botocore(clean_env):
    options = storage_options(StorageConfig())
    assert not {"endpoint_url", "key", "secret", "token", "client_kwargs"} & set(options)
    assert storage_options(StorageConfig(anon=True))["anon"] is True


def test_secrets_are_masked_in_repr_str_and_logs(clean_env, caplog):
    clean_env.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    clean_env.setenv("AWS_SESSION_TOKEN", "session-token-value")
    options = storage_options(StorageConfig())
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("options: %s / %r / %s", options, options, [options])
    for text in (repr(options), str(options), caplog.text, f"{options}"):
        assert "very-secret-value" not in text and "session-token-value" not in text
        assert "AKIAEXAMPLE" not in text
    assert "***" in repr(options)
    assert dict(options)["secret"] == "very-secret-value"  # the real value is still passed on


def test_redact_url_drops_userinfo():
    assert redact_url("s3://user:pass@bucket/prefix") == "s3://bucket/prefix"
    assert redact_url("s3://bucket/prefix") == "s3://bucket/prefix"
    assert redact_url("/local/path") == "/local/path"


def test_unknown_protocol_is_a_data_error_naming_the_url():
    with pytest.raises(DataError, match="nosuchproto://x/y"):
        filesystem("nosuchproto://x/y")


def test_transient_errors_are_retried_and_permanent_ones_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert retrying(flaky, what="flaky", max_retries=3, sleep=lambda s: None) == "ok"
    assert len(calls) == 3
    with pytest.raises(ConnectionResetError):
        retrying(lambda: (_ for _ in ()).throw(ConnectionResetError("x")), what="always",
                 max_retries=1, sleep=lambda s: None)
    assert not is_transient(FileNotFoundError("gone"))
    assert not is_transient(PermissionError("denied"))
    assert is_transient(TimeoutError())
