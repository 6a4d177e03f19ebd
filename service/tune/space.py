"""The search space as Ray Tune sees it, and what a sweep can afford: pure functions.

The grammar of a space (``"grid [0.6, 0.75]"``) and its validation live with the sweep's config
(``service.config.sweep``); here its dimensions become Tune domains, the objective is chosen
for the data, and the trials' resources are sized against the cluster.
"""

from __future__ import annotations

import math
from typing import Any

from service.config import ConfigError, PretrainConfig, TuneJobConfig
from service.config.sweep import OBJECTIVES, Dimension


def tune_domain(dim: Dimension, searcher: str) -> Any:
    """The Ray Tune domain of ``dim`` for ``searcher``."""
    from ray import tune

    if dim.kind in ("grid", "choice"):
        # TPE cannot take grid_search; the grid searcher enumerates choices too.
        as_grid = dim.kind == "grid" if searcher == "random" else searcher == "grid"
        return tune.grid_search(list(dim.args)) if as_grid else tune.choice(list(dim.args))
    low, high = dim.args
    if dim.kind == "uniform":
        return tune.uniform(low, high)
    if dim.kind == "loguniform":
        return tune.loguniform(low, high)
    return tune.randint(low, high + 1)  # Tune's upper bound is exclusive, ours inclusive


def param_space(dims: list[Dimension], searcher: str) -> dict[str, Any]:
    return {d.key: tune_domain(d, searcher) for d in dims}


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
