"""The training jobs as users run them: --help lists every key, a bad config fails with exit
status 2 naming the value before any Ray work starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def run_job(name: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOBS / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


@pytest.mark.parametrize(("job", "expected"), [
    ("pretrain", ["--config", "--print-config", "--model.name", "--train.blr", "--dist.zero_stage",
                  "--checkpoint.storage_path", "--mlflow.tracking_uri", "--data.url"]),
    ("tune", ["--sweep.searcher", "--sweep.space.model.mask_ratio", "--sweep.scheduler", "--sweep.objective",
              "--sweep.max_concurrent_trials", "--sweep.storage_path", "--train.epochs"]),
    ("prepare_data", ["SRC", "DEST", "--shard-size", "--endpoint-url"]),
])
def test_help_lists_the_keys(job, expected, tmp_path):
    out = run_job(job, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for flag in expected:
        assert flag in out.stdout, f"{flag} missing from {job}.py --help"


@pytest.mark.parametrize(("job", "args", "message"), [
    ("pretrain", ["--dist.zero_stage", "4"], "dist.zero_stage=4 is not allowed: one of (0, 1, 2, 3)"),
    ("pretrain", ["--model.name", "convmae_giant"], "model.name='convmae_giant' is not allowed: one of"),
    ("pretrain", ["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    ("pretrain", ["--train.blr", "inf"], "train.blr=inf is not allowed: a finite number"),
    ("pretrain", ["--run_name", ".."], "run_name='..' is not allowed: a single path component"),
    ("tune", ["--sweep.space.train.blr", "loguniform [0, 1e-3]"], "loguniform needs low > 0"),
    ("tune", ["--sweep.space.model.mask_ratio", "grid [0.5, 1.5]"], "value 1.5 is not allowed"),
    ("tune", ["--sweep.searcher", "grid"], "grid needs grid/choice dimensions only"),
    ("tune", ["--sweep.scheduler", "hyperband"], "sweep.scheduler='hyperband' is not allowed: one of asha, fifo"),
    ("tune", ["--sweep.driver_cpus", "0"], "sweep.driver_cpus=0.0 is not allowed: a number >= 0.0001"),
])
def test_bad_config_exits_2_before_ray_starts(job, args, message, tmp_path):
    out = run_job(job, *args, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
    assert message in out.stderr
    assert "Started a local Ray instance" not in out.stderr
    assert not list(tmp_path.iterdir())  # nothing generated, downloaded or written


def test_malformed_yaml_exits_2_naming_the_file_and_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  epochs: 2\n  blr: [1.5e-4\nmodel:\n  name: convmae_tiny\n")
    work = tmp_path / "work"
    work.mkdir()
    out = run_job("pretrain", "--config", str(config), cwd=work)
    assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
    assert out.stderr.strip() == (f"pretrain.py: error: invalid config: config file '{config}' is not valid YAML "
                                  "at line 4, column 6: expected ',' or ']', but got ':' (while parsing a flow sequence)")
    assert not list(work.iterdir())


def test_an_unreachable_checkpoint_storage_path_exits_2_before_starting_ray(digits_dir, tmp_path):
    """The probe's short timeouts are checked in test_launch.py; here: the job exits (run_job's
    timeout only stops a hung job) with one line, before any Ray work."""
    import os
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    out = run_job("pretrain", "--data.url", str(digits_dir / "digits" / "train"), "--data.val_url", "",
                  "--checkpoint.storage_path", "s3://runs-bucket/convmae", "--storage.endpoint_url",
                  f"http://127.0.0.1:{port}", "--mlflow.enabled", "false", cwd=tmp_path, env=env)
    assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(
        "pretrain.py: error: checkpoint.storage_path='s3://runs-bucket/convmae': cannot be reached "
        f"(EndpointConnectionError: Could not connect to the endpoint URL: \"http://127.0.0.1:{port}/runs-bucket/"), errors
    assert "Traceback" not in out.stderr and "Started a local Ray instance" not in out.stderr
    assert not list(tmp_path.iterdir())


def test_print_config_shows_the_resolved_yaml(tmp_path):
    import yaml

    out = run_job("tune", "--config", str(JOBS / "configs" / "sweep_tiny_cpu.yaml"), "--sweep.num_samples", "3",
                  "--print-config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["sweep"]["num_samples"] == 3
    assert resolved["sweep"]["space"]["model.mask_ratio"] == "grid [0.6, 0.75, 0.9]"
    assert resolved["model"]["name"] == "convmae_tiny"


def test_every_config_file_the_docs_and_jobs_name_exists():
    import re

    root = JOBS.parent
    texts = [root / "README.md", root / "infra" / "README.md", *JOBS.glob("*.py")]
    named = {m for path in texts for m in re.findall(r"jobs/configs/[\w.-]+\.yaml", path.read_text())}
    assert named
    missing = sorted(p for p in named if not (root / p).is_file())
    assert not missing, f"named but missing: {missing}"


METRIC = r"(?:train|val|data|system|eval)/[a-z0-9_]+"


def test_the_metric_names_the_readme_gives_are_the_logged_ones():
    import re

    root = JOBS.parent
    readme = set(re.findall(rf"`({METRIC})`", (root / "README.md").read_text()))
    logged = {m for path in (root / "service").rglob("*.py") for m in re.findall(rf'"({METRIC})"', path.read_text())}
    assert readme and not readme - logged, f"README names metrics nothing logs: {sorted(readme - logged)}"
    # and every metric of a training step's log window is in the README
    step = re.findall(rf'"({METRIC})"', (root / "service" / "training" / "loop.py").read_text())
    assert set(step) - readme == set(), f"logged but not in the README: {sorted(set(step) - readme)}"


# What Ray, MLflow and DeepSpeed used to print in every run (service.runtime.logs says why each
# is noise and where it is silenced).
KNOWN_NOISE = ("Reporting training result", "Checkpoint successfully created", "Requesting resources",
               "Started training worker group", "Token authentication is enabled for this Ray cluster",
               "Creating initial MLflow database tables", "Successfully registered model", "Created version '",
               "Setting accelerator to CPU", "built successfully", "Processing zero checkpoint",
               "Reconstructed fp32 state dict", "has no artifacts at artifact path", "Loading checkpoint shards",
               "system metrics monitoring", "Started monitoring system metrics", "Skip logging GPU metrics")


@pytest.mark.e2e
def test_a_pretraining_run_prints_our_lines_and_no_known_noise(digits_dir, tmp_path):
    out = run_job("pretrain", "--data.embedded_dir", str(digits_dir), "--model.img_size", "32",
                  "--train.max_steps", "2", "--train.knn_train_samples", "64", "--data.loader_workers", "0",
                  cwd=tmp_path)  # system metrics on, as by default
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "service.training.loop INFO first step 1 done" in text  # our own lines come through
    assert "registered model: models:/convmae_tiny-32px-digits/1" in out.stdout
    assert [noise for noise in KNOWN_NOISE if noise in text] == []
