"""infra/versions.env is the single source of pinned versions: everything else must agree."""

from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.infra.infra_lib import (
    COMPOSE_YAML,
    DOCKERFILES,
    LAUNCHER_YAML,
    REPO,
    k8s_docs,
    load_versions,
    nodots,
    parse_dockerfile,
    pod_templates,
    pyproject,
    yaml_docs,
)

V = load_versions()

# versions.env key -> distribution name in pyproject's dependencies.
PINNED_PACKAGES = {
    "TORCH_VERSION": "torch",
    "RAY_VERSION": "ray",
    "DEEPSPEED_VERSION": "deepspeed",
    "MLFLOW_VERSION": "mlflow",
    "S3FS_VERSION": "s3fs",
}

REQUIRED_KEYS = {
    "PYTHON_VERSION", "CUDA_VERSION", "TORCH_VERSION", "TORCH_CUDA_ARCH_LIST", "RAY_VERSION",
    "DEEPSPEED_VERSION", "MLFLOW_VERSION", "S3FS_VERSION", "KUBERAY_VERSION",
    "KUBERNETES_VERSION", "RAY_GPU_BASE_IMAGE", "PYTHON_BASE_IMAGE", "POSTGRES_IMAGE",
    "MINIO_IMAGE", "CONVMAE_VERSION", "IMAGE_REGISTRY", "GPU_IMAGE", "CPU_IMAGE",
    "CPU_DEV_IMAGE", "MLFLOW_IMAGE", "DEV_TOOL_PINS", "BLACKWELL_CUDA_VERSION",
    "BLACKWELL_TORCH_CUDA_ARCH_LIST", "BLACKWELL_RAY_GPU_BASE_IMAGE", "GPU_BLACKWELL_IMAGE",
}  # fmt: skip


def _requirements(section: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in section]
    return {r.name.lower(): r for r in reqs}


def test_versions_env_has_every_key():
    assert REQUIRED_KEYS <= V.keys(), f"missing in infra/versions.env: {REQUIRED_KEYS - V.keys()}"


def test_every_value_is_an_exact_pin():
    for key, value in V.items():
        assert value, f"{key} is empty"
        assert "latest" not in value.split(":")[-1], f"{key}={value} is not pinned"
        if key.endswith("_VERSION"):
            Version(value)  # raises on anything that is not a plain version
        if key.endswith("_IMAGE"):
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", value), f"{key}={value} needs an explicit tag"


@pytest.mark.parametrize("key", sorted(PINNED_PACKAGES))
def test_pins_satisfy_pyproject_lower_bounds(key):
    deps = _requirements(pyproject()["project"]["dependencies"])
    name = PINNED_PACKAGES[key]
    assert name in deps, f"pyproject.toml no longer depends on {name}; drop {key} or re-add it"
    assert deps[name].specifier.contains(V[key], prereleases=True), (
        f"{key}={V[key]} does not satisfy pyproject's `{deps[name]}`"
    )


def test_dev_tool_pins_satisfy_pyproject_dev_extra():
    dev = _requirements(pyproject()["project"]["optional-dependencies"]["dev"])
    pins = dict(p.split("==", 1) for p in V["DEV_TOOL_PINS"].split())
    assert set(pins) == set(dev), "DEV_TOOL_PINS must pin exactly pyproject's [dev] extra"
    for name, version in pins.items():
        assert dev[name].specifier.contains(version, prereleases=True), (
            f"DEV_TOOL_PINS {name}=={version} does not satisfy pyproject's `{dev[name]}`"
        )


def test_python_version_satisfies_requires_python():
    requires = pyproject()["project"]["requires-python"]
    assert Requirement(f"python{requires}").specifier.contains(V["PYTHON_VERSION"] + ".0")


