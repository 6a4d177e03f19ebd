"""From a training checkpoint to the MLflow Model Registry, and back into ``convmae``."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.data.scratch import scratch
from service.runtime.engine import consolidated_state_dict
from service.runtime.logs import MLFLOW_REGISTRY_PRINTS, dropping_printed_lines

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
WEIGHTS_ARTIFACT = "convmae"  # the folder written by convmae.save_pretrained inside the model
# Model-version tag holding the checkpoint a version was exported from, so that re-running a
# finished job (or sweep) finds its version instead of registering the same weights again.
CHECKPOINT_TAG = "checkpoint"
# The pyfunc flavour's code: a module of the installed package, never a file in the artifact.
PYFUNC_LOADER = "service.tracking.pyfunc"


def export_checkpoint(checkpoint_dir: str | Path, model_config: dict[str, Any], dest: str | Path,
                      *, model: Any = None) -> Path:
    """Consolidates a (ZeRO-sharded) checkpoint into fp32 ``convmae.save_pretrained`` form.

    ``model``: the module the checkpoint was trained as, freshly built (e.g. a fine-tuned
    ``ConvMAEBackbone`` with its head); default the pretraining model (``ConvMAE``, or ``MAE``
    for an MAE config) built from ``model_config``.
    """
    from convmae import build_model_from_config, config_from_dict, save_pretrained

    if model is None:
        model = build_model_from_config(config_from_dict(model_config))
    state = consolidated_state_dict(checkpoint_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    dest = Path(dest)
    save_pretrained(model, dest)
    return dest


def log_and_register(
    model_dir: str | Path,
    *,
    tracking_uri: str,
    run_id: str,
    registered_name: str | None,
    tags: dict[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, str | None]:
    """Logs the exported model to ``run_id`` and registers a new version under ``registered_name``.

    ``model_dir`` (a ``save_pretrained`` folder) must be named ``WEIGHTS_ARTIFACT``: MLflow keeps
    the folder's name in the artifact."""
    import mlflow

    if Path(model_dir).name != WEIGHTS_ARTIFACT:
        raise ValueError(f"model_dir={str(model_dir)!r} is not allowed: a folder named {WEIGHTS_ARTIFACT!r}")

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        # Data only (data/convmae: safetensors + JSON); MLflow imports PYFUNC_LOADER to load it.
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            loader_module=PYFUNC_LOADER,
            data_path=str(model_dir),
            pip_requirements=["convmae-service", "torch", "safetensors", "numpy"],
            metadata=metadata or {},
        )
    version = None
    if registered_name:
        with dropping_printed_lines(MLFLOW_REGISTRY_PRINTS, "stderr"):  # we log the version below
            mv = mlflow.register_model(info.model_uri, registered_name, tags=tags or {})
        version = str(mv.version)
        log.info("registered %s version %s (models:/%s/%s)", registered_name, version, registered_name, version)
    return {"model_uri": info.model_uri, "version": version,
            "registered_uri": f"models:/{registered_name}/{version}" if version else None}


