"""Scratch folders (checkpoints before upload, model downloads) never outlive their process:
removed when their block ends however it ends, and swept at the next start when the process
was killed outright."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from service.data.scratch import scratch, scratch_dir, sweep_stale_scratch

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("stop", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_scratch_folder_is_removed_however_its_block_ends(tmp_path, stop):
    with pytest.raises(type(stop)):
        with scratch("ckpt", root=tmp_path) as folder:
            (folder / "shard.pt").write_bytes(b"x" * 1024)
            raise stop
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def killed_holding_a_scratch_folder(root: Path, kind: str) -> Path:
    """A process that creates a scratch folder, writes into it and is killed (SIGKILL)."""
    code = ("import os, signal, sys; from service.data.scratch import scratch_dir; "
            f"folder = scratch_dir({kind!r}, root=sys.argv[1]); (folder / 'part').write_text('x'); "
            "print(folder, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return Path(proc.stdout.strip())


def test_what_a_killed_process_left_is_swept_at_the_next_start(tmp_path):
    left = [killed_holding_a_scratch_folder(tmp_path, kind) for kind in ("ckpt", "model")]
    assert all(folder.is_dir() and folder.name.startswith(f"convmae-{kind}-")
               for folder, kind in zip(left, ("ckpt", "model")))
    mine = scratch_dir("ckpt", root=tmp_path)  # this process is alive: kept
    other_host = tmp_path / f"convmae-ckpt-{left[0].name.split('-')[2]}-00000000-x"  # pids of another machine
    other_host.mkdir()
    unrelated = tmp_path / "convmae-notes"
    unrelated.mkdir()
    assert sorted(sweep_stale_scratch(tmp_path)) == sorted(left)
    assert sorted(tmp_path.iterdir()) == sorted([mine, other_host, unrelated])


def test_a_scratch_kind_is_a_plain_word():
    with pytest.raises(ValueError, match="scratch kind '../x' is not allowed"):
        scratch_dir("../x")


def test_a_sweep_of_a_missing_temp_directory_finds_nothing(tmp_path):
    assert sweep_stale_scratch(tmp_path / "none") == []
