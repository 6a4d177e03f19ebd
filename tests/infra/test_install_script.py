"""scripts/install.sh changes nothing outside its Python without saying so: it names both
paths when it re-points another checkout's editable install, and who made pip upgrade
setuptools. Its functions are sourced and run with a stand-in for `pip show`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "install.sh"


def run_sourced(body: str, pip_show_output: str = "") -> subprocess.CompletedProcess:
    """``body`` run in bash after sourcing install.sh, with `pip show` answering
    ``pip_show_output``."""
    fake = f"pip_show() {{ printf '%b' {pip_show_output!r}; }}"
    return subprocess.run(["bash", "-c", f"source {SCRIPT}; {fake}; {body}"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def show(location: str | None) -> str:
    editable = f"Editable project location: {location}\n" if location else ""
    return f"Name: convmae-service\nVersion: 0.1.0\nLocation: /usr/lib/python3/site-packages\n{editable}"


def test_re_pointing_another_checkouts_editable_install_is_said_naming_both(tmp_path):
    other = tmp_path / "other-clone"
    other.mkdir()
    done = run_sourced(f"check_editable_elsewhere {REPO}", show(str(other)))
    assert done.returncode == 0  # CI's fresh clone on a developer's machine must still install
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"from {other} to {REPO}" in lines[0] and "re-pointing" in lines[0]


@pytest.mark.parametrize("installed", ["this checkout", "a plain wheel", "nothing"])
def test_nothing_to_say_when_no_other_checkout_is_installed(installed):
    output = {"this checkout": show(str(REPO)), "a plain wheel": show(None), "nothing": ""}[installed]
    done = run_sourced(f"check_editable_elsewhere {REPO}", output)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_setuptools_upgrade_is_named_with_who_asked():
    from importlib.metadata import requires

    torch_wants = next(r for r in requires("torch") if r.startswith("setuptools"))
    done = run_sourced("setuptools_note 60.0.0 99.0.0; setuptools_note 99.0.0 99.0.0")
    assert done.returncode == 0
    assert done.stderr.count("\n") == 1  # unchanged: nothing said
    assert "setuptools 60.0.0 -> 99.0.0" in done.stderr and f"torch requires {torch_wants}" in done.stderr


def test_unknown_options_are_refused_before_anything_is_installed():
    # PYTHON=false: should the refusal ever regress, the script fails at once instead of installing.
    done = subprocess.run(["bash", str(SCRIPT), "--dev", "--frce"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "false"})
    assert done.returncode == 2
    assert "unknown option '--frce'; allowed: --dev" in done.stderr


def test_the_script_never_upgrades_setuptools_itself():
    script = SCRIPT.read_text()
    assert "install --upgrade setuptools" not in script and "-U setuptools" not in script
    assert 'requires = ["setuptools>=68"' in (REPO / "pyproject.toml").read_text()  # built in pip's isolated env
