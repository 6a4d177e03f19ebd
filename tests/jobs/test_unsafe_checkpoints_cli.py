"""The reproduction of the issue through the jobs as users run them: a DeepSpeed checkpoint
folder (local or ``s3://``) or an official-style ``.pth`` holding a pickled payload that runs a
shell command when unpickled. The command must never run; the job exits 2 naming the file."""

from __future__ import annotations

import pytest

from tests.jobs.test_jobs_cli import run_job
from tests.service.runtime.test_safe_checkpoint import Payload, plant_payload


def assert_refused(out, marker, named: str) -> None:
    assert not marker.exists(), "the payload ran"
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-3000:])
    last = out.stderr.strip().splitlines()[-1]
    assert named in last and "posix.system" in last and "refusing to load" in last, last


@pytest.mark.parametrize("job", ["evaluate", "reconstruct"])
def test_a_payload_in_a_local_deepspeed_folder_never_runs(job, digits_dir, tmp_path):
    marker = tmp_path / "MARKER"
    plant_payload(tmp_path / "evil", marker)
    out = run_job(job, "--model", "evil", "--data.embedded_dir", str(digits_dir), cwd=tmp_path)
    assert_refused(out, marker, "evil/ds/mp_rank_00_model_states.pt")


def test_a_payload_in_an_s3_deepspeed_folder_never_runs(s3_bucket, digits_dir, tmp_path):
    import fsspec

    marker = tmp_path / "MARKER"
    plant_payload(tmp_path / "evil", marker)
    fsspec.filesystem("s3").put(str(tmp_path / "evil"), f"{s3_bucket.removeprefix('s3://')}/evil", recursive=True)
    out = run_job("evaluate", "--model", f"{s3_bucket}/evil", "--data.embedded_dir", str(digits_dir), cwd=tmp_path)
    assert_refused(out, marker, f"{s3_bucket}/evil/ds/mp_rank_00_model_states.pt")


def test_a_payload_in_an_official_style_checkpoint_file_never_runs(digits_dir, tmp_path):
    import torch

    marker = tmp_path / "MARKER"
    torch.save({"model": {}, "args": Payload(marker)}, tmp_path / "convmae_pretrain.pth")
    out = run_job("evaluate", "--model", "convmae_pretrain.pth", "--data.embedded_dir", str(digits_dir), cwd=tmp_path)
    assert not marker.exists(), "the payload ran"
    assert out.returncode == 2 and "'convmae_pretrain.pth': not a loadable checkpoint" in out.stderr, out.stderr[-2000:]