def test_derived_values_agree():
    assert V["CONVMAE_VERSION"] == pyproject()["project"]["version"]
    py, cuda, ray = nodots(V["PYTHON_VERSION"]), nodots(V["CUDA_VERSION"]), V["RAY_VERSION"]
    assert V["RAY_GPU_BASE_IMAGE"] == f"rayproject/ray:{ray}-py{py}-cu{cuda}"
    assert V["PYTHON_BASE_IMAGE"].startswith(f"python:{V['PYTHON_VERSION']}.")
    registry, version = V["IMAGE_REGISTRY"], V["CONVMAE_VERSION"]
    assert V["GPU_IMAGE"] == f"{registry}/convmae:{version}-cu{cuda}"
    assert V["CPU_IMAGE"] == f"{registry}/convmae:{version}-cpu"
    assert V["CPU_DEV_IMAGE"] == f"{registry}/convmae:{version}-cpu-dev"
    assert V["MLFLOW_IMAGE"] == f"{registry}/mlflow-server:{V['MLFLOW_VERSION']}"
    # CUDA 12.x is the contract of the GPU image (PyTorch 2.13's only 12.x build is cu126).
    assert V["CUDA_VERSION"].startswith("12.")
    # The Blackwell image: its own CUDA in its base image and tag, Ray and Python as the rest.
    bw_cuda = nodots(V["BLACKWELL_CUDA_VERSION"])
    assert V["BLACKWELL_RAY_GPU_BASE_IMAGE"] == f"rayproject/ray:{ray}-py{py}-cu{bw_cuda}"
    assert V["GPU_BLACKWELL_IMAGE"] == f"{registry}/convmae:{version}-cu{bw_cuda}"
    assert V["GPU_BLACKWELL_IMAGE"] != V["GPU_IMAGE"]
    # sm_100 and sm_120 need CUDA 12.8 or newer.
    assert Version(V["BLACKWELL_CUDA_VERSION"]) >= Version("12.8")


def _archs(key):
    tokens = V[key].split()
    for t in tokens:
        # DeepSpeed 0.19.8 parses X.Y and X.Y+PTX only (not 9.0a / 10.0a).
        assert re.fullmatch(r"\d+\.\d(\+PTX)?", t), f"{key}: {t!r}"
    return tokens


def test_gpu_arch_lists():
    default = _archs("TORCH_CUDA_ARCH_LIST")
    assert "9.0" in default  # H100/H200
    blackwell = _archs("BLACKWELL_TORCH_CUDA_ARCH_LIST")
    numbers = [Version(t.removesuffix("+PTX")) for t in blackwell]
    assert numbers == sorted(numbers)
    assert {"10.0", "9.0", "8.0"} <= {t.removesuffix("+PTX") for t in blackwell}
    assert any(t.startswith("12.0") for t in blackwell), "RTX PRO 6000 / RTX 50 (sm_120)"
    assert blackwell[-1].endswith("+PTX"), "PTX of the newest arch, for GPUs newer than the list"
    if Version(V["BLACKWELL_CUDA_VERSION"]) >= Version("13"):
        assert min(numbers) >= Version("7.5"), "CUDA 13 no longer compiles for Volta and older"


def test_image_variant_keys_replace_gpu_dockerfile_args():
    """docker/build.sh passes BLACKWELL_<KEY> as <KEY>: each must name an ARG it replaces."""
    args = {n for n, _, _ in parse_dockerfile(REPO / "docker/gpu/Dockerfile").args_with_defaults()}
    overrides = {k.removeprefix("BLACKWELL_") for k in V if k.startswith("BLACKWELL_")}
    assert overrides == {"CUDA_VERSION", "TORCH_CUDA_ARCH_LIST", "RAY_GPU_BASE_IMAGE"}
    assert overrides <= args


def test_install_script_torch_default_matches():
    """scripts/install.sh installs torch on dev machines and CI; its default must not drift."""
    script = (REPO / "scripts" / "install.sh").read_text()
    m = re.search(r'TORCH_VERSION="\$\{TORCH_VERSION:-([^}]+)\}"', script)
    assert m, "scripts/install.sh no longer has a TORCH_VERSION default"
    assert m.group(1) == V["TORCH_VERSION"]


def test_install_script_torchvision_default_matches():
    """GPU machines get torchvision for the GPU decode path; the pairing with torch is pinned once."""
    script = (REPO / "scripts" / "install.sh").read_text()
    m = re.search(r'TORCHVISION_VERSION="\$\{TORCHVISION_VERSION:-([^}]+)\}"', script)
    assert m, "scripts/install.sh no longer has a TORCHVISION_VERSION default"
    assert m.group(1) == V["TORCHVISION_VERSION"]
    assert "--no-deps" in script  # never replaces the torch build installed before it


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_arg_defaults_equal_versions_env(dockerfile):
    df = parse_dockerfile(dockerfile)
    args = df.args_with_defaults()
    assert args, "a Dockerfile without pinned ARGs cannot be checked"
    for name, default, line in args:
        if name in V:
            assert default == V[name], (
                f"{dockerfile.name}:{line}: ARG {name}={default}, versions.env has {V[name]}"
            )
        else:
            # A version pinned only in a Dockerfile is a second source of truth.
            assert not name.endswith(("_VERSION", "_IMAGE")), (
                f"{dockerfile.name}:{line}: ARG {name} is not in infra/versions.env"
            )


