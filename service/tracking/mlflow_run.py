"""MLflow tracking that never takes a training run down; tracking owns the run's lifecycle.

Checkpoints are the source of truth; MLflow is the window onto a run. ``open_run`` finds the
run a resumed job continues (by its tags) or creates it, optionally under a parent run;
``Tracker.ending_run`` (or ``Tracker.finish``) ends it with the status it deserves: FINISHED,
KILLED when the job was stopped, FAILED with the error as a tag. Every call goes through one
guard: an unreachable or failing server produces one warning, logging pauses for a while and is
retried later, and training goes on.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Run tag holding why a FAILED run failed (exception type and message).
ERROR_TAG = "convmae.error"
_MAX_TAG_CHARS = 5000  # within MLflow's tag value limit (5000 on older servers, 8000 on newer)

# MLflow's HTTP client retries for minutes by default; a training step must not wait that long.
_FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def resolve_tracking_uri(uri: str) -> str:
    """Config value, else ``MLFLOW_TRACKING_URI``, else a sqlite store in the working directory.

    Relative local stores are made absolute so Ray workers (other working directories) and the
    driver write to the same place.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path('mlruns.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a plain directory
        return Path(uri).resolve().as_uri()
    return uri


class RunStopped(Exception):
    """The job's run was stopped by the caller that started it, which ends its MLflow run
    itself: a sweep's trial that Tune stops (ASHA's verdict, an interrupted sweep) takes its
    Train run down with it, and only the sweep's driver knows the verdict
    (``service.tune.sweep.end_trial_runs``). ``ending_run`` leaves such a run as it is."""


def run_status(exc: BaseException | None) -> str:
    """The status a run ends with when its job ended by ``exc`` (None: normally).

    KILLED for a stopped job: Ctrl+C and SIGTERM (``ray job stop``, Kubernetes; the jobs turn it
    into ``KeyboardInterrupt``) and Ray Train's own Ctrl+C handler, which aborts the run and
    leaves through ``SystemExit``. FAILED for any other error.
    """
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"


def describe_error(exc: BaseException | str) -> str:
    """``Type: message`` of an error, cut to fit a tag."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return text[:_MAX_TAG_CHARS]


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """A local artifact folder beside a sqlite store; servers choose their own."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / experiment).as_uri()
    return None


def ensure_experiment(client: Any, tracking_uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri, name))


