"""The vendored KubeRay schemas: generated from the pinned release's CRDs, and saying so."""

from __future__ import annotations

import copy
import os
import re

import jsonschema
import pytest
import yaml

from tests.infra import kuberay_schemas
from tests.infra.infra_lib import SCHEMAS, crd_schema, k8s_docs, load_versions

V = load_versions()
FILES = sorted(SCHEMAS.glob("*.yaml"))


def _header(path):
    fields = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.fullmatch(r"# ([a-z0-9-]+): (\S+)", line)
        if m:
            fields[m.group(1)] = m.group(2)
    return fields


def test_both_kinds_are_vendored():
    assert [p.name for p in FILES] == [
        "ray.io_rayclusters.v1.trimmed.yaml",
        "ray.io_rayjobs.v1.trimmed.yaml",
    ]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_schema_files_carry_their_provenance(path):
    fields = _header(path)
    assert fields.get("kuberay-tag") == f"v{V['KUBERAY_VERSION']}", (
        f"{path.name} was generated from {fields.get('kuberay-tag')}, versions.env pins "
        f"KUBERAY_VERSION={V['KUBERAY_VERSION']}: regenerate with tests/infra/kuberay_schemas.py"
    )
    assert re.fullmatch(r"[0-9a-f]{40}", fields.get("kuberay-commit", ""))
    assert re.fullmatch(r"[0-9a-f]{64}", fields.get("source-sha256", ""))
    crd_file = path.name.replace(".v1.trimmed", "")
    text = path.read_text()
    assert f"# source: github.com/ray-project/kuberay ray-operator/config/crd/bases/{crd_file}\n" in text
    assert "GENERATED" in text.splitlines()[0]


def test_both_files_come_from_one_commit():
    commits = {_header(p)["kuberay-commit"] for p in FILES}
    assert len(commits) == 1, commits


@pytest.mark.skipif(
    not os.environ.get("KUBERAY_GIT_DIR"),
    reason="set KUBERAY_GIT_DIR to a KubeRay clone to check the files against its CRDs",
)
def test_schema_files_are_what_the_generator_writes(tmp_path):
    rc = kuberay_schemas.main([
        "--git-dir", os.environ["KUBERAY_GIT_DIR"], "--ref", f"v{V['KUBERAY_VERSION']}",
        "--out", str(SCHEMAS), "--check",
    ])  # fmt: skip
    assert rc == 0, "the vendored schemas differ from the generator's output"


# --- the 1.7.0 schema, not the stale hand-written one ----------------------------------------


def _doc(kind):
    return copy.deepcopy(next(d for _, _, d in k8s_docs() if d["kind"] == kind))


def _valid(doc):
    try:
        jsonschema.validate(doc, crd_schema(doc["kind"]))
    except jsonschema.ValidationError:
        return False
    return True


def test_rayjob_deletion_policy_is_gone_and_deletion_strategy_is_known():
    job = _doc("RayJob")
    job["spec"]["deletionPolicy"] = "DeleteCluster"
    assert not _valid(job), "KubeRay 1.7.0's RayJob has no spec.deletionPolicy"
    job = _doc("RayJob")
    job["spec"]["deletionStrategy"] = {
        "onSuccess": {"policy": "DeleteCluster"},
        "onFailure": {"policy": "DeleteNone"},
    }
    assert _valid(job)
    job["spec"]["deletionStrategy"]["onSuccess"]["policy"] = "Delete"
    assert not _valid(job), "enum"


def test_ray_start_params_are_optional():
    cluster = _doc("RayCluster")
    cluster["spec"]["headGroupSpec"].pop("rayStartParams")
    for group in cluster["spec"]["workerGroupSpecs"]:
        group.pop("rayStartParams", None)
    assert _valid(cluster)


def test_pod_template_metadata_is_the_crds_restricted_object_meta():
    cluster = _doc("RayCluster")
    meta = cluster["spec"]["workerGroupSpecs"][0]["template"].setdefault("metadata", {})
    meta["annotations"] = {"example.com/a": "b"}
    assert _valid(cluster)
    meta["generateName"] = "x-"  # full ObjectMeta has it; the CRD's template metadata does not
    assert not _valid(cluster)


