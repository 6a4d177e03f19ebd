"""Every line a process of ours logs or dies with passes through redaction.

A URL given as ``http://user:password@host`` reaches messages in many ways: our own log lines,
a library's warning that quotes its client's URL (MLflow's, botocore's), an exception's text in a
traceback. Redacting at each call site misses the next one, so redaction sits where every
message is made instead: the process's log record factory (every logger, whatever its handlers)
and its last-resort exception hooks. The job's one-line errors go through ``redact_text`` too
(``service.cli``), and so does what a job prints as its result (``redacted_stdout``).

Known third-party noise is silenced where it is made, so that a job's output holds our lines
and real problems only. Each entry says why it is noise; a library's warnings and errors
otherwise pass untouched:

- Ray Train's INFO lines (resource requests, worker-group start, "Reporting training result"
  and "Checkpoint successfully created" every checkpoint): Ray Train's own ``LoggingConfig``
  at WARNING (``service.training.launch``); they stay in Ray's session log files.
- Ray's "Token authentication is enabled for this Ray cluster" on every local start: the
  cluster we start always has token auth (README, Security).
- Ray's "SIGTERM handler is not set because current thread is not the main thread" when a job
  joins a cluster: ``service.runtime.cluster`` joins from a thread on purpose (a deadline), and
  the job's own SIGTERM handler is the one it wants.
- MLflow's "Creating initial MLflow database tables" / "Updating database tables" of a new
  sqlite store, and its "Successfully registered model" / "Created version" (we log the
  registered version ourselves).
- DeepSpeed's "Setting accelerator to CPU" on machines without a GPU (``DS_ACCELERATOR`` is set
  to cpu there instead of left to detection), "... built successfully" of its prebuilt CPU comm
  op, and ``zero_to_fp32``'s four progress prints and its "Loading checkpoint shards" progress
  bar per exported checkpoint.
- MLflow's "Downloading artifacts" progress bar each time a job loads a registered model (a
  handful of small files; it draws over the job's own lines): ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``
  is false unless the environment sets it.
- MLflow's system metrics monitor's start and stop lines and its "Skip logging GPU metrics" on a
  CPU worker: a run logs system metrics when ``mlflow.system_metrics`` asks for them (the
  default); that it starts and stops doing so is not news.
- Ray Train's "Error in training function:" with the worker's traceback, when the error is bad
  input (``service.job_errors.USER_ERRORS``: a damaged shard, an image size the model refuses):
  the job reports it in one line and exits 2, and the traceback of where our code noticed it
  says nothing more. Any other error keeps its traceback, in the worker's forwarded lines.
- Ray core's "Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the
  object store and max_restarts > 0" (an ``E`` line of the Train controller's core worker, on
  runs whose preemption watcher is on: those on a cluster joined by address, as ``ray job
  submit`` runs are). Ray Train creates its watcher with the run's worker actor handles as
  arguments and restarts it on failure; Ray warns that a restart fails once such arguments are
  gone, and these go only with the run itself (ray-project/ray#53727). It is a C++ line in
  another process, so it is dropped where Ray prints forwarded lines in the driver
  (``quiet_forwarded_noise``, called once Ray is connected).
- Ray Train's "Detected that the Ray Train controller actor (...) is dead. Cleaning up placement
  group" (its PlacementGroupCleaner actor): printed for a sweep trial that Tune stops (ASHA, the
  end of a trial), whose placement group Tune frees with the controller in it; the cleanup is
  Ray's own, and where a controller dies in earnest the job fails with its own error line.
  Dropped with the line above.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TextIO

from service.config import redact_text

_TRACEBACKS = logging.Formatter()

# logger -> what part of its messages is noise (see the module docstring).
_NOISY_MESSAGES: dict[str, tuple[str, ...]] = {
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray",),
    "mlflow.store.db.utils": ("Creating initial MLflow database tables", "Updating database tables"),
    "ray._private.worker": ("SIGTERM handler is not set because current thread is not the main thread",),
    "mlflow.system_metrics.system_metrics_monitor": (
        "Started monitoring system metrics", "Stopping system metrics monitoring",
        "Successfully terminated system metrics monitoring", "Skip logging GPU metrics"),
}
# What third-party calls print (not log) that is noise, dropped around those calls.
DEEPSPEED_PRINTS = (r"^DeepSpeed .* built successfully$", r"^Processing zero checkpoint ",
                    r"^Parsing checkpoint created by deepspeed", r"^Detected checkpoint of type zero stage",
                    r"^Reconstructed (Frozen )?fp32 state dict with ")
# DeepSpeed's zero_to_fp32 draws a tqdm bar on stderr ("Loading checkpoint shards") per export.
DEEPSPEED_PROGRESS_BARS = (r"Loading checkpoint shards: ",)
MLFLOW_REGISTRY_PRINTS = (r"^Successfully registered model ", r"^Created version '.*' of model ")
# What the job's other processes print (Ray forwards their lines to the driver) that is noise.
FORWARDED_NOISE = (r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .*has constructor arguments "
                   r"in the object store and max_restarts > 0",
                   r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group")
# Ray Train's logger of a worker's failed training function (with its traceback).
TRAIN_FUNCTION_ERRORS = "ray.train.v2._internal.util"


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """``record`` with its message (arguments merged in) and traceback redacted."""
    try:
        message = record.getMessage()
    except Exception:  # a malformed logging call: logging's own error report names it
        return record
    clean = redact_text(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        text = _TRACEBACKS.formatException(record.exc_info)
        clean = redact_text(text)
        if clean != text:
            record.exc_text = clean  # formatters print exc_text when it is set
    return record


def install_redaction() -> None:
    """Makes every log record this process creates, and any uncaught exception it prints,
    pass through ``redact_text``. Idempotent; Ray's own record factory, installed before or
    after, chains with this one."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts", False):
        return

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(factory(*args, **kwargs))

    redacting_factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting_factory)
    sys.excepthook = _redacting_excepthook
    threading.excepthook = _redacting_thread_excepthook


