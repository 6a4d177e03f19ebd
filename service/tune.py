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

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from service.config import (
    ConfigError,
    PretrainConfig,
    flatten,
    from_dict,
    to_dict,
    validate_pretrain,
    with_overrides,
)

log = logging.getLogger("convmae.tune")

SEARCHERS = ("random", "grid", "tpe")
SCHEDULERS = ("asha", "fifo")
OBJECTIVES = {"val/recon_loss": "min", "val/knn_top1": "max"}
DIMENSION_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
TIME_ATTR = "epochs_completed"  # reported by every epoch-end checkpoint of the training loop

SWEEP_TAG = "convmae.sweep_name"
SWEEP_STORAGE_TAG = "convmae.sweep_storage"
TRIAL_TAG = "convmae.trial_id"

# Fits the default tiny model at 32 px (4 patches: 2 or 1 visible); at 224 px sweep e.g. [0.6, 0.75, 0.9].
DEFAULT_SPACE = {"model.mask_ratio": "grid [0.5, 0.75]", "train.blr": "loguniform [1.0e-4, 1.0e-3]"}


@dataclass(frozen=True)
class SweepConfig:
    name: str = "convmae-sweep"
    # Dotted pretraining key -> "KIND [ARGS]": grid [v1, v2, ...], choice [v1, ...],
    # uniform [low, high], loguniform [low, high], randint [low, high] (inclusive).
    space: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    searcher: str = "random"  # random (grid dims enumerated), grid (all dims), tpe (Optuna)
    num_samples: int = 1  # random/grid: repeats of the grid; tpe: number of trials
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs/GPUs fit
    objective: str = "auto"  # auto: val/knn_top1 on labeled data, else val/recon_loss
    scheduler: str = "asha"  # asha: stop bad trials early at epoch rungs; fifo: run every trial to the end
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2
    storage_path: str = "convmae_sweeps"  # local dir or s3://bucket/prefix
    resume: bool = True  # continue an interrupted sweep of the same name from its storage
    driver_cpus: float = 0.25  # CPU reserved for each trial's driver function
    seed: int = 0
    alias: str = ""  # registry alias of the best model; empty: best-sweep-<name>


@dataclass(frozen=True)
class TuneJobConfig(PretrainConfig):
    """The pretraining config every trial starts from, plus the ``sweep`` section."""

    sweep: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> TuneJobConfig:
        validate_pretrain(self)
        validate_sweep(self)
        return self

    def pretrain(self, overrides: dict[str, Any] | None = None) -> PretrainConfig:
        base = PretrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PretrainConfig)})
        return with_overrides(base, overrides) if overrides else base

    @property
    def alias(self) -> str:
        return self.sweep.alias or f"best-sweep-{self.sweep.name}"


# ---------------------------------------------------------------- search space


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted pretraining key
    kind: str
    args: tuple[Any, ...]  # the values (grid, choice) or the bounds (uniform, loguniform, randint)

    def tune_domain(self, searcher: str) -> Any:
        from ray import tune

        if self.kind in ("grid", "choice"):
            # TPE cannot take grid_search; the grid searcher enumerates choices too.
            as_grid = self.kind == "grid" if searcher == "random" else searcher == "grid"
            return tune.grid_search(list(self.args)) if as_grid else tune.choice(list(self.args))
        low, high = self.args
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(low, high + 1)  # Tune's upper bound is exclusive, ours inclusive


def parse_dimension(key: str, spec: str) -> Dimension:
    where = f"sweep.space.{key}={spec!r}"
    kind, _, rest = str(spec).strip().partition(" ")
    if kind not in DIMENSION_KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; allowed: {', '.join(DIMENSION_KINDS)} "
                          "(e.g. 'grid [0.6, 0.75]', 'loguniform [1e-4, 1e-3]')")
    try:
        args = yaml.safe_load(rest)
    except yaml.YAMLError:
        args = None
    if isinstance(args, list):  # YAML reads 1e-4 (no dot) as a string
        args = [_number(a) for a in args]
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: expected '{kind} [...]' with a non-empty list of values")
    if kind in ("uniform", "loguniform", "randint"):
        numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if len(args) != 2 or not numeric or not args[0] < args[1]:
            raise ConfigError(f"{where}: {kind} takes [low, high] with numbers low < high")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: randint takes integer bounds")
        if kind != "randint":
            args = [float(a) for a in args]
    return Dimension(key, kind, tuple(args))


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            return value
    return value


