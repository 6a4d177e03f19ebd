"""What a Ray Train worker does in pretraining: ConvMAE's masked-reconstruction step, and at
epoch ends the validation metrics and a reconstruction grid. The loop is ``run_epochs``."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from service.config import PretrainConfig
from service.runtime.credentials import adopt_credentials
from service.runtime.flops import pretraining_flops_per_image
from service.runtime.worker import worker_context
from service.training.loop import (
    EpochEnd,
    configure_worker_logging,
    plan_schedule,
    run_epochs,
    start_session,
    step_seed,
)
from service.training.settings import WorkerSettings

log = logging.getLogger(__name__)

RECON_IMAGES = 8  # rows of the reconstruction grid logged at epoch ends
# Train-state flag: the random start's scores (train.eval_before_training) are still to be logged.
RANDOM_START_DUE = "random_start_due"


def starting_model(cfg: PretrainConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The weights training started from, as the engine held them before its first step: the
    model built again under ``train.seed`` (this process's random state is left as it was)."""
    from convmae import build_model

    m = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(m.name, img_size=m.img_size, norm_pix_loss=m.norm_pix_loss)
    return model.to(device=device, dtype=dtype)


def mask_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """Masks are a pure function of (seed, rank, step): resumed runs draw the same masks."""
    return torch.Generator().manual_seed(step_seed(seed, rank, micro_step))


def train_worker(settings: WorkerSettings) -> None:
    """Entry point of each Ray Train worker. ``settings`` are built by ``service.training.pretrain``."""
    from convmae import build_model
    from service import data as data_lib
    from service.evaluation.metrics import validate_during_training

    configure_worker_logging()
    # First: the data, checkpoint and MLflow clients below read them from the environment.
    adopt_credentials(settings.credentials)
    train_url, val_url = settings.train_url, settings.val_url
    ctx = worker_context()
    cfg = settings.config_at(ctx.world_size)  # an elastic run short of workers accumulates more
    assert isinstance(cfg, PretrainConfig)
    t, m = cfg.train, cfg.model

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(m.name, img_size=m.img_size, norm_pix_loss=m.norm_pix_loss)
    model_config = model.config
    session = start_session(model, cfg, settings, ctx)
    engine, state = session.engine, session.state
    if session.is_chief:  # the one that logs train/tflops and train/mfu
        session.flops_per_image = pretraining_flops_per_image(model_config, m.mask_ratio)

    # The driver resolved the URLs (absolute, embedded set generated); workers must not redo it
    # relative to their own working directory.
    data_cfg = dataclasses.replace(cfg.data, url=train_url, val_url=val_url or "")

    def loader_for(epoch: int, resume_state: dict | None):
        return data_lib.build_train_loader(
            data_cfg, storage=cfg.storage, img_size=m.img_size, batch_size=t.batch_size_per_worker,
            rank=ctx.rank, world_size=ctx.world_size, seed=t.seed, epoch=epoch, resume_state=resume_state,
            device=ctx.device,  # where data.decode=gpu|auto decodes, on CUDA workers
        )

    schedule = plan_schedule(cfg, len(loader_for(0, None)))
    if session.is_chief:
        log.info(
            "training %s on %d worker(s) (%s, %s, ZeRO-%d): %d steps/epoch, %d steps, effective batch %d, lr %.3e",
            m.name, ctx.world_size, "GPU" if settings.use_gpu else "CPU", settings.precision,
            cfg.dist.zero_stage, schedule.steps_per_epoch, schedule.total_steps, cfg.effective_batch_size,
            session.lr,
        )

    # The random start, for comparison: what pretraining gained shows in the run itself (val/*
    # at step 0). It is scored at the first validation, from the starting weights rebuilt, so
    # that training starts seconds sooner; until then checkpoints carry that it is still due.
    if val_url and t.eval_before_training and state.optimizer_step == 0:
        state.extra[RANDOM_START_DUE] = True

    recon_batch: torch.Tensor | None = None  # the first images seen: the same grid every epoch

    def step(batch: dict[str, Any]) -> torch.Tensor:
        nonlocal recon_batch
        images = batch["images"].to(ctx.device, dtype=session.dtype, non_blocking=True)
        if recon_batch is None:
            recon_batch = images[:RECON_IMAGES].detach().clone()
        loss, _, _ = engine(images, mask_ratio=m.mask_ratio, generator=mask_generator(t.seed, ctx.rank, state.micro_step))
        return loss

    def epoch_end(end: EpochEnd) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if val_url and end.validation_due and state.extra.pop(RANDOM_START_DUE, False):
            initial = starting_model(cfg, ctx.device, session.dtype)
            start = validate_during_training(initial, cfg, val_url, train_url, ctx, session.dtype)
            if session.is_chief:
                session.tracker.log_metrics(start, step=0)
                log.info("random start (step 0): %s", ", ".join(f"{k}={v:.4f}" for k, v in start.items()))
                if recon_batch is not None:  # the grid the later ones are compared with
                    _log_reconstructions(session, cfg, recon_batch, module=initial, step=0)
        if val_url and end.validation_due:
            metrics.update(validate_during_training(engine.module, cfg, val_url, train_url, ctx, session.dtype))
        recon_due = end.finished and (end.epoch + 1) % cfg.mlflow.recon_every_epochs == 0
        if recon_batch is not None and (recon_due or end.done):
            # Every rank joins the forward (ZeRO-3 gathers weights collectively); rank 0 logs.
            _log_reconstructions(session, cfg, recon_batch)
        return metrics

    run_epochs(session, cfg, loader_for=loader_for, step=step, epoch_end=epoch_end, schedule=schedule)


def _log_reconstructions(session: Any, cfg: PretrainConfig, images: torch.Tensor, *,
                         module: torch.nn.Module | None = None, step: int | None = None) -> None:
    """The grid of ``module`` (default: the engine's, at the current step) on ``images``."""
    from service.evaluation.visualize import masked_prediction, reconstruction_grid

    module = module if module is not None else session.engine.module
    step = session.state.optimizer_step if step is None else step
    _, pred, mask = masked_prediction(module, images, mask_ratio=cfg.train.eval_mask_ratio, seed=cfg.train.seed)
    if session.is_chief:
        grid = reconstruction_grid(module.config, images.float().cpu(), pred.float().cpu(), mask.float().cpu())
        session.tracker.log_image(grid, f"reconstructions/step_{step:07d}.png")
