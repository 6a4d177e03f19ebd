"""End to end on the real stack: a local Ray cluster with 2 CPU workers running DeepSpeed ZeRO
over gloo, data and checkpoints on a loopback S3 server, a real MLflow tracking server."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient
from ray.train import UserCallback

from service.config import PretrainConfig, with_overrides
from service.tracking import ERROR_TAG
from service.tracking.provenance import provenance
from service.training.pretrain import run_pretraining

pytestmark = pytest.mark.e2e


def tiny_config(tmp_path, digits_dir, **overrides) -> PretrainConfig:
    base = {
        "run_name": "tiny",
        "model.name": "convmae_tiny",
        "model.img_size": 32,
        "data.embedded_dir": str(digits_dir),
        "data.loader_workers": 0,
        "train.epochs": 1,
        "train.batch_size_per_worker": 16,
        "train.blr": 1.5e-3,
        "train.warmup_epochs": 0.1,
        "train.log_every_steps": 1,
        "train.knn_train_samples": 256,
        "dist.num_workers": 2,
        "dist.use_gpu": False,
        "checkpoint.storage_path": str(tmp_path / "runs"),
        "checkpoint.every_steps": 4,
        "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlruns.db",
        "mlflow.system_metrics": False,
    }
    base.update(overrides)
    return with_overrides(PretrainConfig(), base).validate()


def loss_by_step(tracking_uri: str, run_id: str) -> dict[int, float]:
    """The train/loss of each step; a step redone after a failure or resume has one point only."""
    history = MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"steps logged twice: {sorted(s for s in set(steps) if steps.count(s) > 1)}"
    return {m.step: m.value for m in history}


def test_s3_data_and_checkpoints_survive_a_worker_failure_and_register_the_model(
    ray_cluster, s3_bucket, mlflow_server, digits_dir, tmp_path, monkeypatch
):
    import fsspec

    fs = fsspec.filesystem("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for split in ("train", "val"):
        fs.put(str(digits_dir / "digits" / split), f"{bucket}/digits/{split}", recursive=True)
    marker = tmp_path / "fault-injected"
    monkeypatch.setenv("CONVMAE_FAULT_INJECT_STEP", "6")
    monkeypatch.setenv("CONVMAE_FAULT_INJECT_MARKER", str(marker))

    cfg = tiny_config(
        tmp_path, digits_dir,
        **{"run_name": "s3-run", "data.url": f"{s3_bucket}/digits/train", "data.val_url": f"{s3_bucket}/digits/val",
           "train.max_steps": 10, "checkpoint.storage_path": f"{s3_bucket}/runs", "checkpoint.keep_last": 2,
           "dist.max_failures": 1, "mlflow.tracking_uri": mlflow_server, "mlflow.registered_model_name": "e2e-tiny",
           "train.profile_steps": 2},
    )
    result = run_pretraining(cfg)

    assert marker.exists(), "the injected worker failure did not happen"
    # The local cluster is this machine: Ray Train's node-preemption watcher is not started.
    from ray.util.state import list_actors

    # This session's cluster, by its address: other Ray clusters may run on the machine.
    address = ray_cluster.get_runtime_context().gcs_address
    assert not list_actors(address=address, filters=[("class_name", "=", "PreemptionWatcher")])
    assert result.metrics["step"] == 10
    assert 0.0 <= result.metrics["val/knn_top1"] <= 1.0 and result.metrics["val/recon_loss"] > 0
    checkpoints = [p for p in fs.ls(f"{bucket}/runs/s3-run") if p.rsplit("/", 1)[-1].startswith("checkpoint_20")]
    # Steps 4, 8 and 10 were saved: keep_last=2 leaves the last two, the final one among them.
    assert len(checkpoints) == 2, checkpoints
    assert result.checkpoint_path.startswith(f"{bucket}/runs/s3-run/checkpoint_")
    assert result.checkpoint_path.rstrip("/") in {p.rstrip("/") for p in checkpoints}

    # Steps 5 and 6 ran twice (the failure came after the step-4 checkpoint): nothing later was
    # lost, and the redone steps were not logged twice.
    losses = loss_by_step(mlflow_server, result.mlflow_run_id)
    assert sorted(losses) == list(range(1, 11))

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["dist.zero_stage"] == "2" and run.data.params["model.name"] == "convmae_tiny"
    assert run.info.status == "FINISHED"
    code = provenance()  # this checkout's provenance, on the run and on the model version
    assert {k: run.data.tags[k] for k in code} == code
    assert "deepspeed_config.json" in [a.path for a in client.list_artifacts(result.mlflow_run_id)]
    # Per log window: where step time goes, and the gradient norm (logged without clipping too).
    assert 0.0 <= run.data.metrics["train/data_wait_frac"] <= 1.0
    grad_norms = MlflowClient(mlflow_server).get_metric_history(result.mlflow_run_id, "train/grad_norm")
    assert {m.step for m in grad_norms} == set(range(1, 11)) and all(m.value > 0 for m in grad_norms)
    # The restarted worker's session logs its own first step: after the failure, so later.
    first_steps = MlflowClient(mlflow_server).get_metric_history(result.mlflow_run_id, "system/time_to_first_step_s")
    assert [m.step for m in first_steps] == [1, 5] and 0 < first_steps[0].value < first_steps[1].value
    assert run.data.metrics["train/tflops"] > 0 and "train/mfu" not in run.data.metrics  # no peak on CPU
    assert [a.path for a in client.list_artifacts(result.mlflow_run_id, "profile")] == ["profile/trace.json"]
    version = client.get_model_version("e2e-tiny", "1")
    assert version.tags["data"] == cfg.data.url and version.tags["preset"] == "convmae_tiny"
    assert version.tags["git_commit"] == code["git_commit"] and version.tags["git_dirty"] == code["git_dirty"]

    from service.runtime.engine import consolidated_state_dict
    from service.tracking.registry import load_model

    model = load_model(result.registered_uri, tracking_uri=mlflow_server)
    assert model.config.img_size == 32
    fs.get(result.checkpoint_path, str(tmp_path / "final"), recursive=True)
    expected = consolidated_state_dict(tmp_path / "final")
    loaded = model.state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


def test_resumed_run_reproduces_the_uninterrupted_loss_curve(ray_cluster, digits_dir, tmp_path, monkeypatch):
    steps = 8
    straight = run_pretraining(tiny_config(tmp_path, digits_dir, **{"run_name": "straight", "train.max_steps": steps}))

    # Interrupt the second run after step 5 (its last checkpoint is step 4), then run it again.
    monkeypatch.setenv("CONVMAE_FAULT_INJECT_STEP", "5")
    monkeypatch.setenv("CONVMAE_FAULT_INJECT_MARKER", str(tmp_path / "interrupted"))
    interrupted = tiny_config(tmp_path, digits_dir, **{"run_name": "interrupted", "train.max_steps": steps})
    with pytest.raises(Exception):  # noqa: B017 - Ray's TrainingFailedError, whatever its module
        run_pretraining(interrupted)
    assert (tmp_path / "interrupted").exists()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    [failed] = client.search_runs([client.get_experiment_by_name(interrupted.mlflow.experiment).experiment_id],
                                  filter_string="tags.`convmae.run_name` = 'interrupted'")
    assert failed.info.status == "FAILED"  # not RUNNING forever
    assert "Error" in failed.data.tags[ERROR_TAG]
    resumed = run_pretraining(interrupted)

    assert resumed.mlflow_run_id == failed.info.run_id  # the run continued, and finished
    assert client.get_run(resumed.mlflow_run_id).info.status == "FINISHED"
    a = loss_by_step(straight.tracking_uri, straight.mlflow_run_id)
    b = loss_by_step(resumed.tracking_uri, resumed.mlflow_run_id)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), f"loss differs at step {step}"
    # The random start is scored at the first validation (step 8 here), from the starting
    # weights rebuilt: the interrupted run stopped before it, so the resumed run scored it.
    val_a, val_b = ({m.step: m.value for m in client.get_metric_history(r.mlflow_run_id, "val/recon_loss")}
                    for r in (straight, resumed))
    assert sorted(val_a) == sorted(val_b) == [0, steps]
    assert val_b[0] == pytest.approx(val_a[0], rel=1e-6) and val_a[0] != pytest.approx(val_a[steps], rel=1e-3)
    # So is its reconstruction grid, beside the trained model's.
    grids = [a.path for a in client.list_artifacts(straight.mlflow_run_id, "reconstructions")]
    assert grids == ["reconstructions/step_0000000.png", f"reconstructions/step_{steps:07d}.png"]


# ZeRO-2 runs in every other test here; 3 partitions the weights too. All stages are also
# covered in one process by the default run (DeepSpeed's save and resume per stage in
# tests/service/runtime/test_safe_checkpoint.py, steps and grad norms per stage in
# test_engine_grad_norm.py); these whole runs are slow, to keep the default run < 15 min.
@pytest.mark.parametrize("stage", [pytest.param(s, marks=pytest.mark.slow) for s in (0, 1, 3)])
def test_zero_stage_smoke(ray_cluster, digits_dir, tmp_path, stage):
    cfg = tiny_config(tmp_path, digits_dir, **{"run_name": f"zero{stage}", "dist.zero_stage": stage,
                                               "train.max_steps": 3, "train.knn_k": 0})
    result = run_pretraining(cfg)
    assert result.metrics["step"] == 3
    from service.tracking.registry import load_model

    model = load_model(result.registered_uri, tracking_uri=result.tracking_uri)
    images = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(images, mask_ratio=0.75)
    assert torch.isfinite(loss) and pred.shape == (2, 4, 16 * 16 * 3)


class RecordReports(UserCallback):
    """A Ray Train callback (it runs in the controller) appending every report to a file."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        import json

        with open(self.path, "a") as f:
            f.write(json.dumps({"metrics": metrics[0], "checkpoint": checkpoint is not None}) + "\n")


