"""Every line a process of ours logs or dies with passes through redaction.

A URL given as ``http://user:password@host`` reaches messages in many ways: our own log lines,
a library's warning that quotes its client's URL (MLflow's, botocore's), an exception's text in a
traceback. Redacting at each call site misses the next one, so redaction sits where every
message is made instead: the process's log record factory (every logger, whatever its handlers)
and its last-resort exception hooks. The job's one-line errors go through ``redact_text`` too
(``service.cli``), and so does what a job prints as its result (``redacted_stdout``).
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TextIO

from service.config import redact_text

_TRACEBACKS = logging.Formatter()


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
