"""The exceptions a job reports as a bad input (exit status 2, one clear line), not a crash."""

from __future__ import annotations

from convmae import CheckpointMismatchError
from service.config import ConfigError
from service.data import DataError
from service.models.source import ModelSourceError
from service.runtime.safe_checkpoint import CheckpointError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, ModelSourceError, CheckpointMismatchError,
                                            CheckpointError)
