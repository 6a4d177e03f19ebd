"""The exceptions a job reports as a bad input (exit status 2, one clear line), not a crash,
and finding one behind the errors Ray wraps it in."""

from __future__ import annotations

from convmae import CheckpointMismatchError
from service.config import ConfigError
from service.data import DataError
from service.models.source import ModelSourceError
from service.runtime.safe_checkpoint import CheckpointError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, ModelSourceError, CheckpointMismatchError,
                                            CheckpointError)


def user_error_behind(exc: BaseException) -> Exception | None:
    """The bad-input error (one of ``USER_ERRORS``) that ``exc`` is or was caused by, else None.

    Errors found in Ray Train workers reach the driver wrapped: Ray Train's
    ``WorkerGroupError.worker_failures`` (rank -> the worker's exception, unpickled here, so
    our types survive), ``ControllerError.controller_failure``, a Ray task's ``cause`` (Tune
    trials), and explicit chaining (``raise ... from``). Implicit context (an error raised
    while handling another) is not followed: that second error is what went wrong.
    """
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        error = pending.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        # A Ray task error also passes for an instance of its cause's type, but its message is
        # the remote traceback: the cause itself is the one to report.
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            pending.append(cause)
            continue
        if isinstance(error, USER_ERRORS):
            return error
        failures = getattr(error, "worker_failures", None)
        if isinstance(failures, dict):
            pending.extend(failure for _, failure in sorted(failures.items()) if isinstance(failure, BaseException))
        controller_failure = getattr(error, "controller_failure", None)
        if isinstance(controller_failure, BaseException):
            pending.append(controller_failure)
        if error.__cause__ is not None:
            pending.append(error.__cause__)
    return None


def raise_user_error_behind(exc: BaseException) -> None:
    """Raises the bad-input error behind ``exc`` (see ``user_error_behind``) in its place, if
    there is one; returns otherwise, for the caller to re-raise ``exc``."""
    error = user_error_behind(exc)
    if error is not None and error is not exc:
        raise error from None
