"""Where a job's outputs live: one persistent root for runs, sweeps, the MLflow store and data.

The defaults are relative (``convmae_runs``, ``convmae_sweeps``, ``./mlruns.db``,
``convmae_data``): right for ``python jobs/pretrain.py`` in a checkout. A job submitted with
``ray job submit`` runs in Ray's temporary copy of the working directory, which the next
submission or a cluster restart replaces, so there relative locations would silently lose
everything. ``storage.root`` (or ``CONVMAE_HOME``) names a persistent root, a local path or an
``s3://`` URL, under which every relative location is placed; a submitted job without one and
with relative locations stops before any work, saying which flag to set.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from service.config.schema import ConfigError, with_overrides

HOME_ENV = "CONVMAE_HOME"
# Set by Ray's job supervisor in the environment of every submitted job's entrypoint.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
SQLITE = "sqlite:///"
DEFAULT_MLFLOW_DB = "mlruns.db"

C = TypeVar("C")


def in_submitted_ray_job() -> bool:
    """True when this process is the entrypoint of a job submitted to a Ray cluster."""
    return RAY_JOB_ENV in os.environ


def output_root(cfg: Any) -> str:
    """``storage.root``, else ``CONVMAE_HOME``, else empty (the working directory)."""
    storage = getattr(cfg, "storage", None)
    return (getattr(storage, "root", "") or os.environ.get(HOME_ENV, "")).strip()


def resolve_locations(cfg: C) -> C:
    """``cfg`` with its relative output locations placed under the persistent root (if any);
    raises ``ConfigError`` in a submitted Ray job whose outputs would be lost."""
    relative = _relative_locations(cfg)
    root = output_root(cfg)
    if not root:
        if relative and in_submitted_ray_job():
            listed = ", ".join(f"{key}={shown!r}" for key, shown, _ in relative)
            raise ConfigError(
                f"this job runs under `ray job submit`, where relative locations ({listed}) land in Ray's "
                "temporary copy of the working directory and are lost at the next submission or cluster "
                f"restart: set --storage.root (or {HOME_ENV}) to a persistent path or s3:// URL, or give "
                "absolute locations"
            )
        return cfg
    remote = "://" in root and not root.startswith("file://")
    local_root = root.removeprefix("file://")
    overrides: dict[str, Any] = {}
    for key, shown, kind in relative:
        if kind == "mlflow":
            if remote:
                raise ConfigError(f"storage.root={root!r} is object storage, where no MLflow store can live: set "
                                  f"{key} (or MLFLOW_TRACKING_URI) to an MLflow server, e.g. http://mlflow:5000")
            if not shown or shown.startswith(SQLITE):
                db = shown.removeprefix(SQLITE) or DEFAULT_MLFLOW_DB
                overrides[key] = SQLITE + str(Path(local_root, db).resolve())
            else:  # a directory store
                overrides[key] = Path(local_root, shown).resolve().as_uri()
        elif kind == "data" and remote:
            raise ConfigError(f"storage.root={root!r} is object storage, where the embedded data set is not "
                              "generated: set data.url to a prepared data set (jobs/prepare_data.py), or use a "
                              "local storage.root")
        elif remote:
            overrides[key] = posixpath.join(root.rstrip("/"), shown)
        else:
            overrides[key] = str(Path(local_root, shown).resolve())
    return with_overrides(cfg, overrides) if overrides else cfg


def _relative_locations(cfg: Any) -> list[tuple[str, str, str]]:
    """(key, value, kind) of every output location of ``cfg`` that is relative to the working
    directory and in use; kind is "path", "mlflow" or "data"."""
    found: list[tuple[str, str, str]] = []
    names = {f.name for f in fields(cfg)} if is_dataclass(cfg) else set()
    for section, key in (("checkpoint", "storage_path"), ("sweep", "storage_path")):
        if section in names and _is_relative_path(getattr(getattr(cfg, section), key)):
            found.append((f"{section}.{key}", getattr(getattr(cfg, section), key), "path"))
    for key in ("out", "output"):  # reconstruct's PNG, evaluate's JSON
        if key in names and getattr(cfg, key) and _is_relative_path(getattr(cfg, key)):
            found.append((key, getattr(cfg, key), "path"))
    if "data" in names and not cfg.data.url and _is_relative_path(cfg.data.embedded_dir):
        found.append(("data.embedded_dir", cfg.data.embedded_dir, "data"))
    tracking_key, tracking_uri = (("mlflow.tracking_uri", cfg.mlflow.tracking_uri) if "mlflow" in names else
                                  ("tracking_uri", cfg.tracking_uri) if "tracking_uri" in names else (None, None))
    mlflow_on = "mlflow" not in names or cfg.mlflow.enabled
    if tracking_key and mlflow_on and _is_relative_store(tracking_uri):
        found.append((tracking_key, tracking_uri, "mlflow"))
    return found


def _is_relative_path(value: str) -> bool:
    return bool(value) and "://" not in value and not Path(value).is_absolute()


def _is_relative_store(uri: str) -> bool:
    """An MLflow URI that lands in the working directory: empty (the default ``./mlruns.db``,
    unless ``MLFLOW_TRACKING_URI`` says otherwise), a relative sqlite file or directory."""
    if not uri:
        return not os.environ.get("MLFLOW_TRACKING_URI")
    if uri.startswith(SQLITE):
        return not uri.startswith(SQLITE + "/")
    return _is_relative_path(uri)
