"""Training across several Ray nodes (``multinode_cluster``: a head without CPUs and 1-CPU
worker nodes on this machine, each its own raylet and object store), data and checkpoints on
the loopback S3 server, a real MLflow server; the job is ``jobs/pretrain.py --dist.ray_address``
in a subprocess, as a user runs it.

Faults are real: a node killed (its raylet and workers gone at once), a node drained for
preemption with a deadline through the GCS, as ``ray drain-node`` does. Each worker appends the
sample keys of every micro-batch it trains on to a log (``CONVMAE_SEEN_KEYS_LOG``), from which
a test reads which attempt's data each step kept.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.fixtures.multinode_cluster import (
    MultiNodeCluster,
    checkpointed_steps,
    job_args,
    read_seen,
    redone_steps,
    running_multinode_cluster,
    upload_digits,
    wait_for,
)
from tests.service.training.test_pretrain_e2e import loss_by_step

pytestmark = pytest.mark.e2e

JOB_TIMEOUT_S = 900


def kept_batches(seen: list[dict], micro_per_step: int) -> dict[int, list[dict]]:
    """Each step's micro-batches as the run kept them. Every step takes ``micro_per_step``
    micro-batches over all workers, whatever their number (the global batch is fixed); a step
    begun by workers that were then lost is redone from a checkpoint by the next ones, whose
    micro-batches come last (the lost workers write nothing after they are gone)."""
    by_step: dict[int, list[dict]] = defaultdict(list)
    for entry in seen:
        by_step[entry["step"]].append(entry)
    return {step: entries[-micro_per_step:] for step, entries in by_step.items()}


def assert_exactly_once_per_epoch(seen: list[dict], num_samples: int, batch_size: int, micro_per_step: int) -> None:
    """No sample is trained on twice in an epoch (after redone steps are set aside), and each
    epoch covers the data set but for the remainders left out for equal batches."""
    kept = kept_batches(seen, micro_per_step)
    assert all(len(entries) == micro_per_step for entries in kept.values()), "a step with missing micro-batches"
    keys_by_epoch: dict[int, list[str]] = defaultdict(list)
    for entries in kept.values():
        for entry in entries:
            keys_by_epoch[entry["epoch"]].extend(entry["keys"])
    assert keys_by_epoch, "no batch was recorded"
    for epoch, keys in keys_by_epoch.items():
        twice = sorted({k for k in keys if keys.count(k) > 1})
        assert not twice, f"epoch {epoch}: {len(twice)} samples trained on twice, e.g. {twice[:5]}"
        assert len(keys) > num_samples - 2 * batch_size * micro_per_step, (epoch, len(keys), num_samples)


def finish(process, log_path: Path) -> str:
    try:
        process.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    out = log_path.read_text()
    assert process.returncode == 0, out[-8000:]
    return out


def mlflow_run(mlflow_uri: str, run_name: str):
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id],
                              f"tags.`convmae.run_name` = '{run_name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run throughout
    return client, runs[0]


def start_pretraining(cluster: MultiNodeCluster, bucket: str, mlflow_uri: str, digits_dir: Path, tmp_path: Path,
                      run_name: str, **flags) -> tuple[Any, Path, Path]:
    """``jobs/pretrain.py`` on the cluster, data and checkpoints in ``bucket``; returns the job's
    process, the workers' log of what they trained on, and the job's output."""
    train_url, val_url = upload_digits(digits_dir, bucket)
    seen_log, log_path = tmp_path / "seen.jsonl", tmp_path / "job.log"
    args = job_args(bucket, train_url, val_url, mlflow_uri, run_name, **flags)
    return cluster.start_job("pretrain.py", args, log_path, {"CONVMAE_SEEN_KEYS_LOG": str(seen_log)}), seen_log, log_path


def assert_finished_with_each_step_once(mlflow_uri: str, run_name: str) -> dict[int, float]:
    """The run's one MLflow run is FINISHED with one train/loss point per step; returns them."""
    _, run = mlflow_run(mlflow_uri, run_name)
    assert run.info.status == "FINISHED"
    losses = loss_by_step(mlflow_uri, run.info.run_id)
    assert sorted(losses) == list(range(1, max(losses) + 1))
    return losses


