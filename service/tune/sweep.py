"""Ray Tune sweeps over pretraining hyper-parameters (mask ratio, learning rate, ...).

Every trial is a whole distributed pretraining run. Following Ray Train V2, Tune runs a small
driver function per trial (``_run_trial``) that calls ``run_pretraining``, whose TorchTrainer
workers report each epoch's validation metrics back to Tune through ``TuneReportCallback``.
Tune does not see the training workers' resources, so the number of concurrent trials is
computed here from what one trial needs, so that a sweep on a small machine never starts more
trials than their workers can run.

Training loss is not comparable across mask ratios; the objective is ``val/knn_top1`` (labeled
validation data) or ``val/recon_loss`` at one fixed mask ratio with fixed masks
(``service.evaluation``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import (
    ConfigError,
    PretrainConfig,
    TuneJobConfig,
    flatten,
    from_dict,
    redact_url,
    redacted,
    to_dict,
    with_overrides,
)
from service.config.sweep import Dimension, parse_space
from service.tracking import Tracker, find_run_id, open_run
from service.tracking.provenance import provenance
from service.tune.asha import TIME_ATTR, ResumableASHA
from service.tune.space import concurrent_trials, param_space, resolve_objective, trial_resources

log = logging.getLogger(__name__)

SWEEP_TAG = "convmae.sweep_name"
SWEEP_STORAGE_TAG = "convmae.sweep_storage"
TRIAL_TAG = "convmae.trial_id"
# Why a trial's run ended before its last epoch: the scheduler (asha) or an interrupted sweep.
STOPPED_BY_TAG = "convmae.stopped_by"


# ---------------------------------------------------------------- the trial


def _run_trial(params: dict[str, Any], *, context: dict[str, Any]) -> None:
    """One trial, run by Tune in its own actor: a full pretraining run of the trial's config."""
    from ray import tune
    from ray.train._internal.session import get_session
    from ray.tune.integration.ray_train import TuneReportCallback

    from service.runtime.credentials import adopt_credentials
    from service.runtime.logs import install_redaction, quiet_known_noise
    from service.tracking import RunStopped
    from service.training.pretrain import run_pretraining

    install_redaction()
    quiet_known_noise()
    # The sweep driver's settings and credentials, as run_pretraining hands them to its workers.
    os.environ.update(context["env"])
    adopt_credentials(context.get("credentials"))
    trial_id = tune.get_context().get_trial_id()
    base = from_dict(PretrainConfig, context["base"])
    cfg = with_overrides(base, {**params, "run_name": trial_run_name(context["sweep_name"], trial_id)})
    # Set when Tune stops this trial (ASHA's verdict, also at the last epoch; an interrupted
    # sweep), before it frees the trial's resources and so destroys its Train run. Tune's own
    # TuneReportCallback reaches the trial's session the same way.
    stopping = get_session().stop_event
    try:
        run_pretraining(
            cfg,
            parent_run_id=context["parent_run_id"],
            tags={SWEEP_TAG: context["sweep_name"], TRIAL_TAG: trial_id},
            callbacks=[TuneReportCallback()],
            hold_lease=False,  # the sweep's driver holds the lease of the whole sweep folder
            stop_requested=stopping.is_set,
        )
    except RunStopped:
        return  # not a failure: the sweep's driver ends the trial's run with its verdict


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


# ---------------------------------------------------------------- the sweep driver


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    status: str  # completed | stopped early | error | unfinished
    epochs: int
    objective: float | None
    train_loss: float | None
    checkpoint_path: str | None
    error: str | None = None  # why an errored trial failed


@dataclass
class SweepResult:
    name: str
    metric: str
    mode: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    parent_run_id: str | None
    tracking_uri: str
    registered_uri: str | None
    experiment_path: str
    table: str
    interrupted: bool


