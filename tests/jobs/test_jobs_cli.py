"""The downstream jobs as users run them: --help, bad input (exit 2, the bad value named),
and evaluate / reconstruct end to end on the embedded digits with a random baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.mlflow_server import env_without_mlflow_uris, register_tiny_model

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def run_job(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOBS / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize("job, expected", [
    ("evaluate", ["--model", "random:PRESET", "--knn_k", "--linear_probe", "--mask_ratio", "--data.val_url"]),
    ("finetune", ["--model", "--train.layer_decay", "--train.mixup", "--train.cutmix", "--train.label_smoothing",
                  "--drop_path", "--dist.num_workers", "--mlflow.registered_model_name"]),
    ("reconstruct", ["--model", "--images", "--out", "--mask_ratio", "--seed", "--data.url", "--inputs"]),
])
def test_help_lists_the_flags(job, expected):
    out = run_job(job, "--help")
    assert out.returncode == 0, out.stderr
    for flag in expected:
        assert flag in out.stdout, f"{flag} missing from {job}.py --help"


@pytest.mark.parametrize("job, args, message", [
    ("evaluate", ["--knn_k", "-1"], "knn_k=-1 is not allowed"),
    ("evaluate", ["--no_such_key", "1"], "unknown config key(s) no_such_key"),
    ("finetune", ["--train.layer_decay", "0"], "train.layer_decay=0.0 is not allowed"),
    ("reconstruct", ["--out", "grid.jpg"], "out='grid.jpg' is not allowed: a path ending in .png"),
    ("reconstruct", ["--model", "/no/such/model.pth"], "'/no/such/model.pth': no such file or folder"),
    ("evaluate", ["--model", "random:convmae_tiny:33"], "img_size 33 is not a multiple"),
    ("finetune", ["--model", "random:convmae_tiny:32", "--num_classes", "5"], "the data set has 10 classes"),
])
def test_bad_input_exits_2_naming_the_value(job, args, message, tmp_path):
    out = run_job(job, *args, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
    assert message in out.stderr


def test_reconstruct_writes_a_png_of_the_right_size(digits_dir, tmp_path):
    from jobs.reconstruct import main

    out = tmp_path / "grid.png"
    assert main(["--model", "random:convmae_tiny:32", "--images", "3", "--out", str(out), "--scale", "2",
                 "--data.embedded_dir", str(digits_dir), "--data.loader_workers", "0"]) == 0
    image = Image.open(out)
    assert image.format == "PNG" and image.mode == "RGB"
    # 3 rows x 4 panels of 32 px with 2 px gaps, doubled.
    assert image.size == ((4 * 32 + 5 * 2) * 2, (3 * 32 + 4 * 2) * 2)
    pixels = np.asarray(image)
    assert pixels.std() > 10  # not a blank canvas
    # Own images instead of the data set: one row each, read through fsspec URLs.
    for i, colour in enumerate(((200, 30, 30), (20, 200, 90))):
        Image.new("RGB", (50, 40), colour).save(tmp_path / f"in{i}.png")
    inputs = ",".join((tmp_path / f"in{i}.png").as_uri() for i in range(2))
    assert main(["--model", "random:convmae_tiny:32", "--inputs", inputs, "--out", str(out), "--scale", "1"]) == 0
    own = np.asarray(Image.open(out))
    assert own.shape == (2 * 32 + 3 * 2, 4 * 32 + 5 * 2, 3)
    assert tuple(own[2 + 16, 2 + 16]) == (200, 30, 30) and tuple(own[2 + 32 + 2 + 16, 2 + 16]) == (20, 200, 90)


def test_evaluate_prints_the_table_and_writes_json(digits_dir, tmp_path, capsys):
    from jobs.evaluate import main

    assert main(["--model", "random:convmae_tiny:32", "--data.embedded_dir", str(digits_dir),
                 "--data.loader_workers", "0", "--output", str(tmp_path / "eval.json")]) == 0
    printed = capsys.readouterr().out
    for row in ("k-NN top-1", "linear probe top-1", "reconstruction loss"):
        assert row in printed
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert f"{saved['metrics']['eval/knn_top1']:.2%}" in printed


@pytest.mark.parametrize("job", ["reconstruct", "evaluate"])
def test_tracking_uri_flag_finds_a_registered_model_without_mlflow_env(job, digits_dir, tmp_path, monkeypatch):
    # models:/ used to be resolved against MLflow's global URI: "Registered Model ... not found"
    # unless MLFLOW_TRACKING_URI was exported, and a stray ./mlflow.db.
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    run_id = register_tiny_model(uri, "convmae-cli", tmp_path, monkeypatch)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = {"reconstruct": ["--images", "2", "--out", str(tmp_path / "grid.png"), "--log_to_run", "true"],
            "evaluate": ["--train_samples", "200", "--linear_probe", "false"]}[job]
    out = subprocess.run([sys.executable, str(JOBS / f"{job}.py"), "--model", "models:/convmae-cli@champion",
                          "--tracking_uri", uri, "--data.embedded_dir", str(digits_dir),
                          "--data.loader_workers", "0", *args],
                         cwd=cwd, env=env_without_mlflow_uris(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Downloading artifacts" not in out.stderr  # MLflow's bar is noise (service.runtime.logs)
    assert list(cwd.iterdir()) == []  # no mlflow.db, no mlruns
    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(run_id)  # results went back onto the model's own run
    if job == "evaluate":
        assert "eval/knn_top1" in run.data.metrics
    else:
        assert [a.path for a in MlflowClient(uri).list_artifacts(run_id, "reconstructions")] == \
            ["reconstructions/grid.png"]
