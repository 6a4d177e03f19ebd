"""infra/README.md ("Run on a cluster") stays true to the files it tells people to use."""

from __future__ import annotations

import re

from tests.infra.infra_lib import README, REPO, k8s_docs, load_versions

TEXT = README.read_text()


def test_is_the_run_on_a_cluster_section():
    assert TEXT.startswith("# Run on a cluster\n")


def test_every_repository_path_it_mentions_exists():
    paths = set(re.findall(r"(?<![\w/.-])((?:infra|docker|tests/infra)/[\w./-]*[\w/])", TEXT))
    assert paths
    created_by_the_reader = {"infra/local/.env"}  # git-ignored copy of env.example
    for path in sorted(paths - created_by_the_reader):
        assert (REPO / path).exists(), f"infra/README.md mentions {path}, which does not exist"


def test_documents_the_job_environment_and_flags():
    for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):  # fmt: skip
        assert f"`{name}`" in TEXT, name
    for flag in ("--data.url", "--checkpoint.storage_path", "--dist.num_workers",
                 "--dist.use_gpu", "--mlflow.tracking_uri"):  # fmt: skip
        assert f"`{flag}`" in TEXT, flag
    for preset in ("jobs/configs/convmae_base_in1k.yaml", "jobs/configs/tiny_cpu.yaml"):
        assert preset in TEXT


def test_commands_use_the_pinned_versions_and_real_names():
    v = load_versions()
    assert f'"ray[default]=={v["RAY_VERSION"]}"' in TEXT
    for key in ("GPU_IMAGE", "CPU_IMAGE", "MLFLOW_IMAGE"):
        assert v[key] in TEXT, key
    names = {d["metadata"]["name"] for _, _, d in k8s_docs()}
    # kubectl targets named in the walkthrough exist in the manifests.
    for kind, name in re.findall(r"(rayjob|raycluster|deploy|svc)[ /]([a-z0-9-]+)", TEXT):
        expected = name.removesuffix("-head-svc") if kind == "svc" else name
        assert expected in names, f"{kind}/{name}"
