"""The worker loop every training job shares; a job supplies only its step and its validation.

``start_session`` builds what a Ray Train worker holds (engine, restored train state, rank 0's
tracker); ``run_epochs`` owns the bookkeeping around the job's step: steps per epoch and the
lr schedule, the micro-batch limit that keeps gradient-accumulation windows inside an epoch,
progress lines and metrics, checkpoint cadence, epoch-end validation and the final save.

The loss stays on the device between log steps: reading it on the host every step would
synchronise host and device once per step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.config import TrainingJobConfig
from service.data import DataError
from service.data.scratch import sweep_stale_scratch
from service.runtime.engine import Engine
from service.runtime.flops import dense_bf16_peak_flops
from service.runtime.logs import install_redaction, quiet_known_noise
from service.runtime.optim import lr_at
from service.runtime.worker import WorkerContext, all_reduce_sum
from service.tracking import NullTracker, Tracker
from service.training import checkpoints
from service.training.checkpoints import TrainState
from service.training.progress import ProgressMeter
from service.training.settings import WorkerSettings

log = logging.getLogger(__name__)

# Chaos testing: kill one worker once, at a given optimizer step, to exercise fault tolerance.
# The marker file makes it happen once per run (the replacement worker must not die again).
FAULT_STEP_ENV = "CONVMAE_FAULT_INJECT_STEP"
FAULT_MARKER_ENV = "CONVMAE_FAULT_INJECT_MARKER"
# Testing: where workers append the sample keys of every micro-batch they train on.
SEEN_KEYS_ENV = "CONVMAE_SEEN_KEYS_LOG"
# Where a resumed run's last epoch-end metrics are kept in the train state (see start_session).
EPOCH_METRICS = "epoch_metrics"


def configure_worker_logging() -> None:
    """One handler for the ``convmae`` and ``service`` loggers in a Ray worker process.

    Every module logs under its own name (``logging.getLogger(__name__)``), so these two roots
    cover the model package and the service. Every record the process makes is redacted (a
    library's warning may quote a URL with its password)."""
    install_redaction()
    quiet_known_noise()
    if not logging.getLogger("convmae").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
        for name in ("convmae", "service"):
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False  # Ray's worker log capture would print each line twice


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """The seed of a micro-batch's random draws (masks, mixing): a pure function of (seed, rank,
    step), so a resumed run draws exactly what the uninterrupted one would have."""
    return (seed * 1_000_003 + rank * 7_919 + micro_step) % (2**63)


@dataclass
class WorkerSession:
    """What a training worker holds after start-up (pretraining and fine-tuning alike)."""

    ctx: WorkerContext
    engine: Engine
    state: TrainState  # restored from the latest checkpoint, or fresh
    tracker: Tracker  # rank 0 logs to MLflow, the others hold a NullTracker
    lr: float  # the base lr the schedule scales
    flops_per_image: int | None = None  # forward+backward, for train/tflops and train/mfu
    job_started_at: float | None = None  # the driver process's start, epoch seconds
    watch_preemption: bool = False  # ask Ray Train at every step whether a node of the run is going

    @property
    def is_chief(self) -> bool:
        return self.ctx.rank == 0

    @property
    def dtype(self) -> torch.dtype:
        """Of the engine's weights, and so of the inputs it takes."""
        return self.engine.dtype


def start_session(model: torch.nn.Module, cfg: TrainingJobConfig, settings: WorkerSettings,
                  ctx: WorkerContext, groups: list[dict[str, Any]] | None = None) -> WorkerSession:
    """The engine over ``model`` (optimizer ``groups``, default weight-decay groups), the train
    state of the checkpoint Ray Train hands this worker, and rank 0's tracker.

    ``cfg``: the config at this world size (``WorkerSettings.config_at``)."""
    lr = settings.lr
    if ctx.local_rank == 0:  # one per machine: checkpoints that killed workers left in its temp directory
        sweep_stale_scratch()
    engine = Engine.build(model, cfg, use_gpu=settings.use_gpu, precision=settings.precision,
                          lr=lr, groups=groups, compile_model=settings.compile_model)
    state = checkpoints.restore(engine, ctx.rank) or TrainState()
    state.trains = dict(settings.trains)  # the driver checked that a restored state is this run's
    if state.extra.get(EPOCH_METRICS):
        # A run resumed after its last epoch-end report may never have had that report seen
        # (a sweep interrupted right after it): say it again, so Tune's scheduler gets to decide
        # at that epoch. Every worker reports, as Ray Train requires.
        import ray.train

        ray.train.report(dict(state.extra[EPOCH_METRICS]))
    tracker: Tracker = NullTracker()
    if ctx.rank == 0:
        tracker = Tracker(settings.tracking_uri, settings.mlflow_run_id, enabled=cfg.mlflow.enabled,
                          system_metrics=cfg.mlflow.system_metrics)
        # A resumed or restarted run redoes the steps since its checkpoint: one point per step.
        tracker.skip_logged_steps()
        if state.optimizer_step == 0:
            tracker.log_dict(engine.config, "deepspeed_config.json")
        full = settings.config.dist.num_workers
        if ctx.world_size != full:  # an elastic run short of workers: the same global batch
            log.info("world size %d of %d: %d accumulation step(s) of %d per worker, global batch %d as with %d",
                     ctx.world_size, full, cfg.train.grad_accum_steps, cfg.train.batch_size_per_worker,
                     cfg.effective_batch_size, full)
    return WorkerSession(ctx, engine, state, tracker, lr, job_started_at=settings.job_started_at,
                         watch_preemption=settings.watch_preemption)


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_schedule(cfg: TrainingJobConfig, micro_batches_per_epoch: int) -> Schedule:
    """Optimizer steps per epoch and in all, from the loader's batches per epoch."""
    t = cfg.train
    steps_per_epoch = micro_batches_per_epoch // t.grad_accum_steps
    if steps_per_epoch < 1:
        raise DataError(
            f"the data set gives {micro_batches_per_epoch} batches of {t.batch_size_per_worker} per worker per "
            f"epoch, fewer than train.grad_accum_steps={t.grad_accum_steps}: lower the batch size or workers"
        )
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    return Schedule(steps_per_epoch, total_steps, int(round(t.warmup_epochs * steps_per_epoch)))


@dataclass(frozen=True)
class EpochEnd:
    """Where the loop stands when an epoch (or the run) ends."""

    epoch: int  # 0-based index of the epoch that ended
    finished: bool  # the epoch ran to its end (False: stopped early by train.max_steps)
    done: bool  # the run ends here
    validation_due: bool  # train.val_every_epochs says so (or the run ends)


LoaderFactory = Callable[[int, "dict[str, Any] | None"], Any]


def step_checkpoint_due(optimizer_step: int, every_steps: int, *, epoch_ended: bool) -> bool:
    """Whether the step cadence saves now. Not on an epoch's last step: the epoch-end
    checkpoint follows at once with the same position, so saving both would write every such
    step twice."""
    return optimizer_step % every_steps == 0 and not epoch_ended


def run_epochs(
    session: WorkerSession,
    cfg: TrainingJobConfig,
    *,
    loader_for: LoaderFactory,
    step: Callable[[dict[str, Any]], torch.Tensor],
    epoch_end: Callable[[EpochEnd], dict[str, float]],
    schedule: Schedule,
    report: Mapping[str, Any] | None = None,
) -> None:
    """Trains until ``train.epochs`` or ``train.max_steps``, resuming at ``session.state``.

    ``loader_for(epoch, resume_state)``: the epoch's loader. ``step(batch)``: the job's forward
    pass, returning the loss (the loop runs backward and the optimizer step). ``epoch_end``:
    the job's validation; its ``val/*`` metrics are logged, and all are reported with the
    epoch's checkpoint. ``report``: extra metrics reported with every checkpoint.
    """
    t, ctx, engine, state, tracker = cfg.train, session.ctx, session.engine, session.state, session.tracker
    loader = loader_for(state.epoch, state.loader_state) if state.epoch < t.epochs else None
    saved_world = state.world_size or (state.loader_state or {}).get("world_size", 0)
    if loader is not None and saved_world not in (0, ctx.world_size):
        _continue_schedule_resharded(session, schedule, loader, saved_world, t.grad_accum_steps)
    state.world_size, state.zero_stage = ctx.world_size, cfg.dist.zero_stage
    # Where training stops, in optimizer steps: the end of the last epoch, or train.max_steps
    # steps taken (also when a resumed run's schedule has another number of steps per epoch).
    total_steps = t.epochs * schedule.steps_per_epoch - state.schedule_offset
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    meter = ProgressMeter(total_steps=total_steps, start_step=state.optimizer_step)
    window = LossWindow(ctx.device)
    images_per_micro = t.batch_size_per_worker * ctx.world_size
    last_saved_step = state.optimizer_step
    writer = checkpoints.CheckpointWriter(ctx.rank, max_retries=cfg.storage.max_retries,
                                          background=cfg.checkpoint.background_upload)

    def save(metrics: Mapping[str, Any]) -> None:
        nonlocal last_saved_step
        loss = window.last_loss()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {state.optimizer_step}; lower train.blr")
        writer.save(engine, state, {**(report or {}), **metrics, "train/loss": loss,
                                    "step": state.optimizer_step, "epoch": state.epoch})
        last_saved_step = state.optimizer_step

    profiler = _StepProfiler(t.profile_steps if session.is_chief else 0, tracker)
    first_step_pending = True
    while state.epoch < t.epochs and state.optimizer_step < total_steps:
        loader = loader or loader_for(state.epoch, state.loader_state)
        # Leftover micro-batches never straddle epochs. (len(loader) is the schedule's batches
        # per epoch, but for the rest of an epoch resharded on resume.)
        micro_limit = len(loader) // t.grad_accum_steps * t.grad_accum_steps
        epoch_finished = True
        for batch in _timed(loader, meter):
            if state.micro_in_epoch >= micro_limit:
                break
            lr = lr_at(state.optimizer_step + state.schedule_offset, base_lr=session.lr, min_lr=t.min_lr,
                       warmup_steps=schedule.warmup_steps, total_steps=schedule.total_steps)
            engine.set_lr(lr)
            record_seen(batch, state, ctx)
            loss = step(batch)
            boundary = engine.backward_and_step(loss)
            window.add(loss)
            state.micro_step += 1
            state.micro_in_epoch += 1
            state.samples_seen += images_per_micro
            meter.update(images_per_micro, steps=0)
            if not boundary:
                continue
            state.optimizer_step += 1
            meter.update(0, steps=1)
            if first_step_pending:
                first_step_pending = False
                report_time_to_first_step(session)
            state.loader_state = loader.state_dict()
            profiler.step()
            if state.optimizer_step % t.log_every_steps == 0 or state.optimizer_step == total_steps:
                log_progress(session, window, meter, lr, loader, t.epochs)
            _maybe_inject_fault(state.optimizer_step, ctx.rank)
            if state.optimizer_step >= total_steps:
                epoch_finished = state.micro_in_epoch >= micro_limit
                break
            if session.watch_preemption and preemption_coming(session):
                # Saved now, before the node goes: the run restarts from this very step. Training
                # stops here, so no step after it is done twice; Ray Train restarts the workers
                # (where there is room) at the drain's deadline.
                save({})
                writer.wait()
                wait_for_restart(session)
            if step_checkpoint_due(state.optimizer_step, cfg.checkpoint.every_steps,
                                   epoch_ended=state.micro_in_epoch >= micro_limit):
                with meter.excluded():
                    save({})

        finished_epoch, loader = state.epoch, None
        if epoch_finished:
            state.epoch, state.micro_in_epoch, state.loader_state = state.epoch + 1, 0, None
        done = state.optimizer_step >= total_steps or state.epoch >= t.epochs
        due = done or (epoch_finished and (finished_epoch + 1) % t.val_every_epochs == 0)
        with meter.excluded():  # train/images_per_s: training steps only
            epoch_metrics: dict[str, Any] = {"epochs_completed": state.epoch}
            epoch_metrics.update(epoch_end(EpochEnd(finished_epoch, epoch_finished, done, due)))
            val = {k: v for k, v in epoch_metrics.items() if k.startswith("val/")}
            if session.is_chief and val:
                tracker.log_metrics(val, step=state.optimizer_step)
                log.info("epoch %d validation: %s", finished_epoch + 1,
                         ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
            state.extra[EPOCH_METRICS] = epoch_metrics  # reported again on resume (see start_session)
            save(epoch_metrics)

    profiler.finish()
    if last_saved_step != state.optimizer_step:
        save({})
    writer.wait()  # the last checkpoint is uploaded before the worker says it is done
    if writer.waited_s > 0.5 and session.is_chief:
        log.info("training waited %.1f s in all for checkpoint uploads to end (one at a time)", writer.waited_s)
    tracker.close()


def preemption_coming(session: WorkerSession) -> bool:
    """Whether Ray Train saw a node of this run drained for preemption (a collective: every
    worker asks at the same step, and all get rank 0's answer)."""
    import ray.train

    info = ray.train.get_preemption_info()
    if info is None:
        return False
    if session.is_chief:
        left = (info.deadline_ms / 1000 - time.time()) if info.deadline_ms else None
        log.warning("node(s) %s of rank(s) %s preempted%s: saving step %d now", ", ".join(info.preempted_node_ids),
                    info.preempted_ranks, f", {left:.0f} s before the deadline" if left is not None else "",
                    session.state.optimizer_step)
    return True


def wait_for_restart(session: WorkerSession) -> None:
    """Idles until Ray Train ends these workers at the preemption's deadline (a worker that
    returned would end the run as finished)."""
    if session.is_chief:
        log.warning("step %d saved; waiting for the preempted node to go (the run then goes on from it)",
                    session.state.optimizer_step)
    while True:
        time.sleep(1.0)


def record_seen(batch: Mapping[str, Any], state: TrainState, ctx: WorkerContext) -> None:
    """Testing: appends the sample keys of a micro-batch (with its epoch, step, rank and this
    process) to the file ``CONVMAE_SEEN_KEYS_LOG`` names, so a test can check exactly-once
    data across restarts and resizes."""
    path = os.environ.get(SEEN_KEYS_ENV)
    if not path or "keys" not in batch:
        return
    import ray

    line = json.dumps({"attempt": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                       "world": ctx.world_size, "rank": ctx.rank, "epoch": state.epoch,
                       "step": state.optimizer_step + 1, "time": time.time(), "keys": list(batch["keys"])})
    with open(path, "a") as f:
        f.write(line + "\n")


def report_time_to_first_step(session: WorkerSession) -> None:
    """Logs how long after the job's start this session's first step ended (driver and rank 0
    wall clocks): Ray and worker start-up, engine build, checkpoint restore and the first batch."""
    if not session.is_chief or session.job_started_at is None:
        return
    seconds = time.time() - session.job_started_at
    log.info("first step %d done %.1f s after the job started", session.state.optimizer_step, seconds)
    session.tracker.log_metrics({"system/time_to_first_step_s": seconds}, step=session.state.optimizer_step)


def _continue_schedule_resharded(session: WorkerSession, schedule: Schedule, loader: Any, saved_world: int,
                                 grad_accum_steps: int) -> None:
    """Resuming on another number of workers than wrote the checkpoint: an epoch has another
    number of optimizer steps now, so the lr schedule goes on from the step of this schedule
    that leaves as many steps in the epoch as its (resharded) loader has batches for."""
    state = session.state
    steps_left = len(loader) // grad_accum_steps - loader.batches_consumed // grad_accum_steps
    equivalent = state.epoch * schedule.steps_per_epoch + max(0, schedule.steps_per_epoch - steps_left)
    state.schedule_offset = equivalent - state.optimizer_step
    state.micro_in_epoch = loader.batches_consumed  # of the resharded rest of the epoch
    if session.is_chief:
        log.info("resumed a checkpoint of %d worker(s) on %d at step %d: %d steps per epoch now, %d left in "
                 "epoch %d; the lr schedule goes on at its step %d of %d", saved_world, session.ctx.world_size,
                 state.optimizer_step, schedule.steps_per_epoch, steps_left, state.epoch + 1, equivalent,
                 schedule.total_steps)


def _timed(loader: Any, meter: ProgressMeter) -> Iterator[dict[str, Any]]:
    """The loader's batches, with the time spent waiting for each booked on ``meter``."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        meter.waited(time.perf_counter() - start)
        if batch is None:
            return
        yield batch


class LossWindow:
    """Sum and count of the losses since the last log step, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self._sums = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, count)
        self._last: torch.Tensor | None = None

    def add(self, loss: torch.Tensor) -> None:
        self._last = loss.detach()
        self._sums[0] += self._last.to(torch.float64)
        self._sums[1] += 1

    def last_loss(self) -> float:
        return float(self._last) if self._last is not None else float("nan")

    def mean_over_workers(self) -> float:
        """The window's mean loss over all workers (a collective); resets the window."""
        summed = all_reduce_sum(self._sums).cpu()
        self._sums.zero_()
        return float(summed[0] / max(float(summed[1]), 1.0))


def log_progress(session: WorkerSession, window: LossWindow, meter: ProgressMeter, lr: float, loader: Any,
                  epochs: int) -> None:
    """The progress line and step metrics (every rank calls this: the loss is averaged over workers)."""
    state = session.state
    mean_loss = window.mean_over_workers()
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"loss is {mean_loss} at step {state.optimizer_step}; lower train.blr")
    figures = meter.flush(state.optimizer_step)
    if not session.is_chief:
        return
    log.info(meter.line(epoch=state.epoch, epochs=epochs, step=state.optimizer_step, loss=mean_loss,
                        lr=lr, figures=figures))
    grad_norm = session.engine.grad_norm()
    compute = _compute_metrics(session, figures["images_per_s"])
    session.tracker.log_metrics(
        {"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": figures["images_per_s"],
         "train/step_time_s": figures["step_time_s"], "train/data_wait_frac": figures["data_wait_frac"],
         "train/epoch": state.epoch, "train/world_size": session.ctx.world_size,
         "data/corrupt_samples": loader.corrupt_samples,
         **({"train/grad_norm": grad_norm} if grad_norm is not None else {}), **compute,
         **_memory_metrics(session.ctx.device)},
        step=state.optimizer_step,
    )


