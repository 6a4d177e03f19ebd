"""Parsers shared by the infra tests: versions.env, Dockerfiles, YAML manifests, pod templates.

Everything here reads files only; no Docker engine or Kubernetes cluster is involved.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: same API from the tomli backport
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKER = REPO / "docker"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
VERSIONS_ENV = INFRA / "versions.env"

DOCKERFILES = sorted(DOCKER.glob("*/Dockerfile"))
K8S_DIR = INFRA / "k8s"
LAUNCHER_YAML = INFRA / "ray-cluster" / "aws.yaml"
COMPOSE_YAML = INFRA / "local" / "compose.yaml"
RUNTIME_ENV_YAML = INFRA / "runtime_env.yaml"
README = INFRA / "README.md"


# --- versions.env ----------------------------------------------------------------------------


def load_versions() -> dict[str, str]:
    """KEY=VALUE lines; optional double quotes around the value; '#' comment lines."""
    out: dict[str, str] = {}
    for n, raw in enumerate(VERSIONS_ENV.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([A-Z][A-Z0-9_]*)=("([^"]*)"|[^\s"#]*)', line)
        if not m:
            raise ValueError(f"{VERSIONS_ENV}:{n}: not KEY=VALUE: {raw!r}")
        key = m.group(1)
        if key in out:
            raise ValueError(f"{VERSIONS_ENV}:{n}: duplicate key {key}")
        out[key] = m.group(3) if m.group(3) is not None else m.group(2)
    return out


def nodots(version: str) -> str:
    return version.replace(".", "")


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# --- Dockerfiles -----------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str | None]
    stages: list[Stage]

    def args_with_defaults(self) -> list[tuple[str, str, int]]:
        """Every `ARG NAME=default` anywhere in the file, as (name, default, line)."""
        out = []
        for ins in self.instructions():
            if ins.keyword == "ARG" and "=" in ins.args:
                name, default = ins.args.split("=", 1)
                out.append((name.strip(), _unquote(default.strip()), ins.line))
        return out

    def instructions(self) -> Iterator[Instruction]:
        yield from self._preamble
        for stage in self.stages:
            yield from stage.instructions

    _preamble: list[Instruction] = field(default_factory=list)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def parse_dockerfile(path: Path) -> Dockerfile:
    """Minimal Dockerfile parser: joins `\\` continuations, drops comments, splits stages."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are skipped by Docker
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        logical.append((start, buf))
        buf = ""
    preamble: list[Instruction] = []
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line, text in logical:
        keyword, _, args = text.partition(" ")
        ins = Instruction(keyword.upper(), args.strip(), line)
        if ins.keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", ins.args, re.I)
            if not m:
                raise ValueError(f"{path}:{line}: cannot parse FROM {ins.args!r}")
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif stages:
            stages[-1].instructions.append(ins)
        else:
            preamble.append(ins)
            if ins.keyword == "ARG":
                name, eq, default = ins.args.partition("=")
                global_args[name.strip()] = _unquote(default.strip()) if eq else None
    return Dockerfile(path=path, global_args=global_args, stages=stages, _preamble=preamble)


def resolve_base(df: Dockerfile, base: str) -> str:
    """`${ARG}` in a FROM resolved through the global ARG defaults."""

    def sub(m: re.Match[str]) -> str:
        value = df.global_args.get(m.group(1))
        if value is None:
            raise KeyError(f"{df.path}: FROM uses ${{{m.group(1)}}} without a global default")
        return value

    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", sub, base)


# --- YAML manifests --------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_files() -> list[Path]:
    return sorted(K8S_DIR.rglob("*.yaml"))


def k8s_docs() -> list[tuple[Path, int, dict[str, Any]]]:
    return [(p, i, d) for p in k8s_files() for i, d in enumerate(yaml_docs(p))]


