"""Every GPU node the manifests create can host the Ray Train workers the GPU preset asks for.

A worker requests dist.gpus_per_worker GPUs *and* dist.cpus_per_worker CPUs; a node that has the
GPU but too few CPUs never fits one, and the job waits for resources forever without an error.
"""

from __future__ import annotations

import re
import shlex

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


def _gpu_groups():
    """(where, RayCluster or RayJob, worker group) for every GPU worker group."""
    for path, _, doc in k8s_docs():
        spec = doc.get("spec") or {}
        cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")
        if doc["kind"] not in {"RayCluster", "RayJob"} or not cluster:
            continue
        for group in cluster["workerGroupSpecs"]:
            if group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu"):
                yield f"{path.name}:{group['groupName']}", doc, group



def _k8s_gpu_pods():
    for where, _, group in _gpu_groups():
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        yield where, _cpu(limits["cpu"]), float(limits["nvidia.com/gpu"])


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


# --- whole GPU nodes -------------------------------------------------------------------------

# The 8-GPU HGX/DGX-class nodes (p4d/p5, A100/H100/H200/B200 x 8) the manifests and the launcher
# config are sized for: one Ray worker pod or VM per node, holding all of its GPUs.
GPUS_PER_NODE = 8
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _bytes(quantity) -> float:
    text = str(quantity)
    for suffix, factor in _UNITS.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def _preset():
    return yaml.safe_load(PRESET.read_text())


def _loader_shm_bytes(workers: float) -> float:
    """Batches the preset's data loaders keep in /dev/shm: torch's DataLoader prefetches 2
    batches per loader process; a batch is float32 (B, 3, H, W)."""
    cfg = _preset()
    batch = cfg["train"]["batch_size_per_worker"] * 3 * cfg["model"]["img_size"] ** 2 * 4
    return workers * cfg["data"]["loader_workers"] * 2 * batch


GROUPS = list(_gpu_groups())


@pytest.mark.parametrize("where,doc,group", GROUPS, ids=[g[0] for g in GROUPS])
def test_gpu_worker_pods_take_whole_nodes(where, doc, group):
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    res = container["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == GPUS_PER_NODE, f"{where}: one pod per node"
    assert res["requests"] == res["limits"], f"{where}: Guaranteed QoS, nothing shared"
    # 64Gi of memory per GPU, as the one-GPU pods had.
    assert _bytes(res["limits"]["memory"]) >= GPUS_PER_NODE * 64 * 2**30, where
    # /dev/shm: a memory emptyDir holding the object store and the loaders' batches, inside the
    # pod's memory limit (tmpfs pages count against it).
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    dshm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert dshm["medium"] == "Memory"
    shm = _bytes(dshm["sizeLimit"])
    object_store = float(group["rayStartParams"]["object-store-memory"])
    _, gpus_per_worker = _worker_request()
    needed = object_store + _loader_shm_bytes(GPUS_PER_NODE / gpus_per_worker)
    assert shm >= needed, f"{where}: /dev/shm {shm / 2**30:g} GiB < {needed / 2**30:.1f} GiB"
    assert shm < _bytes(res["limits"]["memory"]) / 4, f"{where}: /dev/shm crowds out the workers"


def _flags(job):
    args = shlex.split(job["spec"]["entrypoint"])
    return dict(zip(args[2::2], args[3::2], strict=True))


def test_rayjob_fills_its_nodes_with_one_worker_per_gpu():
    (job,) = [d for _, d, _ in GROUPS if d["kind"] == "RayJob"]
    flags = _flags(job)
    assert float(flags["--dist.gpus_per_worker"]) == 1
    nodes = sum(g["replicas"] for _, d, g in GROUPS if d is job)
    workers = int(flags["--dist.num_workers"])
    assert workers % GPUS_PER_NODE == 0 and workers == nodes * GPUS_PER_NODE


def test_preset_worker_count_fits_the_autoscaling_cluster():
    workers = _preset()["dist"]["num_workers"]
    assert workers % GPUS_PER_NODE == 0, "the preset's dist.num_workers must fill whole nodes"
    for where, doc, group in GROUPS:
        if doc["kind"] == "RayCluster":
            assert group["maxReplicas"] * GPUS_PER_NODE >= workers, where


def test_launcher_gpu_nodes_are_whole_nodes_with_room_in_shm():
    cfg = yaml_docs(LAUNCHER_YAML)[0]
    (gpu,) = [n for n in cfg["available_node_types"].values() if n["resources"].get("GPU")]
    assert gpu["resources"]["GPU"] == GPUS_PER_NODE
    assert cfg["max_workers"] * GPUS_PER_NODE >= _preset()["dist"]["num_workers"]
    (shm,) = [o.split("=", 1)[1] for o in cfg["docker"]["worker_run_options"] if o.startswith("--shm-size=")]
    start = " ".join(cfg["worker_start_ray_commands"])
    object_store = float(re.search(r"--object-store-memory=(\d+)", start).group(1))
    _, gpus_per_worker = _worker_request()
    needed = object_store + _loader_shm_bytes(GPUS_PER_NODE / gpus_per_worker)
    assert _bytes(shm.upper().replace("G", "Gi")) >= needed