def run_sweep(cfg: TuneJobConfig) -> SweepResult:
    """Runs (or resumes) the sweep, registers the best trial's model and returns the summary."""
    from service import data as data_lib
    from service.tracking import resolve_tracking_uri
    from service.training.launch import absolute_url, require_one_step, require_writable
    from service.training.lease import RunLease

    cfg.validate()
    dims = parse_space(cfg)
    train_url, val_url = (absolute_url(u) for u in data_lib.resolve_data_urls(cfg.data, cfg.storage))
    if not val_url:
        raise ConfigError("sweeps compare trials on a held-out split: set data.val_url "
                          "(the embedded data set has one when data.url is empty; jobs/prepare_data.py holds one out at <dest>/val)")
    require_one_step(data_lib.open_dataset(train_url, cfg.storage).num_samples, cfg, train_url)
    val_has_labels = data_lib.open_dataset(val_url, cfg.storage).has_labels
    metric, mode = resolve_objective(cfg, val_has_labels)

    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    # Trials run in other processes and directories: hand them absolute locations only.
    base = cfg.pretrain({
        "data.url": train_url, "data.val_url": val_url,
        "data.embedded_dir": str(Path(cfg.data.embedded_dir).resolve()),
        "mlflow.tracking_uri": tracking_uri,
        "mlflow.register": False,  # only the best trial's model is registered, below
        "checkpoint.resume": True,  # a resumed sweep continues its unfinished trials
        "checkpoint.storage_path": _join(absolute_url(cfg.sweep.storage_path), cfg.sweep.name, "train_runs"),
    })

    require_writable(cfg.sweep.storage_path, cfg.storage, "sweep.storage_path")
    # One driver per sweep: it is the writer of its trials' runs too, which hold no lease of their own.
    with RunLease(cfg.sweep.storage_path, cfg.sweep.name, cfg.storage, timeout_s=cfg.checkpoint.lease_timeout_s,
                  what="sweep.name"):
        return _run_sweep(cfg, dims, base, train_url, tracking_uri, metric, mode)


