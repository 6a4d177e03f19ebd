"""The per-worker pretraining loop that Ray Train runs on every worker."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service import checkpointing, distributed
from service.checkpointing import TrainState
from service.config import PretrainConfig, from_dict
from service.progress import ProgressMeter
from service.schedule import lr_at
from service.tracking import NullTracker, Tracker

log = logging.getLogger("convmae.train")

# Chaos testing: kill one worker once, at a given optimizer step, to exercise fault tolerance.
# The marker file makes it happen once per run (the replacement worker must not die again).
FAULT_STEP_ENV = "CONVMAE_FAULT_INJECT_STEP"
FAULT_MARKER_ENV = "CONVMAE_FAULT_INJECT_MARKER"


def mask_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """Masks are a pure function of (seed, rank, step): resumed runs draw the same masks."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank * 7_919 + micro_step) % (2**63))


def _maybe_inject_fault(step: int, rank: int) -> None:
    target = os.environ.get(FAULT_STEP_ENV)
    marker = os.environ.get(FAULT_MARKER_ENV)
    if target is None or marker is None or rank != 1 or step != int(target) or Path(marker).exists():
        return
    Path(marker).write_text(f"killed rank {rank} at step {step}\n")
    log.warning("fault injection: killing rank %d at step %d", rank, step)
    time.sleep(3.0)  # let the controller register the last reported checkpoint first
    os._exit(1)


def _configure_logging() -> None:
    if not logging.getLogger("convmae").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
        for name in ("convmae", "service"):
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False  # Ray's worker log capture would print each line twice


