"""What a Ray Train worker does in fine-tuning; the loop is ``run_epochs``, as in pretraining.

What differs from pretraining: the model is a ``ConvMAEBackbone`` classifier, the optimizer has
layer-wise lr decay groups (each group's lr is ``lr * lr_scale``), batches are mixed
(Mixup/CutMix) with smoothed soft targets, and validation is top-1 accuracy.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from service.config import FinetuneConfig
from service.runtime.credentials import adopt_credentials
from service.runtime.optim import layer_decay_param_groups
from service.runtime.worker import worker_context
from service.training.loop import (
    EpochEnd,
    configure_worker_logging,
    plan_schedule,
    run_epochs,
    start_session,
    step_seed,
)
from service.training.mixup import MixSettings, mix_batch, soft_target_cross_entropy
from service.training.settings import WorkerSettings

log = logging.getLogger(__name__)

START_TOP1 = "val/top1_start"  # accuracy of the classifier before any step (kept across resumes)


def _mix_rng(seed: int, rank: int, micro_step: int) -> random.Random:
    """Mixing draws are a pure function of (seed, rank, step): resumed runs mix identically."""
    return random.Random(step_seed(seed, rank, micro_step))


@dataclass(frozen=True)
class FinetuneInputs:
    """What fine-tuning workers get besides the common settings."""

    num_classes: int
    model_config: dict[str, Any]  # the pretrained model's ConvMAEConfig, as a dict
    init_weights: Any  # an object reference to its state dict (one download, on the driver)


def finetune_worker(settings: WorkerSettings) -> None:
    """Entry point of each Ray Train worker. ``settings`` are built by ``service.training.finetune``."""
    import ray

    from convmae import ConvMAEBackbone, ConvMAEConfig
    from service import data as data_lib
    from service.evaluation.metrics import classification_metrics

    configure_worker_logging()
    # First: the data, checkpoint and MLflow clients below read them from the environment.
    adopt_credentials(settings.credentials)
    inputs: FinetuneInputs = settings.job_inputs
    ctx = worker_context()
    cfg = settings.config_at(ctx.world_size)  # an elastic run short of workers accumulates more
    assert isinstance(cfg, FinetuneConfig)
    t = cfg.train
    num_classes = inputs.num_classes
    train_url, val_url = settings.train_url, settings.val_url

    torch.manual_seed(t.seed)  # the same fresh head on every rank
    model_config = ConvMAEConfig.from_dict(inputs.model_config)
    model = ConvMAEBackbone(model_config, num_classes=num_classes, drop_path_rate=cfg.drop_path,
                            global_pool=cfg.global_pool)
    loaded = model.load_pretrain_state_dict(ray.get(inputs.init_weights))
    torch.manual_seed(t.seed + 1 + ctx.rank)  # drop path draws differ per rank (restored on resume)
    groups = layer_decay_param_groups(model, t.weight_decay, t.layer_decay)
    session = start_session(model, cfg, settings, ctx, groups=groups)
    engine, state = session.engine, session.state
    if session.is_chief and state.optimizer_step == 0:
        log.info("loaded %d pretrained tensors (%d resized); new: %s", len(loaded.loaded),
                 len(loaded.resized), ", ".join(loaded.newly_initialized) or "none")

    data_cfg = dataclasses.replace(cfg.data, url=train_url, val_url=val_url or "")
    img_size = model_config.img_size

    def loader_for(epoch: int, resume_state: dict | None):
        return data_lib.build_train_loader(
            data_cfg, storage=cfg.storage, img_size=img_size, batch_size=t.batch_size_per_worker, rank=ctx.rank,
            world_size=ctx.world_size, seed=t.seed, epoch=epoch, resume_state=resume_state,
            device=ctx.device,  # where data.decode=gpu|auto decodes, on CUDA workers
        )

    def validate() -> dict[str, float]:
        engine.module.eval()
        batches = data_lib.build_eval_loader(val_url, data_cfg, storage=cfg.storage, img_size=img_size,
                                             batch_size=t.batch_size_per_worker, rank=ctx.rank,
                                             world_size=ctx.world_size)
        scores = classification_metrics(engine.module, batches, img_size=img_size, device=ctx.device,
                                        dtype=session.dtype)
        engine.module.train()
        return {"val/top1": scores["top1"], "val/loss": scores["loss"]}

    schedule = plan_schedule(cfg, len(loader_for(0, None)))
    mix = MixSettings(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob,
                      switch_prob=t.mixup_switch_prob, smoothing=t.label_smoothing)
    if session.is_chief:
        log.info("fine-tuning %d classes on %d worker(s) (%s, ZeRO-%d): %d steps/epoch, %d steps, effective "
                 "batch %d, lr %.3e, layer decay %.2f", num_classes, ctx.world_size, settings.precision,
                 cfg.dist.zero_stage, schedule.steps_per_epoch, schedule.total_steps, cfg.effective_batch_size,
                 session.lr, t.layer_decay)

    if val_url and t.eval_before_training and START_TOP1 not in state.extra:
        start = validate()  # every rank: a collective
        state.extra[START_TOP1] = start["val/top1"]
        if session.is_chief:
            session.tracker.log_metrics(start, step=0)
            log.info("before fine-tuning: val top-1 %.4f, loss %.4f", start["val/top1"], start["val/loss"])

    def step(batch: dict[str, Any]) -> torch.Tensor:
        images = batch["images"].to(ctx.device, non_blocking=True)
        labels = batch["labels"].to(ctx.device, non_blocking=True)
        images, targets, _ = mix_batch(images, labels, num_classes, mix, _mix_rng(t.seed, ctx.rank, state.micro_step))
        return soft_target_cross_entropy(engine(images.to(session.dtype)), targets)

    def epoch_end(end: EpochEnd) -> dict[str, float]:
        return validate() if val_url and end.validation_due else {}

    engine.module.train()
    report = {START_TOP1: state.extra[START_TOP1]} if START_TOP1 in state.extra else {}
    run_epochs(session, cfg, loader_for=loader_for, step=step, epoch_end=epoch_end, schedule=schedule,
               report=report)