def registered_version(tracking_uri: str, registered_name: str, run_id: str,
                       checkpoint_path: str) -> dict[str, str] | None:
    """The version of ``registered_name`` that ``run_id`` registered from ``checkpoint_path``, if any."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    for mv in client.search_model_versions(f"name = '{registered_name}' and run_id = '{run_id}'"):
        if (mv.tags or {}).get(CHECKPOINT_TAG) == checkpoint_path:
            return {"model_uri": mv.source, "version": str(mv.version),
                    "registered_uri": f"models:/{registered_name}/{mv.version}"}
    return None


def register_checkpoint_once(
    checkpoint: Any,
    export: Callable[[Path, Path], Path],
    *,
    tracking_uri: str,
    run_id: str,
    registered_name: str | None,
    tags: dict[str, str],
    metadata: dict[str, Any],
    what: str = "model",
) -> dict[str, str | None]:
    """Exports a Ray Train ``checkpoint`` (``export(checkpoint_folder, tmp_dir) -> model_dir``),
    logs it to ``run_id`` and registers it, unless this run already registered that checkpoint.

    A failure is a warning and gives Nones: the checkpoint stays the source of truth.
    """
    try:
        if registered_name:
            found = registered_version(tracking_uri, registered_name, run_id, checkpoint.path)
            if found:
                log.info("%s of %s is already registered as %s", what, checkpoint.path, found["registered_uri"])
                return found
        with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
            model_dir = export(Path(folder), Path(tmp))
            return log_and_register(model_dir, tracking_uri=tracking_uri, run_id=run_id,
                                    registered_name=registered_name,
                                    tags={**tags, CHECKPOINT_TAG: checkpoint.path}, metadata=metadata)
    except Exception as exc:
        log.warning("could not log/register the %s in MLflow (%s: %s); the checkpoint is at %s",
                    what, type(exc).__name__, exc, checkpoint.path)
        return {"registered_uri": None, "model_uri": None, "version": None}


def download_model(uri: str, dest: str | Path | None = None, *, tracking_uri: str | None = None) -> Path:
    """The logged model behind a ``models:/`` or ``runs:/`` URI, downloaded from ``tracking_uri``
    (tracking and registry store alike; default ``MLFLOW_TRACKING_URI``, else ./mlruns.db as
    every job). MLflow's global URI is left alone and nothing is written outside ``dest``."""
    import mlflow

    from service.tracking.mlflow_run import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(tracking_uri or "")
    dest = Path(dest or tempfile.mkdtemp(prefix="convmae-download-"))  # the caller's to keep
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=_resolve_artifact_uri(uri, tracking_uri),
                                                    dst_path=str(dest), tracking_uri=tracking_uri,
                                                    registry_uri=tracking_uri))


def download_model_dir(uri: str, dest: str | Path | None = None, *, tracking_uri: str | None = None) -> Path:
    """The ``save_pretrained`` folder behind a ``models:/`` or ``runs:/`` URI (see
    ``download_model``): only its JSON config and safetensors weights are ever read, whatever
    else the artifact holds."""
    local = download_model(uri, dest, tracking_uri=tracking_uri)
    # data/: models logged with PYFUNC_LOADER; artifacts/: those logged as code by earlier versions.
    for candidate in (local / "data" / WEIGHTS_ARTIFACT, local / "artifacts" / WEIGHTS_ARTIFACT,
                      local / WEIGHTS_ARTIFACT, local):
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(f"{uri} holds no convmae model (no {WEIGHTS_ARTIFACT}/config.json)")


def load_pyfunc(uri: str, *, tracking_uri: str | None = None) -> Any:
    """``mlflow.pyfunc.load_model`` of a ``models:/`` or ``runs:/`` URI, once its ``MLmodel`` is
    checked to load with ``PYFUNC_LOADER`` from data alone.

    ``mlflow.pyfunc.load_model`` does what the downloaded ``MLmodel`` says: it imports the
    module it names, puts its ``code`` folders on ``sys.path``, unpickles a ``python_model``.
    Whoever can write to the artifact store can rewrite that file; here a model whose
    ``MLmodel`` asks for anything but this package's loader, or that carries Python files or
    pickles, is refused (``ModelSourceError``) before MLflow reads it.
    """
    import mlflow.pyfunc

    with scratch("model") as tmp:  # the weights are in memory once loaded
        local = download_model(uri, tmp, tracking_uri=tracking_uri)
        check_data_only(local, uri)
        return mlflow.pyfunc.load_model(str(local))


UNSAFE_SUFFIXES = (".py", ".pyc", ".pkl", ".pickle", ".cloudpickle", ".joblib", ".pt", ".pth", ".so")


