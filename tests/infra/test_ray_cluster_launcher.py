"""infra/ray-cluster/aws.yaml against the Ray cluster-launcher schema of the installed Ray."""

from __future__ import annotations

import copy
import json
import os
import re

import jsonschema
import pytest
import ray
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.infra.infra_lib import LAUNCHER_YAML, load_versions, yaml_docs

V = load_versions()
CFG = yaml_docs(LAUNCHER_YAML)[0]
SCHEMA_PATH = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")


def test_installed_ray_is_the_pinned_one():
    """The schema below is only authoritative for the Ray version the cluster runs."""
    assert ray.__version__ == V["RAY_VERSION"]


def test_matches_ray_schema():
    with open(SCHEMA_PATH) as f:
        jsonschema.validate(CFG, json.load(f))


def test_passes_ray_up_config_validation():
    """What `ray up` runs before touching the cloud: defaults merged, schema and cross-field
    checks (head type exists, worker bounds)."""
    validate_config(prepare_config(copy.deepcopy(CFG)))


def test_schema_is_not_vacuous():
    broken = copy.deepcopy(CFG)
    broken["docker"]["imagee"] = broken["docker"]["image"]  # typo'd key next to the real one
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cpu_head_and_autoscaling_gpu_workers():
    nodes = CFG["available_node_types"]
    head = nodes[CFG["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no training tasks on the head"
    workers = {k: v for k, v in nodes.items() if k != CFG["head_node_type"]}
    assert workers
    for node in workers.values():
        assert node["min_workers"] == 0 < node["max_workers"] <= CFG["max_workers"]
        assert re.match(r"(g|p)\d", node["node_config"]["InstanceType"]), "GPU instance family"


def test_region_is_consistent():
    region = CFG["provider"]["region"]
    assert all(z.startswith(region) for z in CFG["provider"]["availability_zone"].split(","))
    assert f"--env AWS_REGION={region}" in CFG["docker"]["run_options"]


def test_no_setup_commands_and_no_credentials():
    # initialization_commands run on the host (e.g. a registry login) and may be added;
    # setup commands change the container, so nodes would drift from the image.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert CFG[key] == [], f"{key}: the image carries everything; nodes must not drift"
    text = LAUNCHER_YAML.read_text()
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|aws_secret|password", text, re.I)


def test_start_commands_use_the_bootstrap_autoscaling_config():
    head = " ".join(CFG["head_start_ray_commands"])
    assert "--head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "$RAY_HEAD_IP" in " ".join(CFG["worker_start_ray_commands"])
