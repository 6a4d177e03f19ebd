"""Kubernetes manifests: schema-valid (core objects with kubernetes-validate, KubeRay CRDs with
the vendored CRD schema), and the properties the training service relies on."""

from __future__ import annotations

import copy
import re
import shlex

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.infra.infra_lib import (
    README,
    REPO,
    as_core_object,
    containers,
    core_type_stubs,
    crd_schema,
    doc_id,
    k8s_docs,
    load_versions,
    pod_templates,
)

V = load_versions()
K8S_VERSION = V["KUBERNETES_VERSION"]
DOCS = k8s_docs()
IDS = [doc_id(p, i, d) for p, i, d in DOCS]
CORE = [(p, i, d) for p, i, d in DOCS if not d["apiVersion"].startswith("ray.io/")]
CRDS = [(p, i, d) for p, i, d in DOCS if d["apiVersion"].startswith("ray.io/")]


def _by_kind(kind):
    return [d for _, _, d in DOCS if d["kind"] == kind]


def _validate_core(obj):
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_manifest_set_is_complete():
    kinds = sorted(d["kind"] for _, _, d in DOCS)
    for kind in ("Namespace", "ConfigMap", "RayCluster", "RayJob", "Deployment", "Service",
                 "StatefulSet"):  # fmt: skip
        assert kind in kinds, f"no {kind} under infra/k8s"


@pytest.mark.parametrize("path,index,doc", CORE, ids=[doc_id(*c) for c in CORE])
def test_core_objects_validate_against_kubernetes_schema(path, index, doc):
    _validate_core(doc)


@pytest.mark.parametrize("path,index,doc", CRDS, ids=[doc_id(*c) for c in CRDS])
def test_kuberay_objects_validate_against_crd_schema(path, index, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, crd_schema(doc["kind"]))


@pytest.mark.parametrize("path,index,doc", CRDS, ids=[doc_id(*c) for c in CRDS])
def test_core_types_embedded_in_kuberay_objects_validate(path, index, doc):
    """Pod specs, env, resources, ... inside RayCluster/RayJob: the parts the trimmed CRD
    schema stubs out, checked against the real core/v1 schema."""
    stubs = list(core_type_stubs(crd_schema(doc["kind"]), doc))
    assert any(t == "PodSpec" for _, t, _ in stubs)
    for where, core_type, value in stubs:
        try:
            _validate_core(as_core_object(core_type, value))
        except kubernetes_validate.ValidationError as err:
            raise AssertionError(f"{where} ({core_type}): {err}") from err


# --- the validators are not vacuous ----------------------------------------------------------


def _raycluster():
    return copy.deepcopy(_by_kind("RayCluster")[0])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"].update(enableInTreeAutoscalling=True),  # typo'd field
        lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="8"),  # wrong type
        lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"),  # required
        lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"),  # enum
        lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),  # str map
    ],
    ids=["unknown-field", "wrong-type", "missing-required", "bad-enum", "non-string-param"],
)
def test_crd_schema_rejects_broken_raycluster(mutate):
    doc = _raycluster()
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, crd_schema("RayCluster"))


def test_core_validation_rejects_broken_pod_template():
    doc = _raycluster()
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    pod_spec = doc["spec"]["headGroupSpec"]["template"]["spec"]
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_core(as_core_object("PodSpec", pod_spec))


# --- what the training service needs from the cluster ----------------------------------------


def _gpus(container):
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(limits.get("nvidia.com/gpu", 0))


def _cluster_specs():
    for d in _by_kind("RayCluster"):
        yield d["metadata"]["name"], d["spec"]
    for d in _by_kind("RayJob"):
        yield d["metadata"]["name"], d["spec"]["rayClusterSpec"]