def check_data_only(model_root: Path, uri: str) -> None:
    """Raises ``ModelSourceError`` unless the downloaded model at ``model_root`` is one we log:
    its pyfunc flavour loads with ``PYFUNC_LOADER`` from ``data/``, with no code, no pickled
    model and no code or pickle file anywhere in it."""
    import yaml

    from service.models.source import ModelSourceError

    try:
        meta = yaml.safe_load((model_root / "MLmodel").read_text())
        flavors = meta["flavors"]
        pyfunc = flavors["python_function"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ModelSourceError(f"{uri}: MLmodel is missing or not a pyfunc model ({type(exc).__name__})") from None
    expected = {"loader_module": PYFUNC_LOADER, "data": f"data/{WEIGHTS_ARTIFACT}"}
    problems = [f"{key}={pyfunc.get(key)!r} (expected {value!r})" for key, value in expected.items()
                if pyfunc.get(key) != value]
    problems += [f"{key}={pyfunc[key]!r}" for key in ("code", "python_model", "cloudpickle_version", "artifacts")
                 if pyfunc.get(key)]
    problems += [f"flavor {name!r}" for name in flavors if name != "python_function"]
    problems += [f"file {p.relative_to(model_root)}" for p in sorted(model_root.rglob("*"))
                 if p.suffix.lower() in UNSAFE_SUFFIXES]
    if problems:
        raise ModelSourceError(f"{uri}: refused, its MLmodel or files would run code from the artifact store, "
                               f"not this package's loader: {'; '.join(problems[:5])}")


def _resolve_artifact_uri(uri: str, tracking_uri: str) -> str:
    """Where the artifacts behind a ``models:/`` or ``runs:/`` URI live, resolved through
    ``tracking_uri`` alone.

    MLflow resolves ``models:/`` (and the logged model behind ``runs:/RUN/model``) with a client
    built on the *global* registry URI, ignoring the one passed in: without
    ``MLFLOW_TRACKING_URI`` it looks in (and creates) ``./mlflow.db`` and finds no such model.
    Resolving here with an explicit client avoids both.
    """
    from mlflow import MlflowClient
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if uri.startswith("models:/"):
        root, sub_path = ModelsArtifactRepository.split_models_uri(uri)
        found = get_model_name_and_version(client, root)
        if len(found) == 1:  # models:/m-ID, a logged model
            location = client.get_logged_model(found[0]).artifact_location
        else:
            location = client.get_model_version_download_uri(*found)
        return _join_uri(location, sub_path)
    if uri.startswith("runs:/"):
        run_id, path = RunsArtifactRepository.parse_runs_uri(uri)
        run = client.get_run(run_id)
        name, _, sub_path = (path or "").partition("/")
        # MLflow 3 keeps a run's models as logged models outside the run's artifacts.
        models = client.search_logged_models(experiment_ids=[run.info.experiment_id], max_results=1,
                                             filter_string=f"name = '{name}' and source_run_id = '{run_id}'")
        if models:
            return _join_uri(models[0].artifact_location, sub_path)
        return _join_uri(run.info.artifact_uri, path or "")
    return uri


def _join_uri(base: str, sub_path: str) -> str:
    return base.rstrip("/") + (f"/{sub_path}" if sub_path else "")


def load_model(uri: str, *, tracking_uri: str | None = None):
    """A ``convmae`` model from ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/``, or a
    local ``save_pretrained`` folder: a ``ConvMAE`` for pretrained models, a ``ConvMAEBackbone``
    with its head for fine-tuned classifiers. (``service.models.source`` takes more kinds of
    source and also finds the producing run.)"""
    from convmae import load_pretrained

    if uri.startswith(("models:/", "runs:/")):
        with scratch("model") as tmp:  # the weights are in memory once loaded
            return load_pretrained(download_model_dir(uri, tmp, tracking_uri=tracking_uri))
    return load_pretrained(uri)


def write_metadata(model_dir: Path, metadata: dict[str, Any]) -> None:
    (Path(model_dir) / "training.json").write_text(json.dumps(metadata, indent=1, default=str))