def test_a_resumed_run_first_repeats_its_last_epoch_report(ray_cluster, digits_dir, tmp_path):
    """So that Tune's scheduler sees every epoch of a trial even if a sweep was cut off right
    after an epoch-end report: the resumed run says it again, without a checkpoint."""
    import json

    first = tiny_config(tmp_path, digits_dir, **{"run_name": "again", "dist.num_workers": 1,
                                                 "checkpoint.every_steps": 1000})
    run_pretraining(first)
    log = tmp_path / "reports.jsonl"
    run_pretraining(with_overrides(first, {"train.epochs": 2}), callbacks=[RecordReports(str(log))])
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    assert reports[0]["checkpoint"] is False
    assert reports[0]["metrics"]["epochs_completed"] == 1 and "val/recon_loss" in reports[0]["metrics"]
    assert reports[-1]["checkpoint"] is True and reports[-1]["metrics"]["epochs_completed"] == 2


class KillAfterFirstReport(UserCallback):
    """Takes the MLflow server down (its whole process group) once the first report arrives."""

    def __init__(self, server_pgid: int):
        self.server_pgid = server_pgid

    def after_report(self, run_context, metrics, checkpoint):
        import os
        import signal

        try:
            os.killpg(self.server_pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_training_goes_on_when_the_mlflow_server_goes_down(ray_cluster, digits_dir, tmp_path, caplog):
    from tests.fixtures.mlflow_server import running_mlflow_server

    (tmp_path / "mlflow").mkdir()
    with running_mlflow_server(tmp_path / "mlflow") as server:
        cfg = tiny_config(tmp_path, digits_dir, **{
            "run_name": "mlflow-down", "dist.num_workers": 1, "train.max_steps": 8, "train.knn_k": 0,
            "mlflow.tracking_uri": server.uri, "mlflow.registered_model_name": "never-registered",
        })
        result = run_pretraining(cfg, callbacks=[KillAfterFirstReport(server.process.pid)])
        assert server.process.poll() is not None, "the server was not taken down mid-run"

    assert result.mlflow_run_id is not None  # the run was opened while the server was up
    assert result.metrics["step"] == 8 and result.checkpoint_path is not None
    assert result.registered_uri is None
    assert "could not log/register the model" in caplog.text
    # The checkpoints are the truth: the final one holds the trained model.
    import convmae
    from service.tracking.registry import export_checkpoint

    model_config = convmae.convmae_tiny().replace(img_size=32).to_dict()
    model = convmae.load_pretrained(export_checkpoint(result.checkpoint_path, model_config, tmp_path / "model"))
    loss, _, _ = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(loss)