def quiet_known_noise() -> None:
    """Drops the known noise third-party loggers make (the module docstring lists it and why).
    Idempotent."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():  # what DeepSpeed would detect, minus its warning
            os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    noisy = dict(_NOISY_MESSAGES)
    # Ray Train names this logger by its file's path, outside the ``ray.train`` logger whose
    # level its LoggingConfig sets.
    reports = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if reports is not None and reports.origin:
        noisy[reports.origin] = ("Reporting training result",)
    for name, fragments in noisy.items():
        _add_filter(logging.getLogger(name), _Dropping(fragments))
    _add_filter(logging.getLogger(TRAIN_FUNCTION_ERRORS), _DroppingUserErrorTracebacks())
    # In Ray Train workers ``print`` logs to the root logger (Ray's print patch).
    _add_filter(logging.getLogger(), _Dropping(patterns=DEEPSPEED_PRINTS + MLFLOW_REGISTRY_PRINTS))


def quiet_forwarded_noise() -> None:
    """Drops the known noise (``FORWARDED_NOISE``) from the lines Ray forwards to this driver
    from the job's other processes (workers, actors, on any node); every other line is printed
    as Ray prints it. Call once Ray is connected: ``ray.init`` installs Ray's printer. Idempotent."""
    try:  # Ray's printer of forwarded lines is private: another Ray version prints them all
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        handlers = list(dispatcher.handlers)
    except (ImportError, AttributeError):
        return
    patterns = [re.compile(p) for p in FORWARDED_NOISE]
    for name, printer in handlers:
        if name != "ray_print_logs" or getattr(printer, "drops_noise", False):
            continue

        def printing(data: dict[str, Any], _printer: Any = printer) -> None:
            lines = [line for line in data.get("lines", []) if not any(p.search(line) for p in patterns)]
            if lines or not data.get("lines"):
                _printer({**data, "lines": lines})

        printing.drops_noise = True  # type: ignore[attr-defined]
        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, printing)


def _add_filter(logger: logging.Logger, dropping: logging.Filter) -> None:
    if not any(type(f) is type(dropping) for f in logger.filters):
        logger.addFilter(dropping)


class _DroppingUserErrorTracebacks(logging.Filter):
    """Drops Ray Train's report of a failed training function when the error is bad input.

    Ray Train logs it from inside the ``except`` block that caught the error (``construct_user_
    exception_with_traceback``), so the exception being handled is the one it reports."""

    def filter(self, record: logging.LogRecord) -> bool:
        from service.job_errors import user_error_behind

        error = sys.exc_info()[1]
        return not (error is not None and record.getMessage().startswith("Error in training function")
                    and user_error_behind(error) is not None)


class _Dropping(logging.Filter):
    """Drops records whose message holds one of ``fragments`` or matches one of ``patterns``."""

    def __init__(self, fragments: tuple[str, ...] = (), patterns: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.fragments = fragments
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (any(f in message for f in self.fragments) or any(p.search(message) for p in self.patterns))


def _redacting_excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, value, tb))))


def _redacting_thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    sys.stderr.write(f"Exception in thread {name}:\n")
    _redacting_excepthook(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)


class _RedactingWriter(io.TextIOBase):
    def __init__(self, target: TextIO) -> None:
        self._target = target

    def write(self, text: str) -> int:
        self._target.write(redact_text(text))
        return len(text)

    def flush(self) -> None:
        self._target.flush()


@contextmanager
def redacted_stdout() -> Iterator[None]:
    """What the block prints to stdout passes through ``redact_text`` (a job's result table may
    quote the ``--model`` URL it was given)."""
    target = sys.stdout
    sys.stdout = _RedactingWriter(target)
    try:
        yield
    finally:
        sys.stdout = target


class _LineDroppingWriter(io.TextIOBase):
    def __init__(self, target: TextIO, patterns: tuple[str, ...]) -> None:
        self._target = target
        self._patterns = [re.compile(p) for p in patterns]
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if not any(p.search(line) for p in self._patterns):
                self._target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending and not any(p.search(self._pending) for p in self._patterns):
            self._target.write(self._pending)
        self._pending = ""
        self._target.flush()


@contextmanager
def dropping_printed_lines(patterns: tuple[str, ...], stream: str = "stdout") -> Iterator[None]:
    """Lines the block prints to ``stream`` (stdout or stderr) that match one of ``patterns``
    (regular expressions) are dropped: known noise a library prints instead of logging; every
    other line passes."""
    target = getattr(sys, stream)
    writer = _LineDroppingWriter(target, patterns)
    setattr(sys, stream, writer)
    try:
        yield
    finally:
        writer.flush()
        setattr(sys, stream, target)
