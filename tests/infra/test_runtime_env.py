"""infra/runtime_env.yaml: a valid Ray runtime_env for `ray job submit --working-dir .`."""

from __future__ import annotations

import re

from ray.runtime_env import RuntimeEnv

from tests.infra.infra_lib import README, RUNTIME_ENV_YAML, yaml_docs

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


def test_carries_no_secrets():
    for key, value in ENV.get("env_vars", {}).items():
        assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", key, re.I), key
        assert isinstance(value, str), f"{key}: env_vars values must be strings"


def test_readme_documents_the_submit_command():
    text = README.read_text()
    assert "--working-dir . --runtime-env infra/runtime_env.yaml -- python jobs/pretrain.py" in text