class Tracker:
    """Logs to one MLflow run; all failures are warnings (see module docstring)."""

    def __init__(
        self,
        tracking_uri: str,
        run_id: str | None,
        *,
        enabled: bool = True,
        pause_after_failure_s: float = 60.0,
        system_metrics: bool = False,
    ) -> None:
        for key, value in _FAST_FAIL_ENV.items():
            os.environ.setdefault(key, value)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.enabled = enabled and run_id is not None
        self._pause_s = pause_after_failure_s
        self._paused_until = 0.0
        self.failures = 0
        self._client = None
        self._system_monitor = None
        self.ended: str | None = None  # the status finish() gave the run
        self._logged_through: dict[str, int] = {}  # metric -> last step it had (skip_logged_steps)
        if self.enabled and system_metrics:
            self._safe("start system metrics", self._start_system_metrics)

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _safe(self, what: str, fn: Callable[..., Any] | str, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``; a string names a method of the MLflow client, looked up only
        when the tracker is enabled (building a client with no URI creates ./mlflow.db)."""
        if not self.enabled or time.monotonic() < self._paused_until:
            return None
        try:
            if isinstance(fn, str):
                fn = getattr(self.client, fn)
            return fn(*args, **kwargs)
        except Exception as exc:  # any MLflow/network failure: warn, pause, carry on
            self.failures += 1
            self._paused_until = time.monotonic() + self._pause_s
            log.warning(
                "MLflow %s failed (%s: %s); training continues, MLflow logging paused for %.0fs",
                what, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "", self._pause_s,
            )
            return None

    # ------------------------------------------------------------ lifecycle and reading

    def finish(self, status: str = "FINISHED", error: BaseException | str | None = None) -> None:
        """Ends the run with ``status`` (FINISHED, FAILED, KILLED) and stops system metrics;
        ``error`` (what made it fail) goes into the ``convmae.error`` tag."""
        self.close()
        self.ended = status
        self._paused_until = 0.0  # a recent failure pauses logging; the end status is worth a try
        if error is not None:
            self.set_tags({ERROR_TAG: describe_error(error)})
        self._safe("end run", "set_terminated", self.run_id, status)

    @contextmanager
    def ending_run(self) -> Iterator[Tracker]:
        """Ends the run when the block exits, with the status it deserves (``run_status``): a
        run must never stay RUNNING after its job is gone. The block's exception goes on; a
        block that ended the run itself (``finish``) keeps the status it chose."""
        try:
            yield self
        except RunStopped:
            self.close()  # its status is the caller's to set
            raise
        except BaseException as exc:
            status = run_status(exc)
            self.finish(status, error=exc if status == "FAILED" else None)
            raise
        if self.ended is None:
            self.finish("FINISHED")

    def status(self) -> str | None:
        """The run's status in MLflow (RUNNING, FINISHED, FAILED, KILLED); None if unreadable."""
        run = self._safe("read run", "get_run", self.run_id)
        return run.info.status if run is not None else None

    def skip_logged_steps(self) -> None:
        """From now on, log a metric only at steps beyond those it already reached on this run.

        A resumed run (or one restarted after a worker failure) redoes the steps since its last
        checkpoint; logging them again would give those steps two points each. MLflow cannot
        delete points, so the first ones stay: a resumed run reproduces the uninterrupted one's
        values (same data, masks and seeds), so they are the same curve.
        """
        run = self._safe("read run", "get_run", self.run_id)
        if run is not None:
            # A run's "latest" metrics are those at each metric's highest step.
            self._logged_through = {m.key: m.step for m in run.data.to_proto().metrics}

    def last_step(self, metric: str) -> int | None:
        """The highest step ``metric`` was logged at on this run; None if never (or unreadable)."""
        history = self._safe("read run", "get_metric_history", self.run_id, metric) or []
        return max((m.step for m in history), default=None)

    # ------------------------------------------------------------ logging

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's per-batch limit
            self._safe("log params", "log_batch", self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and step > self._logged_through.get(k, -1)]
        if items:
            self._safe("log metrics", "log_batch", self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._safe("set tags", "log_batch", self.run_id, tags=items)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self._safe("log dict", "log_dict", self.run_id, dict(data), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._safe("log text", "log_text", self.run_id, text, artifact_file)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """``image``: a PIL image or an (H, W, 3) uint8 array."""
        self._safe("log image", "log_image", self.run_id, image, artifact_file=artifact_file)

    def log_table(self, rows: list[Mapping[str, Any]], artifact_file: str) -> None:
        """``rows`` (one mapping a row, same keys) as an MLflow table artifact."""
        if rows:
            columns = {k: [r.get(k) for r in rows] for k in rows[0]}
            self._safe("log table", "log_table", self.run_id, columns, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._safe("log artifact", "log_artifact", self.run_id, str(path), artifact_path)

    def log_file_content(self, content: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(content)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(path, None if parent == "." else parent)

    # ------------------------------------------------------------ system metrics

    def _start_system_metrics(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=10, samples_before_logging=1,
            resume_logging=True, tracking_uri=self.tracking_uri,
        )
        monitor.start()
        self._system_monitor = monitor

    def close(self) -> None:
        if self._system_monitor is not None:
            try:
                self._system_monitor.finish()
            except Exception as exc:
                log.warning("MLflow system metrics shutdown failed: %s", exc)
            self._system_monitor = None


class NullTracker(Tracker):
    """What non-zero ranks hold: the same interface, logging nothing."""

    def __init__(self) -> None:
        super().__init__("", None, enabled=False)


def open_run(
    tracking_uri: str,
    experiment: str,
    *,
    identity: Mapping[str, str],
    run_name: str,
    resume: bool = True,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    enabled: bool = True,
    system_metrics: bool = False,
) -> Tracker:
    """The tracker of a job's MLflow run, found or created.

    ``identity``: the tags that name the job (e.g. run name and storage). With ``resume`` an
    existing run with the same identity is continued (set RUNNING again); otherwise, or when
    none exists, a new run is created with ``identity``, ``tags`` and ``parent_run_id``. When
    MLflow is off or unreachable the tracker is disabled (one warning) and the job goes on.
    """
    if not enabled:
        return NullTracker()
    try:
        from mlflow import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = ensure_experiment(client, tracking_uri, experiment)
        run_id = None
        if resume:
            found = client.search_runs([experiment_id], filter_string=_tags_filter(identity), max_results=1)
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
        if run_id is None:
            run_tags = {**identity, MLFLOW_RUN_NAME: run_name, **(tags or {})}
            if parent_run_id:
                run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
            run_id = client.create_run(experiment_id, run_name=run_name, tags=run_tags).info.run_id
    except Exception as exc:
        log.warning("MLflow at %s is unavailable (%s); the job continues without tracking", tracking_uri, exc)
        return NullTracker()
    return Tracker(tracking_uri, run_id, system_metrics=system_metrics)


def warm_up(tracking_uri: str, experiment: str) -> threading.Thread:
    """Imports MLflow and opens ``tracking_uri``'s store (a new sqlite store creates its tables)
    in a background thread, so that this start-up cost overlaps other work (the driver's Ray
    start); MLflow keeps the store for the URI, so the :func:`open_run` that follows finds it
    ready. Failures are left for ``open_run`` to report. Join the thread before ``open_run``:
    two threads setting up the same new store would race on its tables."""
    for key, value in _FAST_FAIL_ENV.items():  # an unreachable server must not hold up the join
        os.environ.setdefault(key, value)

    def work() -> None:
        try:
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
        except Exception as exc:
            log.debug("warming MLflow at %s failed (%s); open_run will say", tracking_uri, exc)

    thread = threading.Thread(target=work, name="mlflow-warm-up", daemon=True)
    thread.start()
    return thread


def find_run_id(tracking_uri: str, experiment: str, identity: Mapping[str, str]) -> str | None:
    """The id of the run with these identity tags, or None (none, or MLflow unreachable)."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], filter_string=_tags_filter(identity),
                                  max_results=1) if found else []
        return runs[0].info.run_id if runs else None
    except Exception as exc:
        log.warning("MLflow at %s is unavailable (%s)", tracking_uri, exc)
        return None


def _tags_filter(tags: Mapping[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