def parse_space(cfg: TuneJobConfig) -> list[Dimension]:
    """The sweep's dimensions, each checked against the pretraining config: the key must exist
    and every grid value and both bounds must give a valid config."""
    if not cfg.sweep.space:
        raise ConfigError("sweep.space is empty: give at least one dimension, e.g. "
                          "--sweep.space.model.mask_ratio 'grid [0.6, 0.75, 0.9]'")
    base = cfg.pretrain()
    keys = flatten(base)
    not_sweepable = {"run_name", "checkpoint.storage_path", "checkpoint.resume", "mlflow.tracking_uri",
                     "mlflow.experiment", "mlflow.register", "dist.ray_address"}
    dims = []
    for key, spec in cfg.sweep.space.items():
        if key not in keys or key in not_sweepable:
            raise ConfigError(
                f"sweep.space: {key!r} is not a sweepable pretraining key; use a dotted key such as "
                "model.mask_ratio, train.blr, train.weight_decay, train.warmup_epochs"
            )
        dim = parse_dimension(key, spec)
        for value in dim.args:
            try:
                with_overrides(base, {key: value}).validate()
            except ConfigError as exc:
                raise ConfigError(f"sweep.space.{key}: value {value!r} is not allowed ({exc})") from None
        dims.append(dim)
    return dims


def param_space(dims: list[Dimension], searcher: str) -> dict[str, Any]:
    return {d.key: d.tune_domain(searcher) for d in dims}


def validate_sweep(cfg: TuneJobConfig) -> None:
    s = cfg.sweep

    def check(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"sweep.{key}={value!r} is not allowed: {allowed}")

    check(bool(s.name) and "/" not in s.name, "name", s.name, "a non-empty name without '/'")
    check(s.searcher in SEARCHERS, "searcher", s.searcher, f"one of {', '.join(SEARCHERS)}")
    check(s.scheduler in SCHEDULERS, "scheduler", s.scheduler, f"one of {', '.join(SCHEDULERS)}")
    check(s.objective == "auto" or s.objective in OBJECTIVES, "objective", s.objective,
          f"auto or one of {', '.join(OBJECTIVES)}")
    check(s.num_samples >= 1, "num_samples", s.num_samples, ">= 1")
    check(s.max_concurrent_trials >= 0, "max_concurrent_trials", s.max_concurrent_trials, ">= 0 (0: automatic)")
    check(s.grace_period >= 1, "grace_period", s.grace_period, ">= 1 epoch")
    check(s.reduction_factor >= 2, "reduction_factor", s.reduction_factor, ">= 2")
    check(s.driver_cpus >= 0, "driver_cpus", s.driver_cpus, ">= 0")
    check(bool(s.storage_path), "storage_path", s.storage_path, "a local path or URL")
    dims = parse_space(cfg)
    if s.searcher == "grid":
        continuous = [d.key for d in dims if d.kind not in ("grid", "choice")]
        check(not continuous, "searcher", s.searcher,
              f"grid needs grid/choice dimensions only, but {', '.join(continuous)} are continuous; "
              "use searcher random or tpe")
    if s.scheduler == "asha":
        check(s.grace_period < cfg.train.epochs, "grace_period", s.grace_period,
              f"fewer than train.epochs={cfg.train.epochs}, or ASHA can never stop a trial early")


def resolve_objective(cfg: TuneJobConfig, val_has_labels: bool) -> tuple[str, str]:
    """(metric, mode): the requested objective, or for ``auto`` the best one the data allows."""
    knn_possible = val_has_labels and cfg.train.knn_k > 0
    objective = cfg.sweep.objective
    if objective == "auto":
        objective = "val/knn_top1" if knn_possible else "val/recon_loss"
    elif objective == "val/knn_top1" and not knn_possible:
        raise ConfigError("sweep.objective='val/knn_top1' needs a labeled validation split (.cls labels) "
                          "and train.knn_k > 0; use val/recon_loss or auto")
    return objective, OBJECTIVES[objective]


def trial_resources(cfg: PretrainConfig, use_gpu: bool, driver_cpus: float) -> dict[str, float]:
    """What one trial holds while it runs: its driver plus its training workers."""
    need = {"CPU": driver_cpus + cfg.dist.num_workers * cfg.dist.cpus_per_worker}
    if use_gpu:
        need["GPU"] = cfg.dist.num_workers * cfg.dist.gpus_per_worker
    return need