def train_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker. ``loop_config`` is built by ``service.pretrain``."""
    from convmae import build_model
    from service import data as data_lib
    from service import evaluation

    _configure_logging()
    cfg = from_dict(PretrainConfig, loop_config["config"])
    use_gpu, precision = loop_config["use_gpu"], loop_config["precision"]
    train_url, val_url = loop_config["train_url"], loop_config["val_url"]
    ctx = distributed.worker_context()
    t, m = cfg.train, cfg.model

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(m.name, img_size=m.img_size, norm_pix_loss=m.norm_pix_loss)
    session = start_session(model, cfg, loop_config, ctx)
    engine, dtype, state, tracker, is_chief = (session.engine, session.dtype, session.state, session.tracker,
                                               session.is_chief)

    # The driver resolved the URLs (absolute, embedded set generated); workers must not redo it
    # relative to their own working directory.
    data_cfg = dataclasses.replace(cfg.data, url=train_url, val_url=val_url or "")

    def loader_for(epoch: int, resume_state: dict | None):
        return data_lib.build_train_loader(
            data_cfg, img_size=m.img_size, batch_size=t.batch_size_per_worker, rank=ctx.rank,
            world_size=ctx.world_size, seed=t.seed, epoch=epoch, resume_state=resume_state,
        )

    micro_per_epoch = len(loader_for(0, None))
    steps_per_epoch = micro_per_epoch // t.grad_accum_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"the data set gives {micro_per_epoch} batches of {t.batch_size_per_worker} per worker per "
            f"epoch, fewer than train.grad_accum_steps={t.grad_accum_steps}: lower the batch size or workers"
        )
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    warmup_steps = int(round(t.warmup_epochs * steps_per_epoch))
    lr_kwargs = dict(base_lr=loop_config["lr"], min_lr=t.min_lr, warmup_steps=warmup_steps, total_steps=total_steps)
    if is_chief:
        log.info(
            "training %s on %d worker(s) (%s, %s, ZeRO-%d): %d steps/epoch, %d steps, effective batch %d, lr %.3e",
            m.name, ctx.world_size, "GPU" if use_gpu else "CPU", precision, cfg.dist.zero_stage,
            steps_per_epoch, total_steps, cfg.effective_batch_size, loop_config["lr"],
        )

    meter = ProgressMeter(total_steps=total_steps, start_step=state.optimizer_step)
    images_per_micro = t.batch_size_per_worker * ctx.world_size
    recon_batch = None
    last_saved_step = state.optimizer_step
    window_loss = torch.zeros(2, dtype=torch.float64)  # (sum of losses, count) since last log

    def save(metrics: dict[str, Any]) -> None:
        nonlocal last_saved_step
        checkpointing.save(engine, state, {**metrics, "step": state.optimizer_step, "epoch": state.epoch}, ctx.rank)
        last_saved_step = state.optimizer_step

    micro_limit = steps_per_epoch * t.grad_accum_steps  # leftover micro-batches never straddle epochs
    last_loss = float("nan")
    while state.epoch < t.epochs and state.optimizer_step < total_steps:
        loader = loader_for(state.epoch, state.loader_state)
        epoch_finished = True
        for batch in loader:
            if state.micro_in_epoch >= micro_limit:
                break
            images = batch["images"].to(ctx.device, dtype=dtype, non_blocking=True)
            if recon_batch is None:
                recon_batch = images[: min(8, images.shape[0])].detach().clone()
            lr = lr_at(state.optimizer_step, **lr_kwargs)
            set_lr(engine, lr)
            loss, _, _ = engine(images, mask_ratio=m.mask_ratio,
                                generator=mask_generator(t.seed, ctx.rank, state.micro_step))
            boundary = backward_and_step(engine, loss)
            last_loss = float(loss.detach().float())
            if not count_step(state, last_loss, boundary, images_per_micro, window_loss, meter, loader):
                continue
            if state.optimizer_step % t.log_every_steps == 0 or state.optimizer_step == total_steps:
                _log_progress(state, window_loss, meter, lr, loader, tracker, ctx, t.epochs, is_chief)
            _maybe_inject_fault(state.optimizer_step, ctx.rank)
            if state.optimizer_step >= total_steps:
                epoch_finished = state.micro_in_epoch >= micro_limit
                break
            if state.optimizer_step % cfg.checkpoint.every_steps == 0:
                save({"train/loss": last_loss})

        finished_epoch = state.epoch
        if epoch_finished:
            state.epoch += 1
            state.micro_in_epoch = 0
            state.loader_state = None
        done = state.optimizer_step >= total_steps or state.epoch >= t.epochs
        due = epoch_finished and (finished_epoch + 1) % t.val_every_epochs == 0
        epoch_metrics: dict[str, Any] = {"epochs_completed": state.epoch}
        if val_url and (due or done):
            epoch_metrics.update(
                evaluation.validate_during_training(engine.module, cfg, val_url, train_url, ctx, dtype)
            )
        recon_due = epoch_finished and (finished_epoch + 1) % cfg.mlflow.recon_every_epochs == 0
        if recon_batch is not None and (recon_due or done):
            # Every rank joins the forward (ZeRO-3 gathers weights collectively); rank 0 logs.
            outputs = _reconstruction_forward(engine.module, recon_batch, cfg)
            if is_chief:
                _log_reconstructions(engine.module, recon_batch, outputs, tracker, state.optimizer_step)
        if is_chief:
            val = {k: v for k, v in epoch_metrics.items() if k.startswith("val/")}
            tracker.log_metrics(val, step=state.optimizer_step)
            if val:
                log.info("epoch %d validation: %s", finished_epoch + 1,
                         ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
        state.extra["epoch_metrics"] = epoch_metrics  # reported again on resume (see start_session)
        save({**epoch_metrics, "train/loss": last_loss})

    if last_saved_step != state.optimizer_step:
        save({"train/loss": last_loss})
    tracker.close()


@dataclass
class WorkerSession:
    """What a training worker holds after start-up (pretraining and fine-tuning alike)."""

    engine: Any  # the DeepSpeed engine
    ds_config: dict[str, Any]
    dtype: torch.dtype  # of the engine's weights and inputs
    state: TrainState  # restored from the latest checkpoint, or fresh
    tracker: Tracker  # rank 0 logs to MLflow, the others hold a NullTracker
    is_chief: bool


def start_session(model: torch.nn.Module, cfg: Any, loop_config: dict[str, Any], ctx: Any,
                  groups: list[dict[str, Any]] | None = None) -> WorkerSession:
    """DeepSpeed engine over ``model`` (optimizer ``groups``, default ``param_groups``), the
    train state of the checkpoint Ray Train hands this worker, and rank 0's tracker."""
    lr = loop_config["lr"]
    ds_config = distributed.deepspeed_config(cfg, use_gpu=loop_config["use_gpu"],
                                             precision=loop_config["precision"], lr=lr)
    engine = distributed.build_engine(model, cfg, ds_config, lr, groups=groups)
    state = checkpointing.restore(engine, ctx.rank) or TrainState()
    if state.extra.get("epoch_metrics"):
        # A run resumed after its last epoch-end report may never have had that report seen
        # (a sweep interrupted right after it): say it again, so Tune's scheduler gets to decide
        # at that epoch. Every worker reports, as Ray Train requires.
        import ray.train

        ray.train.report(dict(state.extra["epoch_metrics"]))
    is_chief = ctx.rank == 0
    tracker: Tracker = (
        Tracker(loop_config["tracking_uri"], loop_config["mlflow_run_id"], enabled=cfg.mlflow.enabled,
                system_metrics=cfg.mlflow.system_metrics)
        if is_chief else NullTracker()
    )
    if is_chief and state.optimizer_step == 0:
        tracker.log_dict(ds_config, "deepspeed_config.json")
    return WorkerSession(engine, ds_config, distributed.engine_dtype(ds_config), state, tracker, is_chief)


