"""Whether the Ray cluster can hold a run's workers, and waiting for room with a deadline.

Left to itself, Ray Train waits for its workers' placement group inside its controller actor,
in a call that blocks the controller's event loop: each try gives up after
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` and the controller retries without limit, so a
request the cluster cannot meet waits for ever; and Ray Train's Ctrl+C handler asks that same
blocked controller to abort, so Ctrl+C waits for ever too. So the driver checks first
(``check_placement``): a worker no node can hold, or a group larger than a cluster that cannot
grow, is refused at once; then it waits for the placement itself (``wait_for_placement``), in
short slices, so Ctrl+C stops it at once, for at most ``dist.placement_timeout_s``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from service.config import ConfigError, TrainingJobConfig
from service.runtime.cluster import started_local_cluster, worker_resources

log = logging.getLogger(__name__)

# The config key behind each resource a worker asks for, for messages.
RESOURCE_KEYS = {"CPU": "dist.cpus_per_worker", "GPU": "dist.gpus_per_worker"}
# How often the placement wait looks up from Ray, so Ctrl+C (a KeyboardInterrupt raised
# between two calls into Ray) is seen within about this long.
WAIT_SLICE_S = 1.0
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # ray.train.v2._internal.constants


class PlacementError(ConfigError):
    """The cluster cannot hold the run's workers: never, or not within ``dist.placement_timeout_s``."""


@dataclass(frozen=True)
class ClusterCapacity:
    """What a cluster can offer a run's workers."""

    nodes: tuple[dict[str, float], ...]  # each node's resources (an autoscaling cluster: each node type's)
    total: dict[str, float] | None  # the most the whole cluster can ever offer; None: unknown, it may grow
    source: str  # what these figures describe, for messages

    def describe_nodes(self) -> str:
        shapes = sorted({_describe(node) for node in self.nodes})
        return "; ".join(shapes) if shapes else "no nodes"


def cluster_capacity() -> ClusterCapacity:
    """The capacity of the cluster this process is connected to.

    A local cluster this job started is this machine, as it is. A cluster with an autoscaler
    publishes its node types and their limits (the same figures Ray Train checks). Any other
    joined cluster may still grow (an autoscaler that publishes no limits): its size is unknown,
    and only the placement deadline bounds the wait.
    """
    import ray

    alive = tuple(_known_resources(node["Resources"]) for node in ray.nodes() if node.get("Alive"))
    if started_local_cluster():
        return ClusterCapacity(alive, _sum(alive), "the local Ray cluster this job started (it cannot grow)")
    limits = _autoscaler_limits()
    if limits is not None:
        return limits
    return ClusterCapacity(alive, None, "the Ray cluster")


def fewest_workers(cfg: TrainingJobConfig) -> tuple[int, str]:
    """(the fewest workers the run can start with, the key that says so): ``dist.min_workers``
    of an elastic run, else ``dist.num_workers``."""
    if cfg.dist.min_workers is not None:
        return cfg.dist.min_workers, "dist.min_workers"
    return cfg.dist.num_workers, "dist.num_workers"


def check_placement(cfg: TrainingJobConfig, use_gpu: bool, capacity: ClusterCapacity) -> None:
    """Raises PlacementError, naming the value and what the nodes have, when ``capacity`` can
    never hold one worker or the whole group of ``cfg``; a group that may fit later passes."""
    need = worker_resources(cfg, use_gpu)
    workers, key = fewest_workers(cfg)
    if capacity.total is None:
        return
    if not any(_fits(need, node) for node in capacity.nodes):
        too_big = [r for r in need if all(need[r] > node.get(r, 0.0) for node in capacity.nodes)] or list(need)
        named = ", ".join(f"{RESOURCE_KEYS.get(r, r)}={need[r]:g}" for r in too_big)
        raise PlacementError(
            f"{named}: no node of {capacity.source} can hold one worker ({_describe(need)}); its nodes have "
            f"{capacity.describe_nodes()}. Ask for at most what one node has"
        )
    for resource, amount in need.items():
        have = capacity.total.get(resource, 0.0)
        if amount * workers > have:
            raise PlacementError(
                f"{key}={workers}: {workers} workers of {_describe(need)} need {amount * workers:g} "
                f"{resource} but {capacity.source} has {have:g} in all ({capacity.describe_nodes()}). Lower "
                f"{key} or {RESOURCE_KEYS.get(resource, resource)}"
            )


