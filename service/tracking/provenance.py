"""Which code a run ran: the git commit, and whether the checkout had uncommitted changes.

``ray job submit --working-dir .`` uploads the files without ``.git``: on the cluster the
driver cannot ask git. So provenance is taken on the submitting side. The driver asks git when
its own code is a git checkout (local runs), else reads ``CONVMAE_GIT_COMMIT`` and
``CONVMAE_GIT_DIRTY``, set by whoever submitted the job. This module run as a program prints
them for the submitting shell (see README, "Run on a cluster")::

    ray job submit --working-dir . --runtime-env infra/runtime_env.yaml -- \\
        env $(python3 -m service.tracking.provenance) python jobs/pretrain.py ...
    ray job submit --working-dir . \\
        --runtime-env-json "$(python3 -m service.tracking.provenance --runtime-env infra/runtime_env.yaml)" \\
        -- python jobs/pretrain.py ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

COMMIT_ENV = "CONVMAE_GIT_COMMIT"
DIRTY_ENV = "CONVMAE_GIT_DIRTY"
UNKNOWN = "unknown"
# The checkout this code is in, when it is one: service/tracking/provenance.py -> the root.
CODE_ROOT = Path(__file__).resolve().parents[2]


def provenance(code_root: Path = CODE_ROOT) -> dict[str, str]:
    """``{"git_commit": SHA, "git_dirty": "true"|"false"}`` from git when ``code_root`` is a
    checkout, else from the environment; ``unknown`` for what neither knows."""
    found = from_git(code_root)
    if found is not None:
        return found
    return {"git_commit": os.environ.get(COMMIT_ENV, "").strip() or UNKNOWN,
            "git_dirty": _flag(os.environ.get(DIRTY_ENV, ""))}


def from_git(code_root: Path = CODE_ROOT) -> dict[str, str] | None:
    """The commit and dirty flag of the checkout at ``code_root``; None when it is not the top
    of a git checkout (an upload, an image, an installed package) or git is missing."""
    top = _git(code_root, "rev-parse", "--show-toplevel")
    # Only this project's own checkout: code copied into some other repository is not ours.
    if top is None or Path(top).resolve() != code_root.resolve():
        return None
    commit = _git(code_root, "rev-parse", "HEAD")
    status = _git(code_root, "status", "--porcelain")
    if not commit:
        return None
    return {"git_commit": commit, "git_dirty": UNKNOWN if status is None else str(bool(status)).lower()}


def submit_env(code_root: Path = CODE_ROOT) -> dict[str, str]:
    """The variables that carry this checkout's provenance to a submitted job."""
    found = provenance(code_root)
    return {COMMIT_ENV: found["git_commit"], DIRTY_ENV: found["git_dirty"]}


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _flag(value: str) -> str:
    value = value.strip().lower()
    if value in ("1", "true", "yes"):
        return "true"
    if value in ("0", "false", "no"):
        return "false"
    return UNKNOWN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m service.tracking.provenance",
        description="Print this checkout's git provenance for `ray job submit`: as KEY=VALUE words for "
                    "`env` in the entrypoint, or merged into a runtime env for --runtime-env-json.")
    parser.add_argument("--runtime-env", metavar="YAML",
                        help="print this runtime_env file as JSON with the variables added to its env_vars")
    args = parser.parse_args(argv)
    env = submit_env()
    if args.runtime_env:
        import yaml

        runtime_env = yaml.safe_load(Path(args.runtime_env).read_text()) or {}
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **env}
        print(json.dumps(runtime_env))
    else:
        print(" ".join(f"{k}={v}" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
