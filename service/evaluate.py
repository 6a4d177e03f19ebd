"""Evaluate a model on a labeled data set: k-NN top-1, linear-probe top-1, reconstruction loss.

The driver of ``jobs/evaluate.py``. It loads the model (``service.model_source``), extracts
the encoder's pooled features of the training split (the k-NN bank and the probe's training
set) and of the validation split, and scores:

- ``eval/knn_top1``: weighted k-NN on cosine similarity (``service.evaluation.knn_top1``);
- ``eval/linear_probe_top1``: a deterministic logistic-regression probe on standardised
  features (``service.linear_probe``);
- ``eval/recon_loss``: the MAE loss on the validation split at one fixed mask ratio with
  fixed, seeded masks (pretraining models only; a fine-tuned backbone has no decoder).

Results are printed as a table and, when the model came from MLflow, logged as metrics on the
run that produced it (a failing MLflow server is a warning, never an error).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.config import ConfigError, DataConfig, _check
from service.model_source import DEFAULT_MODEL, validate_source_keys

log = logging.getLogger("convmae.evaluate")



@dataclass(frozen=True)
class EvaluateConfig:
    # models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/model, a save_pretrained or checkpoint
    # folder, a checkpoint file or URL (official ConvMAE .pth too), or random:PRESET[:IMG_SIZE].
    model: str = DEFAULT_MODEL
    model_preset: str = ""  # preset of a config-less checkpoint; empty: inferred from its shapes
    img_size: int = 0  # random: models only (0: the preset's); others use their own
    seed: int = 0  # initialisation seed of random: models (0 = the pretraining's default start)
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 64
    knn_k: int = 20  # 0 turns k-NN off
    knn_temperature: float = 0.07
    train_samples: int = 20_000  # features drawn from the train split (k-NN bank, probe fit)
    linear_probe: bool = True
    probe_weight_decay: float = 1e-4
    probe_max_iter: int = 500
    mask_ratio: float = 0.75  # fixed ratio of the reconstruction loss
    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else ./mlruns.db
    log_to_run: bool = True  # log the metrics on the model's MLflow run (models:/, runs:/)
    output: str = ""  # also write the results as JSON to this path

    def validate(self) -> EvaluateConfig:
        validate_evaluate(self)
        return self


def validate_evaluate(cfg: EvaluateConfig) -> None:
    validate_source_keys(cfg)
    _check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, ">= 1")
    _check(cfg.knn_k >= 0, "knn_k", cfg.knn_k, ">= 0 (0 turns k-NN off)")
    _check(cfg.knn_temperature > 0, "knn_temperature", cfg.knn_temperature, "> 0")
    _check(cfg.train_samples >= 1, "train_samples", cfg.train_samples, ">= 1")
    _check(cfg.probe_weight_decay >= 0, "probe_weight_decay", cfg.probe_weight_decay, ">= 0")
    _check(cfg.probe_max_iter >= 1, "probe_max_iter", cfg.probe_max_iter, ">= 1")
    _check(0.0 < cfg.mask_ratio < 1.0, "mask_ratio", cfg.mask_ratio, "0 < mask_ratio < 1")
    _check(cfg.data.loader_workers >= 0, "data.loader_workers", cfg.data.loader_workers, ">= 0")


@dataclass
class EvaluationResult:
    model: str
    metrics: dict[str, float]  # eval/knn_top1, eval/linear_probe_top1, eval/recon_loss (as computed)
    details: dict[str, Any]  # data URLs, sample counts, settings
    run_id: str | None = None  # the MLflow run the metrics were logged to
    logged: bool = False

    def table(self) -> str:
        return format_table(self.model, self.metrics, self.details)


def format_table(model: str, metrics: dict[str, float], details: dict[str, Any]) -> str:
    rows = [
        ("k-NN top-1", "eval/knn_top1", f"k={details.get('knn_k')}, T={details.get('knn_temperature')}"),
        ("linear probe top-1", "eval/linear_probe_top1", f"L-BFGS, weight decay {details.get('probe_weight_decay')}"),
        ("reconstruction loss", "eval/recon_loss", f"mask ratio {details.get('mask_ratio')}, fixed masks"),
    ]
    lines = [f"model: {model}",
             f"data:  train {details.get('train_url')} ({details.get('train_samples')} samples), "
             f"val {details.get('val_url')} ({details.get('val_samples')} samples, "
             f"{details.get('num_classes')} classes)"]
    width = max(len(r[0]) for r in rows)
    lines.append(f"{'metric'.ljust(width)}  {'value':>8}  setting")
    lines.append(f"{'-' * width}  {'-' * 8}  {'-' * 40}")
    for label, key, setting in rows:
        value = metrics.get(key)
        shown = "n/a" if value is None else (f"{value:8.2%}" if "top1" in key else f"{value:8.4f}")
        why = details.get(f"{key}_skipped", setting)
        lines.append(f"{label.ljust(width)}  {shown:>8}  {why}")
    return "\n".join(lines)


def run_evaluation(cfg: EvaluateConfig, *, device: torch.device | str | None = None) -> EvaluationResult:
    """Evaluates ``cfg.model`` on ``cfg.data`` (default: the embedded digits) in this process."""
    from service import data as data_lib
    from service import evaluation
    from service.data import storage_options
    from service.model_source import load_model_source
    from service.tracking import resolve_tracking_uri

    cfg.validate()
    train_url, val_url = data_lib.resolve_data_urls(cfg.data)
    if not val_url:
        raise ConfigError("evaluation needs a labeled held-out split: set data.val_url "
                          "(the embedded data set has one: leave data.url empty)")
    train_set, val_set = data_lib.open_dataset(train_url, cfg.data), data_lib.open_dataset(val_url, cfg.data)
    for name, url, ds in (("data.url", train_url, train_set), ("data.val_url", val_url, val_set)):
        if not ds.has_labels:
            raise ConfigError(f"{name}={url!r} has no labels (.cls): k-NN and the linear probe need a "
                              "labeled data set (prepare it from a class/xxx.jpg folder)")

    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
    source = load_model_source(cfg.model, tracking_uri=tracking_uri, preset=cfg.model_preset or None,
                               img_size=cfg.img_size or None, seed=cfg.seed,
                               storage_options=storage_options(cfg.data))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = source.model.to(device).eval()
    img_size = source.config.img_size
    loader = dict(img_size=img_size, batch_size=cfg.batch_size)
    common = dict(img_size=img_size, device=device, dtype=torch.float32)

    started = time.perf_counter()
    embed = evaluation.pooled_embedding(model)
    # The first train_samples of the train split (prepared data sets are written shuffled).
    bank, bank_labels = evaluation.extract_features(
        embed, _first_samples(data_lib.build_eval_loader(train_url, cfg.data, **loader), cfg.train_samples),
        **common)
    bank, bank_labels = bank[: cfg.train_samples], bank_labels[: cfg.train_samples]
    query, query_labels = evaluation.extract_features(
        embed, data_lib.build_eval_loader(val_url, cfg.data, **loader), **common)
    num_classes = max(train_set.num_classes, val_set.num_classes,
                      int(max(bank_labels.max(), query_labels.max())) + 1)
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {
        "train_url": train_url, "val_url": val_url, "train_samples": int(bank.shape[0]),
        "val_samples": int(query.shape[0]), "num_classes": num_classes, "img_size": img_size,
        "knn_k": cfg.knn_k, "knn_temperature": cfg.knn_temperature, "mask_ratio": cfg.mask_ratio,
        "probe_weight_decay": cfg.probe_weight_decay, "model_kind": source.kind,
    }
    if cfg.knn_k > 0:
        metrics["eval/knn_top1"] = evaluation.knn_top1(bank, bank_labels, query, query_labels, num_classes,
                                                       k=cfg.knn_k, temperature=cfg.knn_temperature)
    else:
        details["eval/knn_top1_skipped"] = "off (knn_k=0)"
    if cfg.linear_probe:
        from service.linear_probe import linear_probe_top1

        metrics["eval/linear_probe_top1"] = linear_probe_top1(
            bank, bank_labels, query, query_labels, num_classes,
            weight_decay=cfg.probe_weight_decay, max_iter=cfg.probe_max_iter)
    else:
        details["eval/linear_probe_top1_skipped"] = "off (linear_probe=false)"
    if source.is_pretraining_model:
        metrics["eval/recon_loss"] = evaluation.reconstruction_loss(
            model, data_lib.build_eval_loader(val_url, cfg.data, **loader), mask_ratio=cfg.mask_ratio, **common)
    else:
        details["eval/recon_loss_skipped"] = "n/a: the model has no decoder (fine-tuned or backbone-only)"
    details["seconds"] = round(time.perf_counter() - started, 2)

    result = EvaluationResult(model=source.describe(), metrics=metrics, details=details, run_id=source.run_id)
    if cfg.log_to_run and source.run_id and source.tracking_uri:
        result.logged = _log_to_run(source.tracking_uri, source.run_id, cfg, result)
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": result.model, "run_id": result.run_id, "metrics": metrics,
                                   "details": details}, indent=1) + "\n")
    return result


def _first_samples(batches: Iterable[dict], limit: int) -> Iterator[dict]:
    """Stops reading once ``limit`` samples came (a single process needs no lockstep padding)."""
    seen = 0
    for batch in batches:
        if seen >= limit:
            return
        seen += len(batch["labels"])
        yield batch


def _log_to_run(tracking_uri: str, run_id: str, cfg: EvaluateConfig, result: EvaluationResult) -> bool:
    """Metrics onto the model's run (step = its last training step); False when MLflow failed."""
    from service.tracking import Tracker

    tracker = Tracker(tracking_uri, run_id)
    history = tracker._safe("read run", tracker.client.get_metric_history, run_id, "train/loss") or []
    step = max((m.step for m in history), default=0)
    tracker.log_metrics(result.metrics, step=step)
    # Tags, not params: an evaluation may be repeated with other settings on the same run.
    tracker.set_tags({"eval.data_url": result.details["val_url"], "eval.mask_ratio": cfg.mask_ratio,
                      "eval.knn_k": cfg.knn_k, "eval.model_uri": cfg.model})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tracker.log_dict({"metrics": result.metrics, "details": result.details,
                      "config": dataclasses.asdict(cfg)}, f"evaluation/eval-{stamp}.json")
    return tracker.failures == 0
