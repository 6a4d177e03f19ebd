"""Bad data as the training jobs meet it: exit status 2 and one line naming it, whether the
driver finds it before any cluster work or a Ray Train worker finds it while training."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.data.prepare import prepare_dataset
from tests.service.data.conftest import image_bytes
from tests.service.data.test_checksums import damage_an_image

JOBS = Path(__file__).resolve().parents[2] / "jobs"
# A tiny CPU run on one worker, validation off: what is left is the training data.
TINY = ["--model.img_size", "32", "--train.epochs", "1", "--train.batch_size_per_worker", "8",
        "--train.eval_before_training", "false", "--data.val_url", "", "--data.loader_workers", "0",
        "--dist.num_workers", "1", "--dist.use_gpu", "false", "--mlflow.system_metrics", "false"]


def pretrain(data: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(JOBS / "pretrain.py"), "--data.url", str(data), *TINY,
         "--checkpoint.storage_path", str(work / "runs"), "--mlflow.tracking_uri", f"sqlite:///{work}/mlruns.db",
         *args],
        capture_output=True, text=True, timeout=300, cwd=work)


def prepared(tmp_path: Path, images: int) -> Path:
    """A one-shard labeled data set of ``images`` small JPEGs."""
    src = tmp_path / "images"
    for i in range(images):
        folder = src / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i}.jpg").write_bytes(image_bytes(i))
    dest = tmp_path / "ds"
    prepare_dataset(str(src), str(dest))
    return dest


def the_one_error_line(out: subprocess.CompletedProcess) -> str:
    """The job's own error line; no traceback anywhere: neither the job's own nor that of the
    worker that found the bad input (Ray forwards its workers' lines, prefixed with the process
    they came from; Ray Train's report of the worker's error is dropped for bad input)."""
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-4000:])
    assert "Traceback" not in out.stderr and "Error in training function" not in out.stderr, out.stderr[-4000:]
    own = [line for line in out.stderr.splitlines() if not re.match(r"\s*(\x1b\[\d+m)?\(\w+ pid=", line)]
    assert not [line for line in own if line.startswith("  File ")], out.stderr[-4000:]
    assert own[-1].startswith("pretrain.py: error: "), out.stderr[-4000:]
    return own[-1]


@pytest.fixture
def work(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def test_a_data_set_smaller_than_one_global_batch_exits_2_before_ray_starts(tmp_path, work):
    data = prepared(tmp_path, images=6)
    out = pretrain(data, work, "--dist.num_workers", "2", "--train.grad_accum_steps", "2")
    line = the_one_error_line(out)
    assert line == (f"pretrain.py: error: data.url={str(data)!r} has 6 samples, fewer than one global batch of "
                    "32 (train.batch_size_per_worker=8 x dist.num_workers=2 x train.grad_accum_steps=2); "
                    "use a larger data set or a smaller batch")
    assert "Started a local Ray instance" not in out.stderr


def test_a_manifest_claiming_1e18_samples_exits_2_before_ray_starts(tmp_path, work):
    data = prepared(tmp_path, images=6)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] = manifest["num_samples"] = 10**18
    (data / "manifest.json").write_text(json.dumps(manifest))
    line = the_one_error_line(pretrain(data, work))
    assert f"shard shard-000000.tar claims {10**18} samples in" in line


@pytest.mark.slow  # about 80 s on a loaded 2-core machine: a local Ray cluster, DeepSpeed, MLflow
def test_a_shard_damaged_after_preparation_exits_2_naming_it_and_the_run_fails(tmp_path, work):
    from mlflow import MlflowClient

    from service.tracking import ERROR_TAG

    data = prepared(tmp_path, images=16)
    damage_an_image(data / "shard-000000.tar")  # same size: only reading it whole finds it, in the worker
    out = pretrain(data, work, "--run_name", "damaged")
    line = the_one_error_line(out)
    assert line.startswith(f"pretrain.py: error: {data}/shard-000000.tar: checksum mismatch: read ")
    assert "WorkerGroupError" not in line and "\n" not in line

    client = MlflowClient(f"sqlite:///{work}/mlruns.db")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert run.data.tags[ERROR_TAG].startswith(f"DataError: {data}/shard-000000.tar: checksum mismatch")
