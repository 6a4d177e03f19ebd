"""Bad input found in Ray Train workers or Tune trials is found again behind Ray's wrappers,
after the trip through pickle that brings it to the driver."""

from __future__ import annotations

import pickle

import pytest
from ray.exceptions import RayTaskError
from ray.train import ControllerError, TrainingFailedError, WorkerGroupError

from convmae import CheckpointMismatchError
from service.config import ConfigError
from service.data import DataError
from service.job_errors import USER_ERRORS, user_error_behind
from service.runtime.safe_checkpoint import CheckpointError


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
