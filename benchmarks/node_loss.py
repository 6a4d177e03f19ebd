"""What losing a node costs a pretraining run on a cluster of several Ray nodes.

    python benchmarks/node_loss.py                  # both scenarios, once each
    python benchmarks/node_loss.py --scenario drain --deadline-s 30 --json

The cluster is ``ray.cluster_utils.Cluster`` on this machine (a head without CPUs, 1-CPU worker
nodes, each its own raylet and object store on loopback); data and checkpoints on a loopback
S3 server (moto); MLflow off. The job is ``jobs/pretrain.py --dist.ray_address`` (tiny preset,
32 px, one worker per node), as the multi-node tests run it.

- ``kill``: an elastic run (3 workers, ``dist.min_workers 2``) loses the node of rank 1 at
  once (its raylet and workers killed), after its second checkpoint. Printed: seconds from the
  node's death to the next finished step (on the 2 workers left) and steps redone (trained
  before the death, after the checkpoint the run went on from).
- ``drain``: a fixed-size run (2 workers, a spare node) has the node of rank 1 drained for
  preemption with a deadline, as ``ray drain-node --reason PREEMPTION`` does. Printed: seconds
  from the drain to the saved checkpoint, from the deadline to the next finished step (on the
  spare node), and steps redone.

A step counts as finished when a micro-batch of the next step starts (the workers' log of what
they trained on, ``CONVMAE_SEEN_KEYS_LOG``, has its wall-clock time). Wall times: a busy machine
shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the checkout

from tests.fixtures.multinode_cluster import (  # noqa: E402
    checkpointed_steps,
    job_args,
    read_seen,
    redone_steps,
    running_multinode_cluster,
    upload_digits,
    wait_for,
)
from tests.fixtures.s3 import create_bucket, serving_s3  # noqa: E402

TIMEOUT_S = 900.0


def first_finished_step_after(seen: list[dict], moment: float, old_attempts: set[int]) -> tuple[int, float] | None:
    """(step, time) of the first step new workers finished after ``moment``: when a micro-batch of
    the step after it starts."""
    new = [e for e in seen if e["attempt"] not in old_attempts and e["time"] > moment]
    if not new:
        return None
    first_step = new[0]["step"]
    later = [e for e in new if e["step"] > first_step]
    return (first_step, later[0]["time"]) if later else None


def kill_scenario(cluster, endpoint: str, data: tuple[str, str], bucket: str, work: Path) -> dict[str, Any]:
    cluster.add_worker_node()  # 3 nodes, one worker each
    seen_log, log_path = work / "kill-seen.jsonl", work / "kill.log"
    args = job_args(bucket, *data, "http://127.0.0.1:1", "kill", **{
        "mlflow.enabled": False, "train.epochs": 2, "train.grad_accum_steps": 2, "dist.num_workers": 3,
        "dist.min_workers": 2, "dist.max_failures": 3, "dist.resize_check_s": 600})
    job = cluster.start_job("pretrain.py", args, log_path, {"CONVMAE_SEEN_KEYS_LOG": str(seen_log)})
    try:
        wait_for(lambda: len(checkpointed_steps(bucket, "kill")) >= 2 and read_seen(seen_log)[-1]["step"]
                 > max(checkpointed_steps(bucket, "kill")) + 1, TIMEOUT_S, "a second checkpoint", job, log_path)
        seen = read_seen(seen_log)
        before = {e["attempt"] for e in seen}
        victim = cluster.node_of_rank(seen, rank=1)
        died_at = time.time()
        cluster.kill_node(victim)
        wait_for(lambda: first_finished_step_after(read_seen(seen_log), died_at, before), TIMEOUT_S,
                 "a step after the node's death", job, log_path)
        seen = read_seen(seen_log)
        step, at = first_finished_step_after(seen, died_at, before)
        return {"scenario": "kill", "seconds_to_next_step": round(at - died_at, 1), "next_step": step,
                "steps_redone": len(redone_steps(seen, micro_per_step=6)),
                "workers_after": seen[-1]["world"]}
    finally:
        job.kill()
        job.wait()


def drain_scenario(cluster, endpoint: str, data: tuple[str, str], bucket: str, work: Path,
                   deadline_s: float) -> dict[str, Any]:
    cluster.add_worker_node()  # the spare
    seen_log, log_path = work / "drain-seen.jsonl", work / "drain.log"
    args = job_args(bucket, *data, "http://127.0.0.1:1", "drain", **{
        "mlflow.enabled": False, "train.epochs": 2, "dist.num_workers": 2, "checkpoint.every_steps": 1000})
    job = cluster.start_job("pretrain.py", args, log_path, {"CONVMAE_SEEN_KEYS_LOG": str(seen_log)})
    try:
        wait_for(lambda: len({e["step"] for e in read_seen(seen_log)}) >= 4, TIMEOUT_S, "4 steps", job, log_path)
        seen = read_seen(seen_log)
        before = {e["attempt"] for e in seen}
        drained = cluster.node_of_rank(seen, rank=1)
        drained_at = time.time()
        cluster.drain_node(drained, deadline_s=deadline_s)
        wait_for(lambda: checkpointed_steps(bucket, "drain"), TIMEOUT_S, "the checkpoint", job, log_path)
        saved_at = time.time()
        gone_at = drained_at + deadline_s
        wait_for(lambda: first_finished_step_after(read_seen(seen_log), drained_at, before), TIMEOUT_S,
                 "a step on the spare node", job, log_path)
        cluster.kill_node(drained)
        seen = read_seen(seen_log)
        step, at = first_finished_step_after(seen, drained_at, before)
        return {"scenario": "drain", "deadline_s": deadline_s,
                "seconds_drain_to_checkpoint": round(saved_at - drained_at, 1),
                "seconds_deadline_to_next_step": round(at - gone_at, 1), "next_step": step,
                "steps_redone": len(redone_steps(seen, micro_per_step=2))}
    finally:
        job.kill()
        job.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("kill", "drain", "both"), default="both")
    parser.add_argument("--deadline-s", type=float, default=30.0, help="the drain's deadline, seconds ahead")
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario")
    args = parser.parse_args()

    from service.config import DataConfig
    from service.data import resolve_data_urls

    results = []
    with tempfile.TemporaryDirectory(prefix="node-loss-") as tmp, serving_s3() as endpoint:
        work = Path(tmp)
        resolve_data_urls(DataConfig(embedded_dir=str(work / "embedded")))
        for scenario in (("kill", "drain") if args.scenario == "both" else (args.scenario,)):
            bucket = create_bucket(endpoint, "node-loss")
            data = upload_digits(work / "embedded", bucket)
            with running_multinode_cluster(2) as cluster:
                if scenario == "kill":
                    results.append(kill_scenario(cluster, endpoint, data, bucket, work))
                else:
                    results.append(drain_scenario(cluster, endpoint, data, bucket, work, args.deadline_s))
            print(json.dumps(results[-1]) if args.json else
                  "  ".join(f"{k}={v}" for k, v in results[-1].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
