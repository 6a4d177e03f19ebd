"""Every GPU node the manifests create can host the Ray Train workers the GPU preset asks for.

A worker requests dist.gpus_per_worker GPUs *and* dist.cpus_per_worker CPUs; a node that has the
GPU but too few CPUs never fits one, and the job waits for resources forever without an error.
"""

from __future__ import annotations

import pytest
import yaml

from tests.infra.infra_lib import LAUNCHER_YAML, REPO, k8s_docs, yaml_docs

PRESET = REPO / "jobs" / "configs" / "convmae_base_in1k.yaml"


def _worker_request():
    dist = yaml.safe_load(PRESET.read_text())["dist"]
    return float(dist["cpus_per_worker"]), float(dist.get("gpus_per_worker", 1))


def _cpu(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _k8s_gpu_pods():
    for path, _, doc in k8s_docs():
        spec = doc.get("spec") or {}
        cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")
        if doc["kind"] not in {"RayCluster", "RayJob"} or not cluster:
            continue
        for group in cluster["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            gpus = float(limits.get("nvidia.com/gpu", 0))
            if gpus:
                yield f"{path.name}:{group['groupName']}", _cpu(limits["cpu"]), gpus


@pytest.mark.parametrize("where,cpus,gpus", list(_k8s_gpu_pods()), ids=lambda v: str(v))
def test_kuberay_gpu_pods_fit_their_train_workers(where, cpus, gpus):
    cpus_per_worker, gpus_per_worker = _worker_request()
    workers = gpus / gpus_per_worker
    assert cpus >= workers * cpus_per_worker, (
        f"{where}: {cpus} CPUs for {workers:g} workers x {cpus_per_worker:g} CPUs "
        f"(dist.cpus_per_worker in {PRESET.name})"
    )


def test_launcher_gpu_nodes_fit_their_train_workers():
    cpus_per_worker, gpus_per_worker = _worker_request()
    cfg = yaml_docs(LAUNCHER_YAML)[0]
    gpu_types = {
        name: node["resources"]
        for name, node in cfg["available_node_types"].items()
        if node["resources"].get("GPU")
    }
    assert gpu_types, "GPU node types must declare their resources"
    for name, res in gpu_types.items():
        workers = res["GPU"] / gpus_per_worker
        assert res["CPU"] >= workers * cpus_per_worker, name
