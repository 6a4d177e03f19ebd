"""Which exceptions a job reports as bad input (exit 2, one line) and which stay crashes."""

from __future__ import annotations

import pytest

from convmae import CheckpointMismatchError
from service.cli import run_job
from service.config import ConfigError, PretrainConfig
from service.data import DataError
from service.job_errors import USER_ERRORS
from service.models.source import ModelSourceError
from service.runtime.safe_checkpoint import CheckpointError
from service.training.lease import RunLeaseError


def job_raising(exc: Exception, capsys: pytest.CaptureFixture) -> tuple[int | None, str]:
    """Runs a job whose run raises ``exc``: its exit status and what it printed to stderr."""

    def run(cfg: PretrainConfig) -> None:
        raise exc

    with pytest.raises(SystemExit) as exit_:
        run_job("job.py", "a job", PretrainConfig, "job.py", run, lambda result, cfg: 0, [])
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("error", [
    ConfigError("train.blr=-1: expected > 0"),
    DataError("s3://bucket/data: bucket 'bucket' does not exist"),
    ModelSourceError("--model 'models:/x/9': no such version"),
    CheckpointMismatchError("official checkpoint does not match this ConvMAE"),
    CheckpointError("ckpt/ds/model.pt: not in the manifest"),
    RunLeaseError("run_name='tiny' is in use by another run"),  # a ConfigError: caught as one
], ids=lambda e: type(e).__name__)
def test_bad_input_found_while_running_exits_2_with_one_line(error, capsys):
    code, err = job_raising(error, capsys)
    assert code == 2
    assert err == f"job.py: error: {error}\n"


@pytest.mark.parametrize("crash", [RuntimeError("NCCL timeout"), ValueError("a bug"), KeyError("step"),
                                   FileNotFoundError("/tmp/x")], ids=lambda e: type(e).__name__)
def test_a_crash_is_not_taken_for_bad_input(crash, capsys):
    assert not isinstance(crash, USER_ERRORS)
    with pytest.raises(type(crash)):
        job_raising(crash, capsys)