def wait_for_placement(cfg: TrainingJobConfig, use_gpu: bool) -> None:
    """Returns once the cluster has room for all of ``cfg``'s workers at once; raises
    PlacementError after ``dist.placement_timeout_s`` without. Ctrl+C stops the wait at once.

    The room is reserved (a placement group of the workers' bundles, as Ray Train asks for)
    and given back at once: Ray Train reserves its own right after.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    need = worker_resources(cfg, use_gpu)
    (workers, key), timeout_s = fewest_workers(cfg), cfg.dist.placement_timeout_s
    group = placement_group([need] * workers, strategy="PACK")
    deadline = time.monotonic() + timeout_s
    try:
        waiting = False
        while not group.wait(max(0.0, min(WAIT_SLICE_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise PlacementError(
                    f"dist.placement_timeout_s={timeout_s:g}: the Ray cluster had no room for {workers} worker(s) "
                    f"of {_describe(need)} within {timeout_s:g} s (free now: "
                    f"{_describe(_known_resources(ray.available_resources()))}; its nodes have "
                    f"{cluster_capacity().describe_nodes()}). Free the cluster, lower {key}, or raise "
                    "dist.placement_timeout_s"
                )
            if not waiting:
                waiting = True
                log.info("waiting for placement: up to %g s (dist.placement_timeout_s) for room for %d worker(s) "
                         "of %s; free now: %s", timeout_s, workers, _describe(need),
                         _describe(_known_resources(ray.available_resources())))
    finally:
        remove_placement_group(group)


@contextmanager
def ray_train_placement_deadline(cfg: TrainingJobConfig) -> Iterator[None]:
    """Ray Train's own wait for its placement group (after ``wait_for_placement``, or when a
    failed group restarts) gives up after ``dist.placement_timeout_s`` too, unless
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` is set by hand. Its controller reads the variable
    from the driver's environment when ``fit`` starts it; the run's
    ``FailureConfig.controller_failure_limit`` bounds how often it tries again."""
    if START_TIMEOUT_ENV in os.environ:
        yield
        return
    os.environ[START_TIMEOUT_ENV] = str(cfg.dist.placement_timeout_s)
    try:
        yield
    finally:
        os.environ.pop(START_TIMEOUT_ENV, None)


# ---------------------------------------------------------------- pieces


def _autoscaler_limits() -> ClusterCapacity | None:
    """The node types and limits an autoscaler published (KubeRay, the cluster launcher), or None."""
    try:
        from ray._private.state import state  # what Ray Train reads for the same check

        config = state.get_cluster_config()
    except Exception as exc:  # a Ray without it: the size stays unknown
        log.debug("no autoscaler limits (%s: %s)", type(exc).__name__, exc)
        return None
    return autoscaler_capacity(config) if config is not None and config.node_group_configs else None


def autoscaler_capacity(config: Any) -> ClusterCapacity:
    """The capacity an autoscaler's ``ClusterConfig`` (Ray's protobuf) allows: its node types,
    and at most ``max_count`` nodes of each (-1: no limit), within its ``max_resources``."""
    groups = config.node_group_configs
    types = tuple(_known_resources(dict(group.resources)) for group in groups if group.max_count)
    total: dict[str, float] = {}
    for group in groups:
        for resource, amount in group.resources.items():
            nodes = float("inf") if group.max_count < 0 else float(group.max_count)
            total[resource] = total.get(resource, 0.0) + (nodes * amount if amount else 0.0)
    for resource, cap in config.max_resources.items():
        total[resource] = min(total.get(resource, 0.0), float(cap))
    return ClusterCapacity(types, _known_resources(total), "the Ray cluster's autoscaler node types")


def _known_resources(resources: dict[str, Any]) -> dict[str, float]:
    """The resources a worker asks for, of a node's or cluster's (Ray also counts memory,
    object store, node labels ...)."""
    return {r: float(v) for r, v in resources.items() if r in RESOURCE_KEYS}


def _sum(nodes: tuple[dict[str, float], ...]) -> dict[str, float]:
    total: dict[str, float] = {}
    for node in nodes:
        for resource, amount in node.items():
            total[resource] = total.get(resource, 0.0) + amount
    return total


def _fits(need: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(r, 0.0) >= amount for r, amount in need.items())


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {r}" for r, amount in sorted(resources.items())) or "nothing"