@pytest.mark.slow
def test_elastic_run_loses_a_node_goes_on_with_2_and_grows_back_to_3(
        multinode_cluster: MultiNodeCluster, s3_bucket, mlflow_server, digits_dir, tmp_path):
    cluster = multinode_cluster
    third = cluster.add_worker_node()
    job, seen_log, log_path = start_pretraining(cluster, s3_bucket, mlflow_server, digits_dir, tmp_path, "elastic", **{
        "train.epochs": 2, "train.grad_accum_steps": 2, "dist.num_workers": 3, "dist.min_workers": 2,
        "dist.max_failures": 3, "dist.resize_check_s": 5})
    try:
        wait_for(lambda: {e["world"] for e in read_seen(seen_log)} == {3} and checkpointed_steps(s3_bucket, "elastic"),
                 600, "a first checkpoint on 3 workers", job, log_path)
        cluster.kill_node(third)
        wait_for(lambda: any(e["world"] == 2 for e in read_seen(seen_log)), 600, "training on 2 workers",
                 job, log_path)
        cluster.add_worker_node()
        wait_for(lambda: read_seen(seen_log)[-1]["world"] == 3, 600, "training on 3 workers again", job, log_path)
    finally:
        out = finish(job, log_path)

    assert "world size 2 of 3: 3 accumulation step(s)" in out
    seen = read_seen(seen_log)
    worlds = [e["world"] for e in seen]
    assert worlds[0] == 3 and 2 in worlds and worlds[-1] == 3
    assert_exactly_once_per_epoch(seen, num_samples=1617, batch_size=16, micro_per_step=3 * 2)

    losses = assert_finished_with_each_step_once(mlflow_server, "elastic")
    client, run = mlflow_run(mlflow_server, "elastic")
    assert max(losses) == max(e["step"] for e in seen)
    world_sizes = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/world_size")}
    assert set(world_sizes.values()) == {2.0, 3.0}
    # The loss curve goes on: no step after the first resize is back near the untrained loss.
    first_on_two = min(s for s, w in world_sizes.items() if w == 2)
    untrained, trained = losses[1], min(losses[s] for s in range(2, first_on_two))
    assert trained < untrained
    for step in range(first_on_two, max(losses) + 1):
        assert losses[step] < untrained - 0.5 * (untrained - trained), (step, losses)


@pytest.mark.slow
def test_a_drained_node_checkpoints_before_its_deadline_and_no_finished_step_is_redone(
        multinode_cluster: MultiNodeCluster, s3_bucket, mlflow_server, digits_dir, tmp_path):
    cluster = multinode_cluster
    cluster.add_worker_node()  # room for the drained node's worker elsewhere
    # max_failures 0: a preemption is charged to Ray Train's preemption budget, not to it.
    job, seen_log, log_path = start_pretraining(cluster, s3_bucket, mlflow_server, digits_dir, tmp_path, "drained",
                                                **{"dist.max_failures": 0, "checkpoint.every_steps": 1000})
    try:
        wait_for(lambda: len({e["step"] for e in read_seen(seen_log)}) >= 3, 600, "3 steps trained", job, log_path)
        pids = {e["attempt"] for e in read_seen(seen_log)}
        drained = cluster.node_of_rank(read_seen(seen_log), rank=1)
        cluster.drain_node(drained, deadline_s=40)
        # Had no checkpoint been saved before the deadline, the run would start over (redone steps).
        wait_for(lambda: checkpointed_steps(s3_bucket, "drained"), 600, "a checkpoint", job, log_path)
        saved_step = checkpointed_steps(s3_bucket, "drained")[0]
        wait_for(lambda: {e["attempt"] for e in read_seen(seen_log)} - pids, 600, "training after the drain",
                 job, log_path)
        cluster.kill_node(drained)  # the node is reclaimed
    finally:
        out = finish(job, log_path)

    assert "preempted" in out and "saving step" in out
    seen = read_seen(seen_log)
    assert not redone_steps(seen, micro_per_step=2), "a finished step was trained again"
    before = [e["step"] for e in seen if e["attempt"] in pids]
    assert saved_step == max(before)  # saved at the last step the drained workers trained
    assert_exactly_once_per_epoch(seen, num_samples=1617, batch_size=16, micro_per_step=2)
    assert_finished_with_each_step_once(mlflow_server, "drained")


@pytest.mark.slow
def test_fixed_size_run_fails_over_to_another_node_within_max_failures(
        multinode_cluster: MultiNodeCluster, s3_bucket, mlflow_server, digits_dir, tmp_path):
    cluster = multinode_cluster
    cluster.add_worker_node()  # a spare node
    job, seen_log, log_path = start_pretraining(cluster, s3_bucket, mlflow_server, digits_dir, tmp_path, "fixed",
                                                **{"dist.max_failures": 1})
    try:
        wait_for(lambda: checkpointed_steps(s3_bucket, "fixed"), 600, "a first checkpoint", job, log_path)
        pids = {e["attempt"] for e in read_seen(seen_log)}
        cluster.kill_node(cluster.node_of_rank(read_seen(seen_log), rank=1))
    finally:
        finish(job, log_path)

    seen = read_seen(seen_log)
    assert {e["world"] for e in seen} == {2}  # a fixed size throughout
    assert {e["attempt"] for e in seen} - pids, "the run did not go on in new workers"
    assert_exactly_once_per_epoch(seen, num_samples=1617, batch_size=16, micro_per_step=2)
    assert_finished_with_each_step_once(mlflow_server, "fixed")


