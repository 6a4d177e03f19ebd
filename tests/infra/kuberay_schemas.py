"""Regenerates tests/infra/schemas/ray.io_{rayclusters,rayjobs}.v1.trimmed.yaml from KubeRay's CRDs.

    python3 -m tests.infra.kuberay_schemas --git-dir PATH/TO/kuberay.git --ref v1.7.0
    python3 -m tests.infra.kuberay_schemas --crd-dir DIR --tag v1.7.0 --commit SHA

The first form reads the CRDs of a tag from a KubeRay clone (`git show REF:ray-operator/config/
crd/bases/ray.io_*.yaml`); the second reads ray.io_rayclusters.yaml and ray.io_rayjobs.yaml from
DIR (e.g. downloaded from GitHub at that tag) and records the tag and commit you name.

What is kept and what is changed, so that the result stays small enough to read and review:

* the `v1` version's openAPIV3Schema, every field with its type, format, default, enum,
  required list and CEL rules (`x-kubernetes-validations`, documentation for us: jsonschema
  does not evaluate them); `description`s are dropped;
* every embedded Kubernetes core type (recognised by its field names, table `CORE_TYPES`) is
  replaced by `{type: object, x-kubernetes-preserve-unknown-fields: true,
  x-convmae-core-type: KIND}`, and tests/infra/test_k8s_manifests.py validates those values
  with kubernetes-validate against the real core/v1 schema. A pod template keeps the CRD's own
  (restricted) metadata schema; only its `spec` becomes a PodSpec stub;
* RayJob's `rayClusterSpec`, a copy of RayCluster's `spec`, becomes `{x-convmae-ref:
  RayClusterSpec}` (checked to be an exact copy first); `status` is not checked.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

SCHEMAS = Path(__file__).resolve().parent / "schemas"
CRD_PATH = "ray-operator/config/crd/bases/ray.io_{plural}.yaml"
KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}
STUB = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}

# Core type -> field names that identify it (all must be present; `a.b` is field b of field a).
# Checked top-down, first match wins, so an EnvVar is stubbed whole before its valueFrom (an
# EnvVarSource) is seen.
CORE_TYPES: list[tuple[str, frozenset[str]]] = [
    ("PodSpec", frozenset({"containers", "volumes", "restartPolicy", "nodeSelector"})),
    ("Service", frozenset({"apiVersion", "kind", "metadata", "spec.clusterIP", "spec.ports"})),
    ("SecurityContext", frozenset({"allowPrivilegeEscalation", "capabilities", "runAsUser"})),
    ("ResourceRequirements", frozenset({"claims", "limits", "requests"})),
    ("VolumeMount", frozenset({"mountPath", "name", "subPath", "readOnly"})),
    ("EnvVar", frozenset({"name", "value", "valueFrom"})),
    ("EnvFromSource", frozenset({"configMapRef", "secretRef", "prefix"})),
    ("EnvVarSource", frozenset({"configMapKeyRef", "fieldRef", "secretKeyRef"})),
]


def _has(schema: dict[str, Any], field: str) -> bool:
    for name in field.split("."):
        schema = (schema.get("properties") or {}).get(name)
        if not isinstance(schema, dict):
            return False
    return True


def core_type(schema: dict[str, Any]) -> str | None:
    for kind, fields in CORE_TYPES:
        if all(_has(schema, f) for f in fields):
            return kind
    return None


def trim(schema: Any) -> Any:
    """`description`s dropped, embedded core types stubbed (see the module docstring)."""
    if isinstance(schema, list):
        return [trim(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    kind = core_type(schema) if schema.get("type") == "object" else None
    if kind is not None:
        return {**STUB, "x-convmae-core-type": kind}
    return {k: trim(v) for k, v in schema.items() if k != "description"}


def v1_schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def trimmed(kind: str, crd: dict[str, Any], cluster_crd: dict[str, Any] | None = None) -> dict:
    schema = v1_schema(crd)
    if crd["spec"]["names"]["kind"] != kind:
        raise ValueError(f"expected the {kind} CRD, got {crd['spec']['names']['kind']}")
    out = trim(schema)
    out["properties"]["status"] = dict(STUB)
    if kind == "RayJob":
        inner = schema["properties"]["spec"]["properties"]["rayClusterSpec"]
        if cluster_crd is None or inner != v1_schema(cluster_crd)["properties"]["spec"]:
            raise ValueError("RayJob's rayClusterSpec is not a copy of RayCluster's spec")
        out["properties"]["spec"]["properties"]["rayClusterSpec"] = {
            "x-convmae-ref": "RayClusterSpec"
        }
    return out


class _Dumper(yaml.SafeDumper):
    """Block style with indented sequences (yamllint's default), small leaves in flow style."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    leaf = all(not isinstance(v, dict | list) or v == [] for v in data.values())
    flow = leaf and len(str(data)) <= 90
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(v, str | int | float) for v in data) and len(str(data)) <= 90
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(dict, _represent_dict)
_Dumper.add_representer(list, _represent_list)


