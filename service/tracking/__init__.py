"""MLflow: the run lifecycle and logging (``mlflow_run``), the model registry (``registry``),
the pyfunc flavour registered models are served with (``pyfunc``)."""

from service.tracking.mlflow_run import (
    ERROR_TAG,
    NullTracker,
    RunStopped,
    Tracker,
    ensure_experiment,
    find_run_id,
    open_run,
    resolve_tracking_uri,
    run_status,
    warm_up,
)

__all__ = ["ERROR_TAG", "NullTracker", "RunStopped", "Tracker", "ensure_experiment", "find_run_id", "open_run", "resolve_tracking_uri",
           "run_status", "warm_up"]
