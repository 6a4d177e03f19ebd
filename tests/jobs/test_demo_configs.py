"""Every demo config in jobs/configs/ that runs on a CPU machine learns on the embedded data:
the model it trains beats its own random start (slow: each is a whole demo run, minutes).

Only the output locations move (under the test's folder); everything else is the file as the
README tells users to run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import (
    EvaluateConfig,
    FinetuneConfig,
    PretrainConfig,
    TuneJobConfig,
    load_config,
    with_overrides,
)
from service.evaluation.evaluate import run_evaluation

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
# The demo configs: those sized for a CPU machine and the embedded digits.
DEMOS = ("tiny_cpu.yaml", "sweep_tiny_cpu.yaml", "finetune_tiny_cpu.yaml")


def test_every_cpu_config_is_a_demo_with_a_test_here():
    cpu = sorted(p.name for p in CONFIGS.glob("*.yaml") if "cpu" in p.name)
    assert cpu == sorted(DEMOS)


def moved(cfg, tmp_path: Path, digits_dir: Path):
    """``cfg`` with its outputs under ``tmp_path`` and the session's embedded data."""
    overrides = {"data.embedded_dir": str(digits_dir), "checkpoint.storage_path": str(tmp_path / "runs"),
                 "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlruns.db", "mlflow.system_metrics": False}
    if isinstance(cfg, TuneJobConfig):
        overrides["sweep.storage_path"] = str(tmp_path / "sweeps")
    return with_overrides(cfg, overrides).validate()


def beats_random_start(model_uri: str, cfg: PretrainConfig) -> None:
    """k-NN and linear probe of ``model_uri`` against the weights its pretraining started from."""

    def evaluate(model: str) -> dict[str, float]:
        eval_cfg = EvaluateConfig(model=model, tracking_uri=cfg.mlflow.tracking_uri, data=cfg.data,
                                  seed=cfg.train.seed)
        return run_evaluation(eval_cfg, device="cpu").metrics

    trained = evaluate(model_uri)
    start = evaluate(f"random:{cfg.model.name}:{cfg.model.img_size}")
    print(f"{model_uri}: {trained}\nrandom start: {start}")
    for metric in ("eval/knn_top1", "eval/linear_probe_top1"):
        assert trained[metric] > start[metric], f"{metric}: {trained[metric]:.4f} <= random start {start[metric]:.4f}"


def test_tiny_cpu_beats_its_random_start(ray_cluster, digits_dir, tmp_path):
    from service.training.pretrain import run_pretraining

    cfg = moved(load_config(PretrainConfig, CONFIGS / "tiny_cpu.yaml"), tmp_path, digits_dir)
    result = run_pretraining(cfg)
    assert result.registered_uri == f"models:/{cfg.registered_name()}/1"
    beats_random_start(result.registered_uri, cfg)


def test_the_tiny_sweeps_best_model_beats_its_random_start(ray_cluster, digits_dir, tmp_path):
    from service.tune.sweep import run_sweep

    cfg = moved(load_config(TuneJobConfig, CONFIGS / "sweep_tiny_cpu.yaml"), tmp_path, digits_dir)
    result = run_sweep(cfg)
    assert result.registered_uri is not None, result.table
    best = with_overrides(cfg.pretrain(), {k: v for k, v in result.best.params.items()})
    beats_random_start(result.registered_uri, best)


def test_the_tiny_fine_tuning_beats_its_start(ray_cluster, digits_dir, tmp_path):
    """Fine-tuning the demo's pretrained model: the classifier ends above where it started."""
    from service.training.finetune import run_finetuning
    from service.training.pretrain import run_pretraining

    pretrain = moved(load_config(PretrainConfig, CONFIGS / "tiny_cpu.yaml"), tmp_path, digits_dir)
    source = run_pretraining(pretrain).registered_uri
    cfg = moved(with_overrides(load_config(FinetuneConfig, CONFIGS / "finetune_tiny_cpu.yaml"), {"model": source}),
                tmp_path, digits_dir)
    result = run_finetuning(cfg)
    start, end = result.metrics["val/top1_start"], result.metrics["val/top1"]
    assert end > start + 0.2, f"fine-tuning did not improve: {start:.3f} -> {end:.3f}"