def test_fields_new_in_1_7_are_known():
    cluster = _doc("RayCluster")
    cluster["spec"]["upgradeStrategy"] = {"type": "Recreate"}
    cluster["spec"]["workerGroupSpecs"][0]["labels"] = {"example.com/pool": "gpu"}
    assert _valid(cluster)
    job = _doc("RayJob")
    job["spec"]["preRunningDeadlineSeconds"] = 600
    assert _valid(job)


# --- the generator ---------------------------------------------------------------------------

_ENV_VAR = {
    "type": "object",
    "description": "EnvVar",
    "properties": {"name": {"type": "string"}, "value": {"type": "string"},
                   "valueFrom": {"type": "object", "properties": {
                       "configMapKeyRef": {"type": "object"}, "fieldRef": {"type": "object"},
                       "secretKeyRef": {"type": "object"}}}},
}  # fmt: skip
_POD_SPEC = {
    "type": "object",
    "properties": {k: {"type": "object"} for k in
                   ("containers", "volumes", "restartPolicy", "nodeSelector")},
}  # fmt: skip


def _crd(kind, spec):
    return {
        "spec": {
            "names": {"kind": kind},
            "versions": [
                {"name": "v1alpha1", "schema": {"openAPIV3Schema": {"type": "object"}}},
                {"name": "v1", "schema": {"openAPIV3Schema": {
                    "type": "object", "description": "top",
                    "properties": {"spec": spec, "status": {"type": "object", "properties": {}}},
                }}},
            ],
        }
    }  # fmt: skip


def _cluster_spec():
    return {
        "type": "object",
        "description": "spec",
        "required": ["headGroupSpec"],
        "properties": {
            "env": {"type": "array", "items": _ENV_VAR},
            "headGroupSpec": {"type": "object", "properties": {"template": {
                "type": "object",
                "properties": {"metadata": {"type": "object", "properties": {
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                    "spec": _POD_SPEC},
            }}},
        },
    }  # fmt: skip


def _generate(job_cluster_spec):
    job_spec = {"type": "object", "properties": {
        "entrypoint": {"type": "string", "description": "cmd"},
        "rayClusterSpec": job_cluster_spec}}  # fmt: skip
    sources = {
        "RayCluster": yaml.safe_dump(_crd("RayCluster", _cluster_spec())).encode(),
        "RayJob": yaml.safe_dump(_crd("RayJob", job_spec)).encode(),
    }
    return kuberay_schemas.generate(sources, tag="v9.9.9", commit="a" * 40)


def test_generator_strips_descriptions_stubs_core_types_and_records_provenance():
    out = _generate(_cluster_spec())
    cluster_text = out["ray.io_rayclusters.v1.trimmed.yaml"]
    assert "description" not in cluster_text
    assert "# kuberay-tag: v9.9.9\n" in cluster_text and f"# kuberay-commit: {'a' * 40}\n" in cluster_text
    schema = yaml.safe_load(cluster_text)["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["headGroupSpec"]
    assert spec["properties"]["env"]["items"]["x-convmae-core-type"] == "EnvVar"
    template = spec["properties"]["headGroupSpec"]["properties"]["template"]
    assert template["properties"]["metadata"]["properties"]["labels"]["type"] == "object"
    assert template["properties"]["spec"]["x-convmae-core-type"] == "PodSpec"
    assert schema["properties"]["status"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    job = yaml.safe_load(out["ray.io_rayjobs.v1.trimmed.yaml"])["openAPIV3Schema"]
    assert job["properties"]["spec"]["properties"]["rayClusterSpec"] == {"x-convmae-ref": "RayClusterSpec"}


def test_generator_refuses_a_rayjob_whose_cluster_spec_differs():
    other = _cluster_spec()
    other["properties"]["extra"] = {"type": "string"}
    with pytest.raises(ValueError, match="rayClusterSpec"):
        _generate(other)