def _run_sweep(cfg: TuneJobConfig, dims: list[Dimension], base: PretrainConfig, train_url: str, tracking_uri: str,
               metric: str, mode: str) -> SweepResult:
    """``run_sweep`` once its config, data and objective are checked and its lease is held."""
    from ray import tune

    from service.runtime.cluster import (
        connect_ray,
        forwarded_env,
        ray_stop_handlers,
        require_shared_storage,
        resolve_precision,
        resolve_use_gpu,
    )
    from service.runtime.credentials import keep_credentials_out_of_tune, share_credentials
    from service.runtime.placement import PlacementError, check_placement, cluster_capacity
    from service.training.launch import absolute_url, shared_locations, storage_location

    connect_ray(cfg.dist.ray_address)
    keep_credentials_out_of_tune()  # trials adopt the shared credentials below instead
    # Trials run on any node, and a trial resumed elsewhere must find its checkpoints.
    locations = shared_locations(base, train_url, tracking_uri)
    locations.pop("checkpoint.storage_path")  # the trials' runs live under sweep.storage_path
    require_shared_storage({"sweep.storage_path": cfg.sweep.storage_path, **locations}, cfg.storage.shared_local_paths)
    use_gpu = resolve_use_gpu(base)
    resolve_precision(base, use_gpu)
    import ray

    per_trial = trial_resources(base, use_gpu, cfg.sweep.driver_cpus)
    capacity = cluster_capacity()
    check_placement(base, use_gpu, capacity)  # one trial's workers
    cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
    most = capacity.total if capacity.total is not None else cluster
    short = {k: v for k, v in per_trial.items() if most.get(k, 0.0) < v}
    if short and capacity.total is not None:  # Tune would keep the trials pending for ever
        raise PlacementError(
            f"sweep.driver_cpus={cfg.sweep.driver_cpus:g} with dist.num_workers={base.dist.num_workers}: one trial "
            f"(its driver and its workers) needs {', '.join(f'{v:g} {k}' for k, v in sorted(short.items()))} but "
            f"{capacity.source} has {', '.join(f'{most.get(k, 0.0):g} {k}' for k in sorted(short))} in all. Lower "
            "sweep.driver_cpus, dist.num_workers "
            "or dist.cpus_per_worker"
        )
    if short:
        log.warning("one trial needs %s but the cluster has %s now; trials wait for the autoscaler",
                    per_trial, {k: cluster.get(k, 0.0) for k in per_trial})
    concurrency = concurrent_trials(cfg.sweep.max_concurrent_trials, per_trial, cluster)

    storage_path, storage_fs = storage_location(cfg.sweep.storage_path, cfg.storage)
    experiment_path = _join(storage_path, cfg.sweep.name)
    storage_label = redact_url(_join(cfg.sweep.storage_path.rstrip("/"), cfg.sweep.name))
    restoring = tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs)
    if restoring and not cfg.sweep.resume:
        # Refused before the parent run is opened: that would be the existing sweep's run.
        raise ConfigError(f"sweep.name={cfg.sweep.name!r} already exists under {cfg.sweep.storage_path}; "
                          "choose a new name or set sweep.resume=true to continue it")
    parent = open_parent_run(cfg, tracking_uri, storage_label, dims, metric, mode)
    parent_run_id = parent.run_id if parent.enabled else None
    with parent.ending_run():  # KILLED or FAILED when the sweep itself is stopped or fails
        # Mid-epoch checkpoints report no validation metric; Tune's scheduler and searchers skip
        # such results, and this keeps Tune from rejecting them.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        trainable = tune.with_resources(
            tune.with_parameters(_run_trial, context={"base": to_dict(base), "sweep_name": cfg.sweep.name,
                                                      "parent_run_id": parent_run_id, "env": forwarded_env(),
                                                      "credentials": share_credentials()}),
            {"cpu": cfg.sweep.driver_cpus},
        )
        if restoring:
            log.info("resuming sweep %s from %s: finished trials are kept, unfinished ones continue",
                     cfg.sweep.name, storage_label)
            tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=storage_fs)
        else:
            log.info("sweep %s: %d dimension(s), objective %s (%s), %s searcher, %s scheduler, "
                     "up to %d concurrent trial(s) of %s", cfg.sweep.name, len(dims), metric, mode,
                     cfg.sweep.searcher, cfg.sweep.scheduler, concurrency, per_trial)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(dims, cfg.sweep.searcher),
                tune_config=tune.TuneConfig(
                    metric=metric, mode=mode, num_samples=cfg.sweep.num_samples,
                    # The variant generator holds its own limit (see searcher_for).
                    max_concurrent_trials=concurrency if cfg.sweep.searcher == "tpe" else None,
                    search_alg=searcher_for(cfg, concurrency),
                    scheduler=scheduler_for(cfg, _join(absolute_url(cfg.sweep.storage_path), cfg.sweep.name,
                                                    "asha_state.json")),
                ),
                run_config=tune.RunConfig(name=cfg.sweep.name, storage_path=storage_path,
                                          storage_filesystem=storage_fs),
            )
        with ray_stop_handlers():  # Tune leaves its Ctrl+C handler behind unless one came
            grid = tuner.fit()

        # Tune returns normally after a stop signal (Ctrl+C, SIGUSR1), having marked the trials it
        # cut short as terminated in memory; the experiment state it saved for resuming says which.
        from ray.tune import ExperimentAnalysis

        saved = ExperimentAnalysis(experiment_path, storage_filesystem=storage_fs)
        statuses = {t.trial_id: t.status for t in saved.trials}
        trials = sorted((_summarise(r, metric, cfg.train.epochs, statuses) for r in grid), key=lambda t: t.trial_id)
        end_trial_runs(cfg, tracking_uri, trials)
        interrupted = any(t.status == "unfinished" for t in trials)
        scored = [t for t in trials if t.objective is not None and math.isfinite(t.objective)]
        best = (max if mode == "max" else min)(scored, key=lambda t: t.objective) if scored else None
        table = format_table(trials, metric, best)
        if best is None and not interrupted:
            # No trial got a score because of bad input (a damaged shard, a data set too small
            # for a trial's batch): that is the sweep's outcome, one line, exit 2; the parent run
            # ends FAILED with it.
            raise_first_user_error([r.error for r in grid if r.error is not None], table)
        registered_uri = None
        if interrupted:
            log.warning("sweep %s was interrupted with unfinished trials; run the same command again to resume it",
                        cfg.sweep.name)
        elif best is not None and cfg.mlflow.register:
            registered_uri = _register_best(cfg, base, best, storage_fs, tracking_uri, train_url)
        _finish_parent_run(parent, trials, best, metric, table, registered_uri, "KILLED" if interrupted else "FINISHED")
        return SweepResult(cfg.sweep.name, metric, mode, trials, best, parent_run_id, tracking_uri,
                           registered_uri, storage_label, table, interrupted)


def raise_first_user_error(errors: list[BaseException], table: str) -> None:
    """Raises the first bad-input error behind the trials' ``errors``, if any, after logging
    the trials' ``table``."""
    from service.job_errors import user_error_behind

    for error in errors:
        user_error = user_error_behind(error)
        if user_error is not None:
            log.error("no trial was scored:\n%s", table)
            raise user_error from None


def _join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/"), *parts[1:]])