def concurrent_trials(requested: int, per_trial: dict[str, float], cluster: dict[str, float]) -> int:
    """``requested`` if given, else as many trials as fit in ``cluster`` at once (at least 1:
    an autoscaling cluster may grow to fit one)."""
    if requested > 0:
        return requested
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in per_trial.items() if v > 0]
    return max(1, min(fits) if fits else 1)


# ---------------------------------------------------------------- the trial


def _run_trial(params: dict[str, Any], *, context: dict[str, Any]) -> None:
    """One trial, run by Tune in its own actor: a full pretraining run of the trial's config."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from service.pretrain import run_pretraining

    # The driver's S3, MLflow client and test settings, as run_pretraining forwards them to workers.
    os.environ.update(context["env"])
    trial_id = tune.get_context().get_trial_id()
    base = from_dict(PretrainConfig, context["base"])
    cfg = with_overrides(base, {**params, "run_name": trial_run_name(context["sweep_name"], trial_id)})
    run_pretraining(
        cfg,
        parent_run_id=context["parent_run_id"],
        tags={SWEEP_TAG: context["sweep_name"], TRIAL_TAG: trial_id},
        callbacks=[TuneReportCallback()],
    )


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


# ---------------------------------------------------------------- the sweep driver


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    status: str  # completed | stopped early | error
    epochs: int
    objective: float | None
    train_loss: float | None
    checkpoint_path: str | None


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
    from ray import tune

    from service import data as data_lib
    from service import distributed
    from service.launch import absolute_url, forwarded_env, storage_location
    from service.tracking import resolve_tracking_uri

    cfg.validate()
    dims = parse_space(cfg)
    train_url, val_url = (absolute_url(u) for u in data_lib.resolve_data_urls(cfg.data))
    if not val_url:
        raise ConfigError("sweeps compare trials on a held-out split: set data.val_url "
                          "(the embedded data set has one when data.url is empty)")
    data_lib.open_dataset(train_url, cfg.data)
    val_has_labels = data_lib.open_dataset(val_url, cfg.data).has_labels
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

    distributed.connect_ray(cfg.dist.ray_address)
    use_gpu = distributed.resolve_use_gpu(base)
    distributed.resolve_precision(base, use_gpu)
    import ray

    per_trial = trial_resources(base, use_gpu, cfg.sweep.driver_cpus)
    cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
    if any(cluster.get(k, 0.0) < v for k, v in per_trial.items()):
        log.warning("one trial needs %s but the cluster has %s now; trials wait for the autoscaler",
                    per_trial, {k: cluster.get(k, 0.0) for k in per_trial})
    concurrency = concurrent_trials(cfg.sweep.max_concurrent_trials, per_trial, cluster)

    storage_path, storage_fs = storage_location(cfg.sweep.storage_path, cfg.data)
    experiment_path = _join(storage_path, cfg.sweep.name)
    storage_label = _join(cfg.sweep.storage_path.rstrip("/"), cfg.sweep.name)
    parent_run_id = _find_or_create_parent_run(cfg, tracking_uri, storage_label, dims, metric, mode)

    # Mid-epoch checkpoints report no validation metric; Tune's scheduler and searchers skip
    # such results, and this keeps Tune from rejecting them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, context={"base": to_dict(base), "sweep_name": cfg.sweep.name,
                                                  "parent_run_id": parent_run_id, "env": forwarded_env()}),
        {"cpu": cfg.sweep.driver_cpus},
    )
    restoring = cfg.sweep.resume and tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs)
    if restoring:
        log.info("resuming sweep %s from %s: finished trials are kept, unfinished ones continue",
                 cfg.sweep.name, storage_label)
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_fs)
    else:
        if tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs):
            raise ConfigError(f"sweep.name={cfg.sweep.name!r} already exists under {cfg.sweep.storage_path}; "
                              "choose a new name or set sweep.resume=true to continue it")
        log.info("sweep %s: %d dimension(s), objective %s (%s), %s searcher, %s scheduler, "
                 "up to %d concurrent trial(s) of %s", cfg.sweep.name, len(dims), metric, mode,
                 cfg.sweep.searcher, cfg.sweep.scheduler, concurrency, per_trial)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(dims, cfg.sweep.searcher),
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=cfg.sweep.num_samples,
                max_concurrent_trials=concurrency, search_alg=_searcher(cfg),
                scheduler=_scheduler(cfg, _join(absolute_url(cfg.sweep.storage_path), cfg.sweep.name,
                                                "asha_state.json")),
            ),
            run_config=tune.RunConfig(name=cfg.sweep.name, storage_path=storage_path,
                                      storage_filesystem=storage_fs),
        )
    grid = tuner.fit()

    # Tune returns normally after a stop signal (Ctrl+C, SIGUSR1), having marked the trials it
    # cut short as terminated in memory; the experiment state it saved for resuming says which.
    from ray.tune import ExperimentAnalysis

    saved = ExperimentAnalysis(experiment_path, storage_filesystem=storage_fs)
    statuses = {t.trial_id: t.status for t in saved.trials}
    trials = sorted((_summarise(r, metric, cfg.train.epochs, statuses) for r in grid), key=lambda t: t.trial_id)
    interrupted = any(t.status == "unfinished" for t in trials)
    scored = [t for t in trials if t.objective is not None and math.isfinite(t.objective)]
    best = (max if mode == "max" else min)(scored, key=lambda t: t.objective) if scored else None
    table = format_table(trials, metric, best)
    registered_uri = None
    if interrupted:
        log.warning("sweep %s was interrupted with unfinished trials; run the same command again to resume it",
                    cfg.sweep.name)
    elif best is not None and cfg.mlflow.register:
        registered_uri = _register_best(cfg, base, best, storage_fs, tracking_uri, train_url)
    _finish_parent_run(tracking_uri, parent_run_id, trials, best, metric, table, registered_uri,
                       "KILLED" if interrupted else "FINISHED")
    return SweepResult(cfg.sweep.name, metric, mode, trials, best, parent_run_id, tracking_uri,
                       registered_uri, storage_label, table, interrupted)


def _join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/"), *parts[1:]])


def _searcher(cfg: TuneJobConfig) -> Any:
    if cfg.sweep.searcher != "tpe":
        return None  # Tune's default: grid dimensions enumerated, the rest sampled at random
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as exc:  # optuna is a dependency; say so if an environment lacks it
        raise ConfigError(f"sweep.searcher='tpe' needs optuna ({exc}); pip install optuna") from None
    import optuna

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.sweep.seed))


def _scheduler(cfg: TuneJobConfig, state_url: str) -> Any:
    if cfg.sweep.scheduler == "fifo":
        return None
    return resumable_asha(
        state_url, to_dict(cfg.data),
        time_attr=TIME_ATTR, max_t=cfg.train.epochs, grace_period=cfg.sweep.grace_period,
        reduction_factor=cfg.sweep.reduction_factor,
    )


def resumable_asha(state_url: str, data_config: dict[str, Any], **asha_kwargs: Any) -> Any:
    """ASHA whose rung records survive a restored sweep.

    Tune restores trials and searcher state but not the scheduler's: a restored ASHA would have
    forgotten the finished trials' rung results and stop nothing. This one writes its rungs
    next to the experiment after every decision and reads them back on its first use.
    """
    from ray.tune.schedulers import ASHAScheduler

    class ResumableASHA(ASHAScheduler):
        def __init__(self) -> None:
            super().__init__(**asha_kwargs)
            # Pickled into the experiment directory by Tune: holds no credentials.
            self._state_url, self._data_config, self._loaded = state_url, data_config, False

        def _fs(self):
            import fsspec

            from service.config import DataConfig
            from service.launch import persistable_storage_options

            remote = self._state_url.startswith(("s3://", "s3a://"))
            options = persistable_storage_options(from_dict(DataConfig, self._data_config)) if remote else {}
            return fsspec.core.url_to_fs(self._state_url, **options)

        def _load_once(self) -> None:
            if self._loaded:
                return
            self._loaded = True
            fs, path = self._fs()
            if not fs.exists(path):
                return
            saved = json.loads(fs.cat_file(path))
            for bracket, rungs in zip(self._brackets, saved["brackets"]):
                for (_, recorded), saved_rung in zip(bracket._rungs, rungs):
                    recorded.update(saved_rung)
            log.info("ASHA: restored the rung results of %d trial(s)",
                     len({t for b in saved["brackets"] for r in b for t in r}))

        def _save(self) -> None:
            fs, path = self._fs()
            state = {"brackets": [[dict(recorded) for _, recorded in b._rungs] for b in self._brackets]}
            with fs.open(path, "w") as f:
                json.dump(state, f)

        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            self._load_once()
            super().on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            self._load_once()
            action = super().on_trial_result(tune_controller, trial, result)
            if TIME_ATTR in result and self._metric in result:
                self._save()
            return action

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
            self._load_once()
            super().on_trial_complete(tune_controller, trial, result)
            self._save()

    return ResumableASHA()


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


def _find_or_create_parent_run(cfg: TuneJobConfig, tracking_uri: str, storage_label: str,
                               dims: list[Dimension], metric: str, mode: str) -> str | None:
    """The sweep's parent run; a resumed sweep continues its own. None when MLflow is down."""
    if not cfg.mlflow.enabled:
        return None
    try:
        from mlflow import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        from service.tracking import ensure_experiment

        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = ensure_experiment(client, tracking_uri, cfg.mlflow.experiment)
        found = client.search_runs(
            [experiment_id],
            # Trial runs carry the sweep's name too, but not its storage tag.
            filter_string=f"tags.`{SWEEP_TAG}` = '{cfg.sweep.name}' and tags.`{SWEEP_STORAGE_TAG}` = '{storage_label}'",
            max_results=1,
        )
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run = client.create_run(experiment_id, run_name=cfg.sweep.name, tags={
            SWEEP_TAG: cfg.sweep.name, SWEEP_STORAGE_TAG: storage_label, MLFLOW_RUN_NAME: cfg.sweep.name,
            "convmae.kind": "sweep"})
        from service.tracking import Tracker

        tracker = Tracker(tracking_uri, run.info.run_id, enabled=True)
        tracker.log_params({**{f"space.{d.key}": cfg.sweep.space[d.key] for d in dims},
                            **{f"sweep.{k}": v for k, v in flatten(cfg.sweep).items() if not k.startswith("space.")},
                            "objective": metric, "mode": mode})
        tracker.log_dict(to_dict(cfg), "sweep_config.json")
        return run.info.run_id
    except Exception as exc:
        log.warning("MLflow at %s is unavailable (%s); the sweep continues without tracking", tracking_uri, exc)
        return None


