"""Evaluate a model on a labeled data set: k-NN top-1, linear-probe top-1, reconstruction loss.

The driver of ``jobs/evaluate.py``. It loads the model (``service.models.source``), extracts
the encoder's pooled features of the training split (the k-NN bank and the probe's training
set) and of the validation split, and scores:

- ``eval/knn_top1``: weighted k-NN on cosine similarity (``service.evaluation.metrics.knn_top1``);
- ``eval/linear_probe_top1``: a deterministic logistic-regression probe on standardised
  features (``service.evaluation.linear_probe``);
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.config import ConfigError, EvaluateConfig

log = logging.getLogger(__name__)



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
    from service.data import storage_options
    from service.evaluation.metrics import (
        extract_features,
        knn_top1,
        pooled_embedding,
        reconstruction_loss,
    )
    from service.models.source import load_model_source
    from service.tracking import resolve_tracking_uri

    cfg.validate()
    train_url, val_url = data_lib.resolve_data_urls(cfg.data, cfg.storage)
    if not val_url:
        raise ConfigError("evaluation needs a labeled held-out split: set data.val_url "
                          "(the embedded data set has one: leave data.url empty; jobs/prepare_data.py holds one out at <dest>/val)")
    train_set, val_set = data_lib.open_dataset(train_url, cfg.storage), data_lib.open_dataset(val_url, cfg.storage)
    for name, url, ds in (("data.url", train_url, train_set), ("data.val_url", val_url, val_set)):
        if not ds.has_labels:
            raise ConfigError(f"{name}={url!r} has no labels (.cls): k-NN and the linear probe need a "
                              "labeled data set (prepare it from a class/xxx.jpg folder)")

    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
    source = load_model_source(cfg.model, tracking_uri=tracking_uri, preset=cfg.model_preset or None,
                               img_size=cfg.img_size or None, seed=cfg.seed,
                               storage_options=storage_options(cfg.storage))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = source.model.to(device).eval()
    img_size = source.config.img_size
    loader = dict(storage=cfg.storage, img_size=img_size, batch_size=cfg.batch_size)
    common = dict(img_size=img_size, device=device, dtype=torch.float32)

    started = time.perf_counter()
    embed = pooled_embedding(model)
    # The first train_samples of the train split (prepared data sets are written shuffled).
    bank, bank_labels = extract_features(
        embed, _first_samples(data_lib.build_eval_loader(train_url, cfg.data, **loader), cfg.train_samples),
        **common)
    bank, bank_labels = bank[: cfg.train_samples], bank_labels[: cfg.train_samples]
    query, query_labels = extract_features(
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
        metrics["eval/knn_top1"] = knn_top1(bank, bank_labels, query, query_labels, num_classes,
                                                       k=cfg.knn_k, temperature=cfg.knn_temperature)
    else:
        details["eval/knn_top1_skipped"] = "off (knn_k=0)"
    if cfg.linear_probe:
        from service.evaluation.linear_probe import linear_probe_top1

        metrics["eval/linear_probe_top1"] = linear_probe_top1(
            bank, bank_labels, query, query_labels, num_classes,
            weight_decay=cfg.probe_weight_decay, max_iter=cfg.probe_max_iter)
    else:
        details["eval/linear_probe_top1_skipped"] = "off (linear_probe=false)"
    if source.is_pretraining_model:
        metrics["eval/recon_loss"] = reconstruction_loss(
            model, data_lib.build_eval_loader(val_url, cfg.data, **loader), mask_ratio=cfg.mask_ratio, **common)
    else:
        details["eval/recon_loss_skipped"] = "n/a: the model has no decoder (fine-tuned or backbone-only)"
    details["seconds"] = round(time.perf_counter() - started, 2)

    result = EvaluationResult(model=source.describe(), metrics=metrics, details=details, run_id=source.run_id)
    if cfg.log_to_run and source.run_id and source.tracking_uri:
        result.logged = log_to_run_metrics(source.tracking_uri, source.run_id, cfg, result)
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


def log_to_run_metrics(tracking_uri: str, run_id: str, cfg: EvaluateConfig, result: EvaluationResult) -> bool:
    """Metrics onto the model's run (step = its last training step); False when MLflow failed."""
    from service.tracking import Tracker

    tracker = Tracker(tracking_uri, run_id)
    step = tracker.last_step("train/loss") or 0
    tracker.log_metrics(result.metrics, step=step)
    # Tags, not params: an evaluation may be repeated with other settings on the same run.
    tracker.set_tags({"eval.data_url": result.details["val_url"], "eval.mask_ratio": cfg.mask_ratio,
                      "eval.knn_k": cfg.knn_k, "eval.model_uri": cfg.model})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tracker.log_dict({"metrics": result.metrics, "details": result.details,
                      "config": dataclasses.asdict(cfg)}, f"evaluation/eval-{stamp}.json")
    return tracker.failures == 0
