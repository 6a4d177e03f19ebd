"""Output locations: one persistent root, and no silent loss under `ray job submit`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.config import (
    ConfigError,
    EvaluateConfig,
    PretrainConfig,
    TuneJobConfig,
    with_overrides,
)
from service.config.locations import HOME_ENV, RAY_JOB_ENV, resolve_locations

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def clean_env(monkeypatch):
    for key in (HOME_ENV, RAY_JOB_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_outside_a_ray_job_the_working_directory_defaults_stay(clean_env):
    cfg = PretrainConfig()
    assert resolve_locations(cfg) == cfg


def test_a_submitted_job_with_relative_outputs_stops_naming_them_and_the_flag(clean_env):
    clean_env.setenv(RAY_JOB_ENV, "{}")
    with pytest.raises(ConfigError) as err:
        resolve_locations(PretrainConfig())
    message = str(err.value)
    for part in ("checkpoint.storage_path='convmae_runs'", "mlflow.tracking_uri=''", "data.embedded_dir",
                 "--storage.root", HOME_ENV):
        assert part in message
    absolute = with_overrides(PretrainConfig(), {"checkpoint.storage_path": "s3://b/runs", "data.url": "s3://b/d",
                                                 "mlflow.tracking_uri": "http://mlflow:5000"})
    assert resolve_locations(absolute) == absolute  # nothing relative: nothing to say


def test_a_local_root_holds_runs_sweeps_mlflow_and_data(clean_env, tmp_path):
    cfg = resolve_locations(with_overrides(TuneJobConfig(), {"storage.root": str(tmp_path)}))
    assert cfg.checkpoint.storage_path == str(tmp_path / "convmae_runs")
    assert cfg.sweep.storage_path == str(tmp_path / "convmae_sweeps")
    assert cfg.data.embedded_dir == str(tmp_path / "convmae_data")
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'mlruns.db'}"
    clean_env.setenv(HOME_ENV, str(tmp_path / "home"))  # the same through the environment
    evaluated = resolve_locations(EvaluateConfig(output="scores.json"))
    assert evaluated.tracking_uri == f"sqlite:///{tmp_path / 'home' / 'mlruns.db'}"
    assert evaluated.output == str(tmp_path / "home" / "scores.json")


def test_an_object_store_root_needs_an_mlflow_server_and_prepared_data(clean_env):
    base = with_overrides(PretrainConfig(), {"storage.root": "s3://bucket/convmae"})
    with pytest.raises(ConfigError, match="MLflow server"):
        resolve_locations(with_overrides(base, {"data.url": "s3://bucket/data"}))
    with pytest.raises(ConfigError, match="data.url"):
        resolve_locations(with_overrides(base, {"mlflow.tracking_uri": "http://mlflow:5000"}))
    cfg = resolve_locations(with_overrides(base, {"mlflow.tracking_uri": "http://mlflow:5000",
                                                  "data.url": "s3://bucket/data"}))
    assert cfg.checkpoint.storage_path == "s3://bucket/convmae/convmae_runs"


def test_the_job_cli_refuses_before_any_work_under_ray_job_submit(clean_env, tmp_path):
    env = {"PATH": "/usr/bin:/bin", RAY_JOB_ENV: "{}", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "pretrain.py"), "--print-config"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--storage.root" in done.stderr
    rooted = subprocess.run([sys.executable, str(REPO / "jobs" / "pretrain.py"), "--print-config",
                             "--storage.root", str(tmp_path / "home")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert rooted.returncode == 0 and f"storage_path: {tmp_path / 'home' / 'convmae_runs'}" in rooted.stdout
