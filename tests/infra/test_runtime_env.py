"""infra/runtime_env.yaml: a valid Ray runtime_env for `ray job submit --working-dir .`."""

from __future__ import annotations

import re

from ray.runtime_env import RuntimeEnv

from tests.infra.infra_lib import README, REPO, RUNTIME_ENV_YAML, yaml_docs

ENV = yaml_docs(RUNTIME_ENV_YAML)[0]


def test_is_a_valid_ray_runtime_env():
    RuntimeEnv(**ENV)


def test_leaves_working_dir_to_the_command_line():
    """--working-dir . on the CLI decides what is uploaded; a second one here would conflict."""
    assert "working_dir" not in ENV and "py_modules" not in ENV


def test_excludes_keep_the_upload_small_and_clean():
    excludes = set(ENV["excludes"])
    for must in (
        ".git/",
        "mlruns/",
        "convmae_data/",
        "convmae_runs/",
        ".venv/",
        "infra/local/.env",
    ):
        assert must in excludes, must


def default_outputs() -> list[str]:
    """What the jobs write into the working directory when given no locations, from their
    configs' own defaults."""
    from service.config import DataConfig, PretrainConfig, ReconstructConfig, TuneJobConfig
    from service.config.locations import DEFAULT_MLFLOW_DB

    folders = [PretrainConfig().checkpoint.storage_path, TuneJobConfig().sweep.storage_path,
               DataConfig().embedded_dir, "mlartifacts"]  # MLflow's artifacts beside its sqlite store
    return [f"{f}/" for f in folders] + [DEFAULT_MLFLOW_DB, ReconstructConfig().out]


def test_every_default_output_is_neither_uploaded_nor_committed():
    """A job's outputs in a checkout must not travel with `ray job submit --working-dir .` nor
    make git (and so every run's `git_dirty` tag) see the checkout as changed."""
    excludes = set(ENV["excludes"])
    ignored = set((REPO / ".gitignore").read_text().split())
    for output in default_outputs():
        assert output in excludes, f"{output} is uploaded by --working-dir ."
        assert output in ignored, f"{output} is not in .gitignore"


def test_carries_no_secrets():
    for key, value in ENV.get("env_vars", {}).items():
        assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", key, re.I), key
        assert isinstance(value, str), f"{key}: env_vars values must be strings"


def test_readme_documents_the_submit_command():
    text = README.read_text()
    assert "--working-dir . --runtime-env infra/runtime_env.yaml -- python jobs/pretrain.py" in text