def test_gpu_dockerfile_pins_the_whole_stack():
    names = {n for n, _, _ in parse_dockerfile(REPO / "docker/gpu/Dockerfile").args_with_defaults()}
    assert {
        "RAY_GPU_BASE_IMAGE", "CUDA_VERSION", "TORCH_VERSION", "TORCH_CUDA_ARCH_LIST",
        "RAY_VERSION", "DEEPSPEED_VERSION", "MLFLOW_VERSION", "S3FS_VERSION", "TORCHVISION_VERSION",
    } <= names  # fmt: skip


def test_cpu_dockerfile_pins_the_whole_stack():
    names = {n for n, _, _ in parse_dockerfile(REPO / "docker/cpu/Dockerfile").args_with_defaults()}
    assert {
        "PYTHON_BASE_IMAGE", "TORCH_VERSION", "RAY_VERSION", "DEEPSPEED_VERSION",
        "MLFLOW_VERSION", "S3FS_VERSION", "DEV_TOOL_PINS",
    } <= names  # fmt: skip


def _k8s_images_and_ray_versions():
    images, ray_versions = [], []
    for path, _, doc in k8s_docs():
        for where, template in pod_templates(doc):
            for c in (template.get("spec") or {}).get("containers", []):
                images.append((f"{path.name}:{where}", c["image"]))
        spec = doc.get("spec") or {}
        if doc.get("kind") == "RayCluster":
            ray_versions.append((path.name, spec.get("rayVersion")))
        if doc.get("kind") == "RayJob":
            ray_versions.append((path.name, spec.get("rayClusterSpec", {}).get("rayVersion")))
    return images, ray_versions


GPU_IMAGES = {V["GPU_IMAGE"], V["GPU_BLACKWELL_IMAGE"]}


def test_k8s_images_are_pinned_versions_env_images():
    images, _ = _k8s_images_and_ray_versions()
    allowed = GPU_IMAGES | {V["MLFLOW_IMAGE"], V["POSTGRES_IMAGE"]}
    assert images
    for where, image in images:
        assert image in allowed, f"{where}: image {image} is not one of versions.env's images"


def test_kuberay_uses_gpu_image_and_ray_version():
    """One of the two GPU images (GPU_IMAGE as committed; GPU_BLACKWELL_IMAGE for Blackwell
    nodes), the same for every Ray pod of a manifest."""
    images, ray_versions = _k8s_images_and_ray_versions()
    ray_images = [(w, i) for w, i in images if "GroupSpec" in w or "submitter" in w]
    assert ray_images
    by_file: dict[str, set[str]] = {}
    for where, image in ray_images:
        by_file.setdefault(where.split(":")[0], set()).add(image)
    for name, found in by_file.items():
        assert len(found) == 1 and found <= GPU_IMAGES, f"{name}: {found}"
    assert ray_versions and all(v == V["RAY_VERSION"] for _, v in ray_versions), ray_versions


def test_launcher_yaml_uses_gpu_image():
    cfg = yaml_docs(LAUNCHER_YAML)[0]
    image = cfg["docker"]["image"]
    assert image in GPU_IMAGES
    for key in ("head_image", "worker_image"):
        assert cfg["docker"].get(key, image) == image


def test_compose_images_equal_versions_env():
    services = yaml_docs(COMPOSE_YAML)[0]["services"]
    expected = {
        "minio": V["MINIO_IMAGE"],
        "create-bucket": V["CPU_IMAGE"],
        "postgres": V["POSTGRES_IMAGE"],
        "mlflow": V["MLFLOW_IMAGE"],
        "ray-head": V["CPU_IMAGE"],
        "ray-worker": V["CPU_IMAGE"],
    }
    assert {name: svc.get("image") for name, svc in services.items()} == expected


def test_readme_names_the_pinned_kuberay_release():
    text = (REPO / "infra" / "README.md").read_text()
    assert f"--version {V['KUBERAY_VERSION']}" in text
