"""The per-worker fine-tuning loop that Ray Train runs on every worker.

The same machinery as pretraining (``service.train_loop``): a DeepSpeed engine, resumable
loaders, checkpoints and the train-state through ``service.checkpointing``, progress lines
and MLflow logging from rank 0. What differs: the model is a ``ConvMAEBackbone`` classifier,
the optimizer has layer-wise lr decay groups (each group's lr is ``lr * lr_scale``), batches
are mixed (Mixup/CutMix) with smoothed soft targets, and validation is top-1 accuracy.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any

import torch

from service import checkpointing, distributed
from service.progress import ProgressMeter
from service.schedule import lr_at

log = logging.getLogger("convmae.finetune")

START_TOP1 = "val/top1_start"  # accuracy of the classifier before any step (kept across resumes)


def _mix_rng(seed: int, rank: int, micro_step: int) -> random.Random:
    """Mixing draws are a pure function of (seed, rank, step): resumed runs mix identically."""
    return random.Random((seed * 1_000_003 + rank * 7_919 + micro_step) % (2**63))


def finetune_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker. ``loop_config`` is built by ``service.finetune``."""
    import ray

    from convmae import ConvMAEBackbone, ConvMAEConfig
    from service import data as data_lib
    from service.config import from_dict
    from service.evaluation import classification_metrics
    from service.finetune import FinetuneConfig
    from service.mixup import MixSettings, mix_batch, soft_target_cross_entropy
    from service.train_loop import (
        _configure_logging,
        _log_progress,
        backward_and_step,
        count_step,
        set_lr,
        start_session,
    )

    _configure_logging()
    cfg = from_dict(FinetuneConfig, loop_config["config"])
    t = cfg.train
    num_classes, lr_base = loop_config["num_classes"], loop_config["lr"]
    train_url, val_url = loop_config["train_url"], loop_config["val_url"]
    ctx = distributed.worker_context()

    torch.manual_seed(t.seed)  # the same fresh head on every rank
    model_config = ConvMAEConfig.from_dict(loop_config["model_config"])
    model = ConvMAEBackbone(model_config, num_classes=num_classes, drop_path_rate=cfg.drop_path,
                            global_pool=cfg.global_pool)
    report = model.load_pretrain_state_dict(ray.get(loop_config["init_weights"]))
    torch.manual_seed(t.seed + 1 + ctx.rank)  # drop path draws differ per rank (restored on resume)
    groups = distributed.layer_decay_param_groups(model, t.weight_decay, t.layer_decay)
    session = start_session(model, cfg, loop_config, ctx, groups=groups)
    engine, dtype, state, tracker, is_chief = (session.engine, session.dtype, session.state, session.tracker,
                                               session.is_chief)
    if is_chief and state.optimizer_step == 0:
        log.info("loaded %d pretrained tensors (%d resized); new: %s", len(report.loaded),
                 len(report.resized), ", ".join(report.newly_initialized) or "none")

    data_cfg = dataclasses.replace(cfg.data, url=train_url, val_url=val_url or "")
    img_size = model_config.img_size

    def loader_for(epoch: int, resume_state: dict | None):
        return data_lib.build_train_loader(
            data_cfg, img_size=img_size, batch_size=t.batch_size_per_worker, rank=ctx.rank,
            world_size=ctx.world_size, seed=t.seed, epoch=epoch, resume_state=resume_state,
        )

    def validate() -> dict[str, float]:
        engine.module.eval()
        batches = data_lib.build_eval_loader(val_url, data_cfg, img_size=img_size, batch_size=t.batch_size_per_worker,
                                             rank=ctx.rank, world_size=ctx.world_size)
        scores = classification_metrics(engine.module, batches, img_size=img_size, device=ctx.device, dtype=dtype)
        engine.module.train()
        return {"val/top1": scores["top1"], "val/loss": scores["loss"]}

    steps_per_epoch = len(loader_for(0, None)) // t.grad_accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"the data set gives fewer than train.grad_accum_steps={t.grad_accum_steps} batches of "
                         f"{t.batch_size_per_worker} per worker per epoch: lower the batch size or workers")
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    lr_kwargs = dict(base_lr=lr_base, min_lr=t.min_lr, warmup_steps=int(round(t.warmup_epochs * steps_per_epoch)),
                     total_steps=total_steps)
    mix = MixSettings(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob,
                      switch_prob=t.mixup_switch_prob, smoothing=t.label_smoothing)
    if is_chief:
        log.info("fine-tuning %d classes on %d worker(s) (%s, ZeRO-%d): %d steps/epoch, %d steps, effective "
                 "batch %d, lr %.3e, layer decay %.2f", num_classes, ctx.world_size, loop_config["precision"],
                 cfg.dist.zero_stage, steps_per_epoch, total_steps, cfg.effective_batch_size, lr_base, t.layer_decay)

    if val_url and t.eval_before_training and START_TOP1 not in state.extra:
        start = validate()  # every rank: a collective
        state.extra[START_TOP1] = start["val/top1"]
        if is_chief:
            tracker.log_metrics(start, step=0)
            log.info("before fine-tuning: val top-1 %.4f, loss %.4f", start["val/top1"], start["val/loss"])

    meter = ProgressMeter(total_steps=total_steps, start_step=state.optimizer_step)
    images_per_micro = t.batch_size_per_worker * ctx.world_size
    window_loss = torch.zeros(2, dtype=torch.float64)  # (sum of losses, count) since last log
    micro_limit = steps_per_epoch * t.grad_accum_steps
    last_loss, last_saved_step = float("nan"), state.optimizer_step

    def save(metrics: dict[str, Any]) -> None:
        nonlocal last_saved_step
        start = {START_TOP1: state.extra[START_TOP1]} if START_TOP1 in state.extra else {}
        checkpointing.save(engine, state, {**start, **metrics, "step": state.optimizer_step, "epoch": state.epoch},
                           ctx.rank)
        last_saved_step = state.optimizer_step

    engine.module.train()
    while state.epoch < t.epochs and state.optimizer_step < total_steps:
        loader = loader_for(state.epoch, state.loader_state)
        epoch_finished = True
        for batch in loader:
            if state.micro_in_epoch >= micro_limit:
                break
            images = batch["images"].to(ctx.device, non_blocking=True)
            labels = batch["labels"].to(ctx.device, non_blocking=True)
            images, targets, _ = mix_batch(images, labels, num_classes, mix,
                                           _mix_rng(t.seed, ctx.rank, state.micro_step))
            lr = lr_at(state.optimizer_step, **lr_kwargs)
            set_lr(engine, lr)
            loss = soft_target_cross_entropy(engine(images.to(dtype)), targets)
            boundary = backward_and_step(engine, loss)
            last_loss = float(loss.detach())
            if not count_step(state, last_loss, boundary, images_per_micro, window_loss, meter, loader):
                continue
            if state.optimizer_step % t.log_every_steps == 0 or state.optimizer_step == total_steps:
                _log_progress(state, window_loss, meter, lr, loader, tracker, ctx, t.epochs, is_chief)
            if state.optimizer_step >= total_steps:
                epoch_finished = state.micro_in_epoch >= micro_limit
                break
            if state.optimizer_step % cfg.checkpoint.every_steps == 0:
                save({"train/loss": last_loss})

        finished_epoch = state.epoch
        if epoch_finished:
            state.epoch, state.micro_in_epoch, state.loader_state = state.epoch + 1, 0, None
        done = state.optimizer_step >= total_steps or state.epoch >= t.epochs
        epoch_metrics: dict[str, Any] = {"epochs_completed": state.epoch}
        if val_url and (done or (epoch_finished and (finished_epoch + 1) % t.val_every_epochs == 0)):
            epoch_metrics.update(validate())
            if is_chief:
                tracker.log_metrics({k: v for k, v in epoch_metrics.items() if k.startswith("val/")},
                                    step=state.optimizer_step)
                log.info("epoch %d: val top-1 %.4f, loss %.4f", finished_epoch + 1, epoch_metrics["val/top1"],
                         epoch_metrics["val/loss"])
        save({**epoch_metrics, "train/loss": last_loss})

    if last_saved_step != state.optimizer_step:
        save({"train/loss": last_loss})
    tracker.close()