def render(kind: str, schema: dict, *, tag: str, commit: str, source_sha256: str) -> str:
    path = CRD_PATH.format(plural=KINDS[kind])
    header = f"""\
# openAPIV3Schema of KubeRay's {kind} CRD, version ray.io/v1, trimmed. GENERATED: do not edit;
# regenerate with tests/infra/kuberay_schemas.py (how, and what is trimmed: its docstring).
#
# kuberay-tag: {tag}
# kuberay-commit: {commit}
# source: github.com/ray-project/kuberay {path}
# source-sha256: {source_sha256}
#
# Descriptions dropped; embedded Kubernetes core types are stubs (x-convmae-core-type) that
# tests/infra/test_k8s_manifests.py checks with kubernetes-validate instead.
"""
    body = yaml.dump({"openAPIV3Schema": schema}, Dumper=_Dumper, sort_keys=False, width=120)
    return header + body


def generate(sources: dict[str, bytes], *, tag: str, commit: str) -> dict[str, str]:
    """{file name: text} for both kinds from {kind: CRD file bytes}."""
    crds = {kind: yaml.safe_load(data) for kind, data in sources.items()}
    out = {}
    for kind, plural in KINDS.items():
        schema = trimmed(kind, crds[kind], crds["RayCluster"])
        digest = hashlib.sha256(sources[kind]).hexdigest()
        out[f"ray.io_{plural}.v1.trimmed.yaml"] = render(
            kind, schema, tag=tag, commit=commit, source_sha256=digest
        )
    return out


def _git(git_dir: str, *args: str) -> bytes:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True).stdout


def read_sources(args: argparse.Namespace) -> tuple[dict[str, bytes], str, str]:
    if args.git_dir:
        commit = _git(args.git_dir, "rev-parse", f"{args.ref}^{{commit}}").decode().strip()
        sources = {
            kind: _git(args.git_dir, "show", f"{commit}:{CRD_PATH.format(plural=plural)}")
            for kind, plural in KINDS.items()
        }
        return sources, args.ref, commit
    if not (args.tag and args.commit):
        raise SystemExit("--crd-dir needs --tag and --commit (where the files came from)")
    crd_dir = Path(args.crd_dir)
    sources = {kind: (crd_dir / f"ray.io_{plural}.yaml").read_bytes() for kind, plural in KINDS.items()}
    return sources, args.tag, args.commit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--git-dir", help="a KubeRay clone (bare or its .git)")
    src.add_argument("--crd-dir", help="folder with ray.io_rayclusters.yaml and ray.io_rayjobs.yaml")
    parser.add_argument("--ref", default="v1.7.0", help="with --git-dir: tag or commit")
    parser.add_argument("--tag", help="with --crd-dir: the tag the files came from")
    parser.add_argument("--commit", help="with --crd-dir: the commit the files came from")
    parser.add_argument("--out", default=str(SCHEMAS), help="where to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)
    sources, tag, commit = read_sources(args)
    stale = []
    for name, text in generate(sources, tag=tag, commit=commit).items():
        path = Path(args.out) / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date against {tag} ({commit}): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