def doc_id(path: Path, index: int, doc: dict[str, Any]) -> str:
    return (
        f"{path.relative_to(REPO)}#{index}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    )


def all_yaml_files() -> list[Path]:
    """Every YAML file this work owns (infra/ and the vendored schemas)."""
    return sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml"), *SCHEMAS.glob("*.yaml")])


# --- Pod templates wherever they are embedded ------------------------------------------------


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) for every pod template a core or KubeRay object carries."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    out: list[tuple[str, dict[str, Any]]] = []

    def cluster(prefix: str, cluster_spec: dict[str, Any]) -> None:
        head = cluster_spec.get("headGroupSpec") or {}
        if "template" in head:
            out.append((f"{prefix}headGroupSpec.template", head["template"]))
        for i, group in enumerate(cluster_spec.get("workerGroupSpecs") or []):
            if "template" in group:
                out.append((f"{prefix}workerGroupSpecs[{i}].template", group["template"]))

    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        out.append(("spec.template", spec["template"]))
    elif kind == "RayCluster":
        cluster("spec.", spec)
    elif kind == "RayJob":
        if "rayClusterSpec" in spec:
            cluster("spec.rayClusterSpec.", spec["rayClusterSpec"])
        if "submitterPodTemplate" in spec:
            out.append(("spec.submitterPodTemplate", spec["submitterPodTemplate"]))
    return out


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    pod = template.get("spec") or {}
    return [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]


# --- KubeRay CRD schemas ---------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """Reject unknown fields like `kubectl apply --validate=strict`: every object schema that
    lists properties and does not preserve unknown fields gets additionalProperties: false."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def crd_schema(kind: str) -> dict[str, Any]:
    """The vendored, trimmed openAPIV3Schema of a KubeRay kind (generated from the CRDs of
    KUBERAY_VERSION by tests/infra/kuberay_schemas.py), as a strict JSON schema."""
    cluster = yaml.safe_load((SCHEMAS / "ray.io_rayclusters.v1.trimmed.yaml").read_text())
    cluster = cluster["openAPIV3Schema"]
    if kind == "RayCluster":
        return _strict(cluster)
    if kind == "RayJob":
        job = yaml.safe_load((SCHEMAS / "ray.io_rayjobs.v1.trimmed.yaml").read_text())
        job = copy.deepcopy(job["openAPIV3Schema"])
        assert job["properties"]["spec"]["properties"]["rayClusterSpec"] == {
            "x-convmae-ref": "RayClusterSpec"
        }
        job["properties"]["spec"]["properties"]["rayClusterSpec"] = cluster["properties"]["spec"]
        return _strict(job)
    raise KeyError(kind)


def core_type_stubs(schema: Any, value: Any, where: str = "") -> Iterator[tuple[str, str, Any]]:
    """(where, core type, value) for every value that the trimmed schema stubbed out."""
    if value is None:
        return
    if isinstance(schema, dict) and "x-convmae-core-type" in schema:
        yield where, schema["x-convmae-core-type"], value
        return
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "object" and isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                yield from core_type_stubs(sub, value[key], f"{where}.{key}" if where else key)
    elif schema.get("type") == "array" and isinstance(value, list):
        for i, item in enumerate(value):
            yield from core_type_stubs(schema.get("items") or {}, item, f"{where}[{i}]")


def as_core_object(core_type: str, value: Any) -> dict[str, Any]:
    """Wrap a stubbed value in the smallest core/v1 object kubernetes-validate can check."""
    meta = {"name": "stub"}

    def pod(**container: Any) -> dict[str, Any]:
        c = {"name": "stub", "image": "stub", **container}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [c]}}

    if core_type == "PodSpec":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": value}
    if core_type == "Service":
        return {
            "apiVersion": "v1",
            "kind": "Service",
            **value,
            "metadata": value.get("metadata") or meta,
        }
    if core_type == "EnvVar":
        return pod(env=[value])
    if core_type == "EnvVarSource":
        return pod(env=[{"name": "STUB", "valueFrom": value}])
    if core_type == "EnvFromSource":
        return pod(envFrom=[value])
    if core_type == "VolumeMount":
        return pod(volumeMounts=[value])
    if core_type == "ResourceRequirements":
        return pod(resources=value)
    if core_type == "SecurityContext":
        return pod(securityContext=value)
    raise KeyError(f"no core/v1 wrapper for {core_type}")