def searcher_for(cfg: TuneJobConfig, max_concurrent: int = 0) -> Any:
    """The search algorithm of ``sweep.searcher``, drawing from ``sweep.seed``.

    random and grid: Tune's variant generator (grid dimensions enumerated, the rest sampled),
    seeded: left to itself it draws from numpy's global state, and two identical sweeps would
    try different values. It limits concurrency itself (``max_concurrent``, 0: no limit): Tune
    applies ``max_concurrent_trials`` to ``Searcher``s only. tpe: Optuna's TPE sampler (Tune
    limits its concurrency).
    """
    if cfg.sweep.searcher != "tpe":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=cfg.sweep.seed)
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as exc:  # optuna is a dependency; say so if an environment lacks it
        raise ConfigError(f"sweep.searcher='tpe' needs optuna ({exc}); pip install optuna") from None
    import optuna

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.sweep.seed))


def scheduler_for(cfg: TuneJobConfig, state_url: str) -> Any:
    """The trial scheduler of ``sweep.scheduler``, ASHA keeping its rungs at ``state_url``."""
    if cfg.sweep.scheduler == "fifo":
        return None
    return ResumableASHA(state_url, to_dict(cfg.storage), max_t=cfg.train.epochs,
                         grace_period=cfg.sweep.grace_period, reduction_factor=cfg.sweep.reduction_factor)


def _describe_trial_error(error: BaseException) -> str:
    """Bad input in one line (the remote traceback of Ray's wrapper would not fit a table)."""
    from service.job_errors import user_error_behind

    error = user_error_behind(error) or error
    return f"{type(error).__name__}: {error}"


def _summarise(result: Any, metric: str, epochs: int, statuses: dict[str, str]) -> TrialSummary:
    metrics = dict(result.metrics or {})
    trial_id = str(metrics.get("trial_id") or _trial_id_from_path(result.path, statuses))
    done_epochs = int(metrics.get(TIME_ATTR, 0) or 0)
    if statuses.get(trial_id) not in ("TERMINATED", "ERROR"):
        status = "unfinished"
    elif result.error is not None:
        status = "error"
    elif done_epochs >= epochs:
        status = "completed"
    else:
        status = "stopped early"
    value = metrics.get(metric)
    loss = metrics.get("train/loss")
    return TrialSummary(
        trial_id=trial_id,
        params={k: v for k, v in (result.config or {}).items()},
        status=status,
        epochs=done_epochs,
        objective=float(value) if value is not None else None,
        train_loss=float(loss) if loss is not None else None,
        checkpoint_path=metrics.get("checkpoint_path"),
        error=_describe_trial_error(result.error) if result.error is not None else None,
    )


def _trial_id_from_path(path: Any, statuses: dict[str, str]) -> str:
    """A trial that never reported has no metrics; its directory name contains its id."""
    name = Path(str(path)).name
    return next((trial_id for trial_id in statuses if trial_id in name), name)


def format_table(trials: list[TrialSummary], metric: str, best: TrialSummary | None) -> str:
    keys = sorted({k for t in trials for k in t.params})
    header = ["trial", *keys, "status", "epochs", metric, "train/loss"]

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [[t.trial_id + (" *" if best is not None and t.trial_id == best.trial_id else ""),
             *(fmt(t.params.get(k)) for k in keys), t.status, str(t.epochs), fmt(t.objective), fmt(t.train_loss)]
            for t in trials]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- MLflow


def open_parent_run(cfg: TuneJobConfig, tracking_uri: str, storage_label: str, dims: list[Dimension], metric: str,
                    mode: str) -> Tracker:
    """The sweep's parent run (a resumed sweep continues its own), with the space as params."""
    # Trial runs carry the sweep's name too, but not its storage tag.
    parent = open_run(tracking_uri, cfg.mlflow.experiment,
                      identity={SWEEP_TAG: cfg.sweep.name, SWEEP_STORAGE_TAG: storage_label},
                      run_name=cfg.sweep.name, resume=True, tags={"convmae.kind": "sweep"},
                      enabled=cfg.mlflow.enabled)
    parent.set_tags(provenance())  # the code of this (possibly resumed) session
    parent.log_params({**{f"space.{d.key}": cfg.sweep.space[d.key] for d in dims},
                       **{f"sweep.{k}": v for k, v in flatten(cfg.sweep, redact=True).items()
                          if not k.startswith("space.")},
                       "objective": metric, "mode": mode})
    parent.log_dict(redacted(cfg), "sweep_config.json")
    return parent


# The MLflow status of a trial's run, by the trial's fate in the sweep.
TRIAL_RUN_STATUS = {"completed": "FINISHED", "stopped early": "KILLED", "error": "FAILED", "unfinished": "KILLED"}


