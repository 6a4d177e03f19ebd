"""Provenance (git commit, dirty flag): from git in a checkout, from the submitter's variables
in an upload without .git (what ``ray job submit --working-dir .`` runs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.tracking.provenance import COMMIT_ENV, DIRTY_ENV, from_git, provenance, submit_env

REPO = Path(__file__).resolve().parents[3]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture()
def checkout(tmp_path) -> Path:
    root = tmp_path / "checkout"
    root.mkdir()
    git(root, "init", "-q")
    (root / "a.py").write_text("x = 1\n")
    git(root, "add", "a.py")
    git(root, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "first")
    return root


def test_a_checkout_gives_its_commit_and_whether_it_has_changes(checkout, monkeypatch):
    monkeypatch.setenv(COMMIT_ENV, "from-the-environment")  # git, where there is one, wins
    head = git(checkout, "rev-parse", "HEAD")
    assert provenance(checkout) == {"git_commit": head, "git_dirty": "false"}
    (checkout / "a.py").write_text("x = 2\n")
    assert provenance(checkout) == {"git_commit": head, "git_dirty": "true"}
    # Code copied into a folder of some other repository is not that repository's commit.
    (checkout / "vendored").mkdir()
    assert from_git(checkout / "vendored") is None


def test_without_git_the_submitters_variables_are_the_provenance(tmp_path, monkeypatch):
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    monkeypatch.delenv(DIRTY_ENV, raising=False)
    assert provenance(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}
    monkeypatch.setenv(COMMIT_ENV, "0123abc")
    monkeypatch.setenv(DIRTY_ENV, "1")
    assert provenance(tmp_path) == {"git_commit": "0123abc", "git_dirty": "true"}


def test_the_helper_output_carries_this_checkout_into_an_upload_without_git(tmp_path):
    """``env $(python3 -m service.tracking.provenance) python jobs/...`` as the entrypoint of
    ``ray job submit --working-dir .``: the job runs from an upload without .git."""
    out = subprocess.run([sys.executable, "-m", "service.tracking.provenance"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    expected = submit_env(REPO)
    assert out == [f"{k}={v}" for k, v in expected.items()]
    assert expected[COMMIT_ENV] == git(REPO, "rev-parse", "HEAD")

    upload = tmp_path / "working_dir"
    for package in ("service", "convmae"):
        shutil.copytree(REPO / package, upload / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in (COMMIT_ENV, DIRTY_ENV)}
    code = "import json; from service.tracking.provenance import provenance; print(json.dumps(provenance()))"
    ran = subprocess.run(["env", *out, sys.executable, "-c", code], cwd=upload, env=env, capture_output=True,
                         text=True, check=True)
    assert json.loads(ran.stdout) == {"git_commit": expected[COMMIT_ENV], "git_dirty": expected[DIRTY_ENV]}

    runtime_env = subprocess.run(
        [sys.executable, "-m", "service.tracking.provenance", "--runtime-env", "infra/runtime_env.yaml"],
        cwd=REPO, capture_output=True, text=True, check=True).stdout
    merged = json.loads(runtime_env)  # for --runtime-env-json: the file's settings plus the variables
    assert merged["env_vars"][COMMIT_ENV] == expected[COMMIT_ENV] and merged["env_vars"]["NCCL_DEBUG"] == "WARN"
    assert ".git/" in merged["excludes"]