def _register_best(cfg: TuneJobConfig, base: PretrainConfig, best: TrialSummary, storage_fs: Any,
                   tracking_uri: str, train_url: str) -> str | None:
    """Logs the best trial's model to its own run, registers it and points the alias at it."""
    if not best.checkpoint_path:
        log.warning("the best trial %s reported no checkpoint; nothing to register", best.trial_id)
        return None
    try:
        from mlflow import MlflowClient
        from ray.train import Checkpoint

        from service.launch import RUN_NAME_TAG
        from service.pretrain import register_checkpoint

        run_name = trial_run_name(cfg.sweep.name, best.trial_id)
        trial_cfg = with_overrides(base, {**best.params, "run_name": run_name, "mlflow.register": True})
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                  max_results=1) if experiment else []
        if not runs:
            log.warning("no MLflow run for the best trial %s; not registering", best.trial_id)
            return None
        checkpoint = Checkpoint(best.checkpoint_path, filesystem=storage_fs)
        out = register_checkpoint(trial_cfg, checkpoint, tracking_uri, runs[0].info.run_id, train_url)
        if out.get("version") is None:
            return None
        name = cfg.mlflow.registered_model_name
        client.set_registered_model_alias(name, cfg.alias, out["version"])
        client.set_model_version_tag(name, out["version"], "sweep", cfg.sweep.name)
        log.info("best trial %s registered as models:/%s@%s (version %s)", best.trial_id, name, cfg.alias,
                 out["version"])
        return f"models:/{name}@{cfg.alias}"
    except Exception as exc:
        log.warning("could not register the best trial's model (%s: %s); its checkpoint is %s",
                    type(exc).__name__, exc, best.checkpoint_path)
        return None


def _finish_parent_run(tracking_uri: str, run_id: str | None, trials: list[TrialSummary],
                       best: TrialSummary | None, metric: str, table: str, registered_uri: str | None,
                       status: str) -> None:
    if run_id is None:
        return
    from service.tracking import Tracker

    tracker = Tracker(tracking_uri, run_id, enabled=True)
    rows = [{"trial_id": t.trial_id, **{f"param.{k}": v for k, v in t.params.items()}, "status": t.status,
             "epochs": t.epochs, metric: t.objective, "train/loss": t.train_loss} for t in trials]
    tracker.log_text(json.dumps(rows, indent=1, default=str), "trials.json")
    tracker.log_text(table + "\n", "trials.txt")
    tracker._safe("log trial table", tracker.client.log_table, run_id,
                  {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}, "trials_table.json")
    if best is not None:
        tracker.log_metrics({f"best/{metric}": best.objective}, step=0)
        tracker.set_tags({"best_trial": best.trial_id, **({"best_model": registered_uri} if registered_uri else {})})
    tracker._safe("end run", tracker.client.set_terminated, run_id, status)
    tracker.close()