def _compute_metrics(session: WorkerSession, images_per_s: float) -> dict[str, float]:
    """Achieved TFLOP/s per worker and, on GPUs with a known peak, MFU (dense bf16 peak)."""
    if not session.flops_per_image:
        return {}
    per_worker = session.flops_per_image * images_per_s / session.ctx.world_size
    metrics = {"train/tflops": per_worker / 1e12}
    peak = dense_bf16_peak_flops(session.ctx.device)
    if peak:
        metrics["train/mfu"] = per_worker / peak
    return metrics


def _memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "system/gpu_mem_allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
            "system/gpu_mem_reserved_gb": torch.cuda.memory_reserved(device) / 2**30,
            "system/gpu_mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        }
    try:
        import psutil

        return {"system/process_rss_gb": psutil.Process().memory_info().rss / 2**30}
    except ImportError:
        return {}


class _StepProfiler:
    """A torch.profiler trace of ``steps`` optimizer steps (after one warm-up step), logged to
    MLflow as ``profile/trace.json`` (Chrome trace format: chrome://tracing, Perfetto)."""

    def __init__(self, steps: int, tracker: Tracker) -> None:
        self._steps, self._left, self._tracker, self._profile, self._warmup = steps, steps, tracker, None, steps > 0

    def step(self) -> None:
        if self._left <= 0:
            return
        if self._warmup:  # the first step pays one-off costs (allocations, compilation)
            self._warmup = False
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(activities=activities, record_shapes=True)
            self._profile.__enter__()
            return
        self._left -= 1
        if self._left == 0:
            self.finish()

    def finish(self) -> None:
        if self._profile is None:
            return
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            profile.export_chrome_trace(str(path))
            self._tracker.log_artifact(path, "profile")
        log.info("profiled %d step(s): MLflow artifact profile/trace.json", self._steps - self._left)


def _maybe_inject_fault(step: int, rank: int) -> None:
    target = os.environ.get(FAULT_STEP_ENV)
    marker = os.environ.get(FAULT_MARKER_ENV)
    if target is None or marker is None or rank != 1 or step != int(target) or Path(marker).exists():
        return
    Path(marker).write_text(f"killed rank {rank} at step {step}\n")
    log.warning("fault injection: killing rank %d at step %d", rank, step)
    time.sleep(3.0)  # let the controller register the last reported checkpoint first
    os._exit(1)
