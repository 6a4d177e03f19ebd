"""The sweep job's config: the pretraining config every trial starts from, plus ``sweep``.

A search space maps dotted pretraining keys to ``"KIND [ARGS]"`` strings; parsing them is pure
(no Ray), so a bad space fails with the other config errors, before any cluster work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from service.config.jobs import (
    MAX_NUMPY_SEED,
    SWEEP_NAME_MAX,
    PretrainConfig,
    check_path_component,
    check_seed,
    validate_pretrain,
)
from service.config.schema import ConfigError, check, flatten, with_overrides

SEARCHERS = ("random", "grid", "tpe")
SCHEDULERS = ("asha", "fifo")
OBJECTIVES = {"val/recon_loss": "min", "val/knn_top1": "max"}
DIMENSION_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
MIN_DRIVER_CPUS = 0.0001  # Ray's resolution of fractional resources
# Keys that say where and how a trial is stored and tracked: the sweep sets them itself.
NOT_SWEEPABLE = frozenset({"run_name", "checkpoint.storage_path", "checkpoint.resume", "mlflow.tracking_uri",
                           "mlflow.experiment", "mlflow.register", "dist.ray_address"})

# Fits the default tiny model at 32 px (4 patches: 2 or 1 visible); at 224 px sweep e.g. [0.6, 0.75, 0.9].
DEFAULT_SPACE = {"model.mask_ratio": "grid [0.5, 0.75]", "train.blr": "loguniform [1.0e-4, 1.0e-3]"}


@dataclass(frozen=True)
class SweepConfig:
    name: str = "convmae-sweep"  # the sweep's folder under storage_path and its MLflow parent run; the same name resumes it
    # Dotted pretraining key -> "KIND [ARGS]": grid [v1, v2, ...], choice [v1, ...],
    # uniform [low, high], loguniform [low, high], randint [low, high] (inclusive).
    space: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    searcher: str = "random"  # random (grid dims enumerated), grid (all dims), tpe (Optuna)
    num_samples: int = 1  # random/grid: repeats of the grid; tpe: number of trials
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs/GPUs fit
    objective: str = "auto"  # auto: val/knn_top1 on labeled data, else val/recon_loss
    scheduler: str = "asha"  # asha: stop bad trials early at epoch rungs; fifo: run every trial to the end
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2  # ASHA keeps 1 in this many trials at each rung
    storage_path: str = "convmae_sweeps"  # local dir or s3://bucket/prefix
    resume: bool = True  # continue an interrupted sweep of the same name from its storage
    driver_cpus: float = 0.25  # CPU reserved for each trial's driver function (at least 0.0001)
    seed: int = 0  # seed of the searcher's draws: the same seed tries the same values
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


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted pretraining key
    kind: str
    args: tuple[Any, ...]  # the values (grid, choice) or the bounds (uniform, loguniform, randint)


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
    dims = []
    for key, spec in cfg.sweep.space.items():
        if key not in keys or key in NOT_SWEEPABLE:
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


def validate_sweep(cfg: TuneJobConfig) -> None:
    s = cfg.sweep

    def check_sweep(ok: bool, key: str, value: Any, allowed: str) -> None:
        check(ok, f"sweep.{key}", value, allowed)

    check_path_component("sweep.name", s.name, SWEEP_NAME_MAX)
    check_sweep(s.searcher in SEARCHERS, "searcher", s.searcher, f"one of {', '.join(SEARCHERS)}")
    check_sweep(s.scheduler in SCHEDULERS, "scheduler", s.scheduler, f"one of {', '.join(SCHEDULERS)}")
    check_sweep(s.objective == "auto" or s.objective in OBJECTIVES, "objective", s.objective,
                f"auto or one of {', '.join(OBJECTIVES)}")
    check_sweep(s.num_samples >= 1, "num_samples", s.num_samples, ">= 1")
    check_sweep(s.max_concurrent_trials >= 0, "max_concurrent_trials", s.max_concurrent_trials,
                ">= 0 (0: automatic)")
    check_sweep(s.grace_period >= 1, "grace_period", s.grace_period, ">= 1 epoch")
    check_sweep(s.reduction_factor >= 2, "reduction_factor", s.reduction_factor, ">= 2")
    # Tune cannot place a trial driver that holds nothing (a bundle of 0 CPU is refused when the
    # sweep starts); 0.0001 is Ray's smallest fraction of a CPU.
    check_sweep(s.driver_cpus >= MIN_DRIVER_CPUS, "driver_cpus", s.driver_cpus,
                f"a number >= {MIN_DRIVER_CPUS:g}: each trial's driver holds some CPU (a fraction such as 0.01 "
                "is next to none)")
    check_sweep(bool(s.storage_path), "storage_path", s.storage_path, "a local path or URL")
    check_seed("sweep.seed", s.seed, MAX_NUMPY_SEED)
    dims = parse_space(cfg)
    if s.searcher == "grid":
        continuous = [d.key for d in dims if d.kind not in ("grid", "choice")]
        check_sweep(not continuous, "searcher", s.searcher,
                    f"grid needs grid/choice dimensions only, but {', '.join(continuous)} are continuous; "
                    "use searcher random or tpe")
    if s.scheduler == "asha":
        check_sweep(s.grace_period < cfg.train.epochs, "grace_period", s.grace_period,
                    f"fewer than train.epochs={cfg.train.epochs}, or ASHA can never stop a trial early")