@pytest.mark.parametrize(
    "name,spec", list(_cluster_specs()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_cpu_head_and_gpu_workers(name, spec):
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _gpus(head) == 0, f"{name}: the head is a CPU node"
    # No training tasks on the head: it would compete with GCS and the driver for memory.
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    gpu_groups = [
        g for g in spec["workerGroupSpecs"] if _gpus(g["template"]["spec"]["containers"][0])
    ]
    assert gpu_groups, f"{name}: no GPU worker group"
    for group in gpu_groups:
        c = group["template"]["spec"]["containers"][0]
        assert (
            c["resources"]["requests"].get("nvidia.com/gpu")
            == c["resources"]["limits"]["nvidia.com/gpu"]
        )
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def test_raycluster_gpu_group_autoscales():
    spec = _by_kind("RayCluster")[0]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    group = spec["workerGroupSpecs"][0]
    assert group["minReplicas"] == 0 < group["maxReplicas"], "scale to zero when idle"


def _entrypoint_args(rayjob):
    return shlex.split(rayjob["spec"]["entrypoint"])


def test_rayjob_runs_pretrain_with_cluster_flags():
    job = _by_kind("RayJob")[0]
    args = _entrypoint_args(job)
    assert args[:2] == ["python", "/home/ray/app/jobs/pretrain.py"]
    flags = dict(zip(args[2::2], args[3::2], strict=True))
    assert flags["--config"] == "/home/ray/app/jobs/configs/convmae_base_in1k.yaml"
    assert flags["--data.url"].startswith("s3://")
    assert flags["--checkpoint.storage_path"].startswith("s3://")
    assert flags["--dist.use_gpu"] == "true"
    assert flags["--mlflow.tracking_uri"] == "http://mlflow:5000"
    # Ray Train workers = GPUs the job's cluster has.
    spec = job["spec"]["rayClusterSpec"]
    total_gpus = sum(
        g["replicas"] * _gpus(g["template"]["spec"]["containers"][0])
        for g in spec["workerGroupSpecs"]
    )
    assert int(flags["--dist.num_workers"]) == total_gpus
    # The submitter shell must not split the entrypoint into two commands.
    assert not re.search(r"[;&|`$<>]", job["spec"]["entrypoint"])


def test_rayjob_cleans_up_and_carries_no_secrets_in_runtime_env():
    spec = _by_kind("RayJob")[0]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    for key in runtime_env.get("env_vars", {}):
        assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", key), key
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"


# --- security ----------------------------------------------------------------------------------

ALL_TEMPLATES = [
    (doc_id(p, i, d) + ":" + where, t) for p, i, d in DOCS for where, t in pod_templates(d)
]


@pytest.mark.parametrize("where,template", ALL_TEMPLATES, ids=[w for w, _ in ALL_TEMPLATES])
def test_pods_run_non_root_without_privilege_escalation(where, template):
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in containers(template):
        sc = c.get("securityContext") or {}
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
        assert c.get("resources", {}).get("limits"), f"{c['name']}: no resource limits"


SECRETISH = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)


def _env_entries(obj):
    if isinstance(obj, dict):
        if isinstance(obj.get("env"), list):
            yield from obj["env"]
        for v in obj.values():
            yield from _env_entries(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _env_entries(v)


def test_no_secrets_in_manifests():
    assert not _by_kind("Secret"), (
        "Secrets are created with kubectl (infra/README.md), not committed"
    )
    for _, _, doc in DOCS:
        for env in _env_entries(doc):
            if SECRETISH.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), env[
                    "name"
                ]
        if doc["kind"] == "ConfigMap":
            for key in doc["data"]:
                assert not SECRETISH.search(key), f"{key} belongs in a Secret"


def _secret_refs():
    refs: dict[str, set[str]] = {}
    for _, _, doc in DOCS:
        for env in _env_entries(doc):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.setdefault(ref["name"], set()).add(ref["key"])
        for item in _walk(doc):
            if isinstance(item, dict) and "secretRef" in item:
                refs.setdefault(item["secretRef"]["name"], set())
    return refs


def _walk(obj):
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def test_every_referenced_secret_is_documented_with_its_keys():
    readme = README.read_text()
    refs = _secret_refs()
    assert set(refs) == {"convmae-s3", "mlflow-db"}
    for name, keys in refs.items():
        # The whole command, following backslash-continued lines.
        m = re.search(
            rf"kubectl -n convmae create secret generic {name}((?:[^\n]*\\\n)*[^\n]*)", readme
        )
        assert m, f"infra/README.md does not show how to create Secret {name}"
        for key in keys:
            assert f"--from-literal={key}=" in m.group(1), f"Secret {name} key {key} undocumented"


def test_training_config_map_has_the_job_environment():
    cm = next(d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "convmae-env")
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_REGION"} <= cm["data"].keys()
    assert cm["data"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_everything_is_namespaced_in_convmae():
    for _, _, doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "convmae", doc["metadata"]["name"]


def test_services_select_their_pods():
    pods = {}
    for _, _, doc in DOCS:
        for _, t in pod_templates(doc):
            labels = (t.get("metadata") or {}).get("labels") or {}
            pods.setdefault(doc["metadata"]["name"], []).append(labels)
    for svc in _by_kind("Service"):
        selector = svc["spec"]["selector"]
        matched = [
            n for n, ls in pods.items() if any(selector.items() <= lab.items() for lab in ls)
        ]
        assert matched, f"Service {svc['metadata']['name']} selects no pod"


def test_mlflow_server_command_and_backend_store():
    deploy = next(d for d in _by_kind("Deployment") if d["metadata"]["name"] == "mlflow")
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    assert "--serve-artifacts" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith(
        "postgresql://$(MLFLOW_DB_USER):$(MLFLOW_DB_PASSWORD)@"
    )
    # $(VAR) expansion only sees variables defined before the one that uses them.
    names = [e["name"] for e in c["env"]]
    assert names.index("MLFLOW_DB_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")
    cm = next(d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "mlflow-server")
    assert cm["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    # In-cluster clients address the server as mlflow:5000; MLflow rejects unlisted hosts.
    assert "mlflow:*" in cm["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].replace(" ", "").split(",")
    assert (REPO / "docker/mlflow/Dockerfile").exists()