def end_trial_runs(cfg: TuneJobConfig, tracking_uri: str, trials: list[TrialSummary]) -> None:
    """Gives each trial's run the status its fate deserves.

    Tune tears a trial's actor down as soon as the trial is decided: stopped early by ASHA,
    stopped by ASHA at its last epoch (so completed trials too), cut short by an interrupted
    sweep. ``run_pretraining`` is then still waiting on the Train controller: no exception or
    ``finally`` runs there, and its run would stay RUNNING forever. Only this driver knows the
    verdict. A trial ASHA stopped early ends KILLED, as MLflow has any run that ended before its
    own end (here: before ``train.epochs``), so that it does not pass for a complete run in
    searches by status; its ``convmae.stopped_by`` tag says that the scheduler stopped it and
    tells it from a crash (FAILED, with ``convmae.error``) or an interrupted sweep.
    """
    from service.training.launch import RUN_NAME_TAG

    if not cfg.mlflow.enabled:
        return
    for trial in trials:
        run_id = find_run_id(tracking_uri, cfg.mlflow.experiment,
                             {RUN_NAME_TAG: trial_run_name(cfg.sweep.name, trial.trial_id)})
        if run_id is None:  # never started (or MLflow is down: already warned)
            continue
        tracker, wanted = Tracker(tracking_uri, run_id), TRIAL_RUN_STATUS[trial.status]
        if trial.status == "stopped early":
            tracker.set_tags({STOPPED_BY_TAG: cfg.sweep.scheduler})
        if tracker.status() != wanted:  # a failed trial's own FAILED (and error tag) stays
            tracker.finish(wanted, error=(trial.error or "the trial failed") if wanted == "FAILED" else None)


def _register_best(cfg: TuneJobConfig, base: PretrainConfig, best: TrialSummary, storage_fs: Any,
                   tracking_uri: str, train_url: str) -> str | None:
    """Logs the best trial's model to its own run, registers it and points the alias at it."""
    if not best.checkpoint_path:
        log.warning("the best trial %s reported no checkpoint; nothing to register", best.trial_id)
        return None
    try:
        from mlflow import MlflowClient
        from ray.train import Checkpoint

        from service.training.launch import RUN_NAME_TAG
        from service.training.pretrain import register_checkpoint

        run_name = trial_run_name(cfg.sweep.name, best.trial_id)
        trial_cfg = with_overrides(base, {**best.params, "run_name": run_name, "mlflow.register": True})
        run_id = find_run_id(tracking_uri, cfg.mlflow.experiment, {RUN_NAME_TAG: run_name})
        if run_id is None:
            log.warning("no MLflow run for the best trial %s; not registering", best.trial_id)
            return None
        checkpoint = Checkpoint(best.checkpoint_path, filesystem=storage_fs)
        out = register_checkpoint(trial_cfg, checkpoint, tracking_uri, run_id, train_url)
        if out.get("version") is None:
            return None
        name = trial_cfg.registered_name()
        client = MlflowClient(tracking_uri=tracking_uri)
        client.set_registered_model_alias(name, cfg.alias, out["version"])
        client.set_model_version_tag(name, out["version"], "sweep", cfg.sweep.name)
        log.info("best trial %s registered as models:/%s@%s (version %s)", best.trial_id, name, cfg.alias,
                 out["version"])
        return f"models:/{name}@{cfg.alias}"
    except Exception as exc:
        log.warning("could not register the best trial's model (%s: %s); its checkpoint is %s",
                    type(exc).__name__, exc, best.checkpoint_path)
        return None


def _finish_parent_run(parent: Tracker, trials: list[TrialSummary], best: TrialSummary | None, metric: str,
                       table: str, registered_uri: str | None, status: str) -> None:
    rows = [{"trial_id": t.trial_id, **{f"param.{k}": v for k, v in t.params.items()}, "status": t.status,
             "epochs": t.epochs, metric: t.objective, "train/loss": t.train_loss} for t in trials]
    parent.log_text(json.dumps(rows, indent=1, default=str), "trials.json")
    parent.log_text(table + "\n", "trials.txt")
    parent.log_table(rows, "trials_table.json")
    if best is not None:
        parent.log_metrics({f"best/{metric}": best.objective}, step=0)
        parent.set_tags({"best_trial": best.trial_id, **({"best_model": registered_uri} if registered_uri else {})})
    parent.finish(status)
