"""infra/local/compose.yaml: the developer stack is wired like the clusters and leaks nothing.

No Docker engine here, so this checks structure; `docker compose config` on a developer
machine is the complementary check of the Compose schema itself.
"""

from __future__ import annotations

import re

from tests.infra.infra_lib import COMPOSE_YAML, INFRA, REPO, parse_dockerfile, yaml_docs

COMPOSE = yaml_docs(COMPOSE_YAML)[0]
SERVICES = COMPOSE["services"]
ENV_EXAMPLE = INFRA / "local" / "env.example"


def _env(service):
    env = SERVICES[service].get("environment") or {}
    assert isinstance(env, dict), f"{service}: use the mapping form of environment"
    return env


def test_has_object_store_mlflow_and_ray_head():
    assert {"minio", "mlflow", "postgres", "ray-head"} <= SERVICES.keys()


def test_ports_are_published_on_loopback_only():
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (
                f"{name}: {port} would be reachable from the LAN"
            )


def test_credentials_come_from_the_env_file_only():
    for name in SERVICES:
        for key, value in _env(name).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY_ID|ROOT_USER", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (
                    f"{name}.{key} is literal"
                )
    # Secrets embedded in a URL must be references too.
    uri = _env("mlflow")["MLFLOW_BACKEND_STORE_URI"]
    assert "${POSTGRES_PASSWORD:?" in uri


def test_env_example_defines_every_referenced_variable_and_dot_env_is_ignored():
    referenced = set(re.findall(r"\$\{([A-Z_]+):\?", COMPOSE_YAML.read_text()))
    defined = {
        ln.split("=", 1)[0]
        for ln in ENV_EXAMPLE.read_text().splitlines()
        if ln and not ln.startswith("#")
    }
    assert referenced == defined
    assert ".env" in (INFRA / "local" / ".gitignore").read_text().split()


def test_ray_and_mlflow_see_the_same_store_and_tracking_server():
    head, mlflow = _env("ray-head"), _env("mlflow")
    assert head["AWS_ENDPOINT_URL"] == mlflow["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert head["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://convmae/")
    assert "mlflow:*" in mlflow["MLFLOW_SERVER_ALLOWED_HOSTS"].replace(" ", "").split(",")
    for var in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert var in head, var


def test_dependencies_and_build_targets_exist():
    for name, svc in SERVICES.items():
        for dep in svc.get("depends_on", {}):
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
        build = svc.get("build")
        if build:
            dockerfile = (COMPOSE_YAML.parent / build["context"] / build["dockerfile"]).resolve()
            assert dockerfile.is_relative_to(REPO) and dockerfile.exists(), dockerfile
            if "target" in build:
                stages = {s.name for s in parse_dockerfile(dockerfile).stages}
                assert build["target"] in stages, f"{name}: no stage {build['target']}"


def test_ray_head_runs_head_mode_with_room_for_the_object_store():
    head = SERVICES["ray-head"]
    assert head["command"] == ["head"]
    assert head["shm_size"] and head["init"] is True
    assert "127.0.0.1:8265:8265" in head["ports"]
