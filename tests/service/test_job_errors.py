"""Which exceptions a job reports as bad input (exit 2, one line) and which stay crashes, also
when Ray Train workers or Tune trials found them: found again behind Ray's wrappers, after the
trip through pickle that brings them to the driver."""

from __future__ import annotations

import pickle
import signal

import pytest
from ray.exceptions import RayTaskError
from ray.train import ControllerError, TrainingFailedError, WorkerGroupError

from convmae import CheckpointMismatchError
from service.cli import Interrupted, run_job
from service.config import ConfigError, PretrainConfig
from service.data import DataError
from service.job_errors import USER_ERRORS, user_error_behind
from service.models.source import ModelSourceError
from service.runtime.safe_checkpoint import CheckpointError
from service.training.lease import RunLeaseError


def across_processes(error: BaseException) -> BaseException:
    """As Ray hands a worker's error to the driver: pickled, unpickled."""
    return pickle.loads(pickle.dumps(error))


@pytest.mark.parametrize("error", [
    DataError("s3://b/ds/shard-000003.tar: checksum mismatch"),
    ConfigError("train.seed=1 is not allowed"),
    CheckpointError("ckpt/model.pt: refused", path="ckpt/model.pt"),
    CheckpointMismatchError("the checkpoint does not fit", missing=["head.weight"]),
])
def test_a_workers_bad_input_is_found_behind_the_worker_group_error(error):
    wrapped = across_processes(WorkerGroupError("rank 1 failed", {0: RuntimeError("peer gone"), 1: error}))
    found = user_error_behind(wrapped)
    assert type(found) is type(error) and str(found) == str(error)
    assert vars(found) == vars(error)


def test_ray_task_errors_and_controller_errors_are_looked_through():
    cause = DataError("data.url='/d' has 3 samples, fewer than one global batch of 32")
    task_error = across_processes(RayTaskError("_run_trial", "Traceback (most recent call last): ...", cause))
    # Ray's task error also passes for its cause's type; its message is the remote traceback.
    found = user_error_behind(task_error)
    assert type(found) is DataError and str(found) == str(cause)
    assert user_error_behind(ControllerError(cause)) is cause


def test_explicit_causes_are_followed_but_not_errors_raised_while_handling_another():
    cause = DataError("bad shard")
    try:
        raise TrainingFailedError("training failed") from cause
    except TrainingFailedError as exc:
        assert user_error_behind(exc) is cause
    try:
        try:
            raise cause
        except DataError:
            raise RuntimeError("cleanup failed too")  # noqa: B904 (the implicit context is the point)
    except RuntimeError as exc:
        assert user_error_behind(exc) is None


def test_crashes_stay_crashes():
    crash = across_processes(WorkerGroupError("boom", {0: ZeroDivisionError("x"), 1: MemoryError()}))
    assert user_error_behind(crash) is None
    assert not isinstance(crash, USER_ERRORS)


# ---------------------------------------------------------------- what run_job makes of them


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


@pytest.mark.parametrize(("stop", "status", "line"), [
    (KeyboardInterrupt(), 130, "job.py: stopped by Ctrl+C; run the same command again to resume\n"),
    (Interrupted(signal.SIGTERM), 143, "job.py: stopped by SIGTERM; run the same command again to resume\n"),
], ids=["ctrl-c", "ray-job-stop"])
def test_a_stopped_job_says_so_in_one_line_with_the_shells_status(stop, status, line, capsys):
    assert job_raising(stop, capsys) == (status, line)