def set_lr(engine: Any, lr: float) -> None:
    """Every group's lr: ``lr`` times its ``lr_scale`` (layer-wise decay; 1 when absent)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def backward_and_step(engine: Any, loss: torch.Tensor) -> bool:
    """Backward and (at a gradient-accumulation boundary) an optimizer step; True at a boundary."""
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    return boundary


def count_step(state: TrainState, loss: float, boundary: bool, images: int, window_loss: torch.Tensor,
               meter: ProgressMeter, loader: Any) -> bool:
    """Books a finished micro-batch of ``images`` (all workers); at a gradient-accumulation
    boundary also the optimizer step and the loader position, and returns True."""
    state.micro_step += 1
    state.micro_in_epoch += 1
    state.samples_seen += images
    window_loss += torch.tensor([loss, 1.0], dtype=torch.float64)
    meter.update(images, steps=0)
    if not boundary:
        return False
    state.optimizer_step += 1
    meter.update(0, steps=1)
    state.loader_state = loader.state_dict()
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {state.optimizer_step}; lower train.blr")
    return True


def _log_progress(state, window_loss, meter, lr, loader, tracker, ctx, epochs, is_chief) -> None:
    """Averages the window's loss over all workers (a collective: every rank calls this)."""
    summed = distributed.all_reduce_sum(window_loss.to(ctx.device)).cpu()
    mean_loss = float(summed[0] / max(float(summed[1]), 1.0))
    window_loss.zero_()
    figures = meter.flush(state.optimizer_step)
    if not is_chief:
        return
    log.info(meter.line(epoch=state.epoch, epochs=epochs, step=state.optimizer_step, loss=mean_loss,
                        lr=lr, figures=figures))
    tracker.log_metrics(
        {"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": figures["images_per_s"],
         "train/step_time_s": figures["step_time_s"], "train/epoch": state.epoch,
         "data/corrupt_samples": loader.corrupt_samples, **_memory_metrics(ctx.device)},
        step=state.optimizer_step,
    )


def _memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "system/gpu_mem_allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
            "system/gpu_mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        }
    try:
        import psutil

        return {"system/process_rss_gb": psutil.Process().memory_info().rss / 2**30}
    except ImportError:
        return {}


def _reconstruction_forward(module: torch.nn.Module, images: torch.Tensor, cfg: PretrainConfig):
    from service.visualize import masked_prediction

    return masked_prediction(module, images, mask_ratio=cfg.train.eval_mask_ratio, seed=cfg.train.seed)


def _log_reconstructions(module, images, outputs, tracker: Tracker, step: int) -> None:
    from service.visualize import reconstruction_grid

    _, pred, mask = outputs
    grid = reconstruction_grid(module.config, images.float().cpu(), pred.float().cpu(), mask.float().cpu())
    tracker.log_image(grid, f"reconstructions/step_{step:07d}.png")