@pytest.mark.slow
def test_a_two_node_run_trains_one_worker_per_node_and_refuses_node_local_storage(
        multinode_cluster: MultiNodeCluster, s3_bucket, mlflow_server, digits_dir, tmp_path):
    cluster = multinode_cluster
    train_url, val_url = upload_digits(digits_dir, s3_bucket)
    # A checkpoint folder on this machine's disk: refused before any work, naming the way out.
    refused = cluster.start_job("pretrain.py", job_args(s3_bucket, train_url, val_url, mlflow_server, "local",
                                                        **{"checkpoint.storage_path": str(tmp_path / "runs")}),
                                tmp_path / "refused.log")
    assert refused.wait(timeout=300) == 2
    message = (tmp_path / "refused.log").read_text()
    assert "checkpoint.storage_path=" in message and "--storage.root s3://" in message, message[-3000:]

    job, seen_log, log_path = start_pretraining(cluster, s3_bucket, mlflow_server, digits_dir, tmp_path, "two-nodes",
                                                **{"train.max_steps": 2})
    finish(job, log_path)
    seen = read_seen(seen_log)
    nodes_by_rank = {e["rank"]: e["node"] for e in seen}
    assert sorted(nodes_by_rank) == [0, 1]
    assert set(nodes_by_rank.values()) == {node.node_id for node in cluster.workers}  # one per node
    _, run = mlflow_run(mlflow_server, "two-nodes")
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_sweep_spreads_its_trials_over_nodes_and_a_lost_node_costs_its_trial_a_resume(
        s3_bucket, mlflow_server, digits_dir, tmp_path):
    # Room for the trials' drivers (sweep.driver_cpus 0.25 each) on the head (1 CPU: Ray's node
    # resources are whole numbers, so one trial's worker may land there instead); each trial's
    # 1-CPU worker needs a node of its own; spares for the one that loses its node.
    with running_multinode_cluster(worker_nodes=4, head_cpus=1) as cluster:
        sweep_loses_a_node(cluster, s3_bucket, mlflow_server, digits_dir, tmp_path)


def sweep_loses_a_node(cluster: MultiNodeCluster, s3_bucket: str, mlflow_server: str, digits_dir: Path,
                       tmp_path: Path) -> None:
    train_url, val_url = upload_digits(digits_dir, s3_bucket)
    config = tmp_path / "sweep.yaml"
    config.write_text(
        "sweep:\n  name: spread\n  space:\n    train.blr: grid [1.5e-3, 3.0e-3]\n  scheduler: fifo\n"
        f"  objective: val/recon_loss\n  storage_path: {s3_bucket}/sweeps\n")
    seen_log, log_path = tmp_path / "seen.jsonl", tmp_path / "job.log"
    args = ["--config", str(config), *job_args(s3_bucket, train_url, val_url, mlflow_server, None, **{
        "dist.num_workers": 1, "dist.max_failures": 1, "checkpoint.every_steps": 10, "train.max_steps": 40,
        "checkpoint.storage_path": None, "mlflow.experiment": "multinode-sweep"})]
    job = cluster.start_job("tune.py", args, log_path, {"CONVMAE_SEEN_KEYS_LOG": str(seen_log)})
    try:
        # Both trials train, each on a node of its own; one loses its node after a checkpoint.
        wait_for(lambda: len({e["attempt"] for e in read_seen(seen_log) if e["step"] > 12}) >= 2, 900,
                 "both trials past their first checkpoint", job, log_path)
        seen = read_seen(seen_log)
        nodes_by_process = {e["attempt"]: e["node"] for e in seen}
        assert len(set(nodes_by_process.values())) == len(nodes_by_process) == 2  # one trial per node
        # A trial whose worker is on a worker node (the head, with room for one, may hold the other's).
        worker_nodes = {n.node_id: n for n in cluster.workers}
        lost_node = next(node for node in nodes_by_process.values() if node in worker_nodes)
        cluster.kill_node(worker_nodes[lost_node])
    finally:
        out = finish(job, log_path)

    assert "resumed from" in out  # the lost trial went on from its checkpoint
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("multinode-sweep").experiment_id])
    trials = [r for r in runs if r.data.tags.get("convmae.trial_id")]
    # train.max_steps ends them inside their first epoch: the sweep reports them stopped early.
    assert len(trials) == 2 and all(r.info.status != "FAILED" for r in trials), [r.info.status for r in trials]
    for trial in trials:
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, 41))  # each step once, the lost trial's too
