"""Whether a cluster can ever hold a run's workers: refused at once, naming the value and what
the nodes have, when it never can (the jobs' side is tests/jobs/test_job_waits.py)."""

from __future__ import annotations

import pytest

from service.config import ConfigError, PretrainConfig, with_overrides
from service.runtime.placement import (
    ClusterCapacity,
    PlacementError,
    autoscaler_capacity,
    check_placement,
)

TWO_CPU_MACHINE = ClusterCapacity(({"CPU": 2.0},), {"CPU": 2.0}, "the local Ray cluster")


def config_with(**dist: object) -> PretrainConfig:
    return with_overrides(PretrainConfig(), {f"dist.{k}": v for k, v in dist.items()})


def test_a_worker_bigger_than_any_node_is_refused_naming_the_value_and_the_nodes():
    with pytest.raises(PlacementError) as refused:
        check_placement(config_with(cpus_per_worker=1000), False, TWO_CPU_MACHINE)
    message = str(refused.value)
    assert message.startswith("dist.cpus_per_worker=1000: no node of the local Ray cluster can hold one worker")
    assert "its nodes have 2 CPU" in message
    assert isinstance(refused.value, ConfigError)  # the jobs exit 2 with it


def test_a_group_bigger_than_a_cluster_that_cannot_grow_is_refused_naming_num_workers():
    with pytest.raises(PlacementError, match=r"dist.num_workers=3: 3 workers of 1 CPU need 3 CPU but the local "
                                             r"Ray cluster has 2 in all"):
        check_placement(config_with(num_workers=3), False, TWO_CPU_MACHINE)


def test_a_gpu_worker_on_nodes_without_gpus_names_the_gpu_key():
    nodes = ClusterCapacity(({"CPU": 8.0},), {"CPU": 8.0}, "the Ray cluster's autoscaler node types")
    with pytest.raises(PlacementError, match=r"^dist.gpus_per_worker=1: no node of the Ray cluster's autoscaler node types"):
        check_placement(config_with(), True, nodes)


def test_a_worker_needs_one_node_with_all_it_asks_for():
    # Enough CPUs on one node, enough GPUs on another: no node holds a worker.
    split = ClusterCapacity(({"CPU": 8.0}, {"CPU": 1.0, "GPU": 1.0}), {"CPU": 9.0, "GPU": 1.0}, "the cluster")
    with pytest.raises(PlacementError, match="no node of the cluster can hold one worker"):
        check_placement(config_with(cpus_per_worker=4), True, split)


def test_what_fits_passes_and_a_cluster_of_unknown_size_is_left_to_the_placement_deadline():
    check_placement(config_with(num_workers=2), False, TWO_CPU_MACHINE)
    may_grow = ClusterCapacity(({"CPU": 2.0},), None, "the Ray cluster")
    check_placement(config_with(num_workers=64, cpus_per_worker=1000), False, may_grow)


@pytest.mark.parametrize("value", [0, -5])
def test_the_placement_timeout_is_validated(value):
    with pytest.raises(ConfigError, match=rf"dist.placement_timeout_s={float(value)} is not allowed: > 0"):
        config_with(placement_timeout_s=value).validate()


def test_an_autoscalers_node_types_and_limits_bound_what_it_can_hold():
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

    config = ClusterConfig(node_group_configs=[
        NodeGroupConfig(name="head", resources={"CPU": 4}, max_count=1),
        NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, max_count=2),
    ])
    capacity = autoscaler_capacity(config)
    assert capacity.total == {"CPU": 20.0, "GPU": 2.0}
    check_placement(config_with(num_workers=2), True, capacity)  # one GPU node each, once scaled up
    with pytest.raises(PlacementError, match=r"^dist.num_workers=3: 3 workers of 1 CPU, 1 GPU need 3 GPU but the "
                                             r"Ray cluster's autoscaler node types has 2 in all"):
        check_placement(config_with(num_workers=3), True, capacity)
    with pytest.raises(PlacementError, match=r"^dist.gpus_per_worker=2: no node of the Ray cluster's autoscaler node "
                                             r"types can hold one worker"):
        check_placement(config_with(gpus_per_worker=2), True, capacity)
    unlimited = autoscaler_capacity(ClusterConfig(node_group_configs=[
        NodeGroupConfig(name="cpu", resources={"CPU": 16}, max_count=-1)], max_resources={"CPU": 64}))
    assert unlimited.total == {"CPU": 64.0}
