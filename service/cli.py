"""Shared command-line handling of the jobs: ``--config FILE`` plus dotted overrides."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from service.config import (
    ConfigError,
    dump_yaml,
    flatten,
    key_docs,
    load_config,
    parse_cli_overrides,
    redact_text,
)
from service.config.locations import resolve_locations

C = TypeVar("C")
R = TypeVar("R")


def setup_logging(level: int = logging.INFO) -> None:
    """The job's log format, quieter third-party loggers, and redaction of every message."""
    from service.runtime.logs import install_redaction, quiet_known_noise

    install_redaction()
    quiet_known_noise()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "botocore", "s3fs", "aiobotocore", "alembic", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def overrides_help(config_cls: type, aliases: Mapping[str, str] | None = None) -> str:
    """Every config key with its default and what it does (from its comment in the source)."""
    docs = key_docs(config_cls)
    lines = []
    for key, default in flatten(config_cls()).items():
        lines.append(f"  --{key} {default!r}")
        doc = docs.get(key) or next((d for k, d in docs.items() if key.startswith(k + ".")), "")
        lines += textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      ",
                               break_on_hyphens=False)
    text = "config keys (override any with --KEY VALUE; defaults shown):\n" + "\n".join(lines)
    if aliases:
        text += "\n\nshort forms:\n" + "\n".join(f"  --{a.replace('_', '-')} VALUE  =  --{k} VALUE"
                                                  for a, k in aliases.items())
    return text


def build_parser(prog: str, description: str, config_cls: type, example: str, *,
                 positionals: Sequence[str] = (), aliases: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """``--config FILE``, ``--print-config``, the config's keys as dotted flags, and
    ``positionals``: config keys that may also be given in order as plain arguments."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{overrides_help(config_cls, aliases)}\n\nexample:\n  {example}",
    )
    for key in positionals:
        parser.add_argument(key, metavar=key.upper(), nargs="?", help=f"the same as --{key}")
    parser.add_argument("--config", help="YAML config file (see jobs/configs/); flags override it")
    parser.add_argument("--print-config", action="store_true",
                        help="validate and print the resolved config, then exit without running")
    return parser


def parse_config(parser: argparse.ArgumentParser, config_cls: type[C], argv: Sequence[str] | None, *,
                 positionals: Sequence[str] = (), aliases: Mapping[str, str] | None = None,
                 ) -> tuple[argparse.Namespace, C]:
    """Parses the job's own flags and the dotted overrides; exits with status 2 on a bad config."""
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = {(aliases or {}).get(k, k): v for k, v in parse_cli_overrides(rest).items()}
        overrides.update({key: getattr(args, key) for key in positionals if getattr(args, key) is not None})
        config = resolve_locations(load_config(config_cls, args.config, overrides))
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: invalid config: {redact_text(str(exc))}\n")
    if args.print_config:
        sys.stdout.write(dump_yaml(config))
        parser.exit(0)
    return args, config


def report_config_error(parser: argparse.ArgumentParser, exc: Exception) -> Any:
    """Exits 2 with one line naming the bad input (any URL's password removed)."""
    parser.exit(2, f"{parser.prog}: error: {redact_text(str(exc))}\n")


def run_job(
    prog: str,
    description: str,
    config_cls: type[C],
    example: str,
    run: Callable[[C], R],
    report: Callable[[R, C], int],
    argv: Sequence[str] | None = None,
    *,
    positionals: Sequence[str] = (),
    aliases: Mapping[str, str] | None = None,
) -> int:
    """What every job does: parse and validate its config (exit 2 on a bad one), run, and print
    the result; bad input found while running (a missing bucket, an unloadable model, a damaged
    shard found by a Ray Train worker) also exits 2 with one line naming it, instead of a
    traceback."""
    parser = build_parser(prog, description, config_cls, example, positionals=positionals, aliases=aliases)
    _, config = parse_config(parser, config_cls, argv, positionals=positionals, aliases=aliases)
    setup_logging()
    from service.job_errors import user_error_behind

    try:
        with sigterm_as_interrupt():
            result = run(config)
    except Exception as exc:
        # Also when Ray wraps it: bad input found in a worker or a sweep's trial.
        error = user_error_behind(exc)
        if error is None:
            raise
        report_config_error(parser, error)
    from service.runtime.logs import redacted_stdout

    with redacted_stdout():
        return report(result, config)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``ray job stop``, Kubernetes, a batch scheduler) stops the block like Ctrl+C.

    Python's default SIGTERM ends the process at once, running no ``except``/``finally``: the
    job's MLflow run would stay RUNNING forever. As a ``KeyboardInterrupt`` the job unwinds and
    its run ends KILLED. Signal handlers belong to the main thread; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
