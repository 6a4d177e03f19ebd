"""The worker's training step against the bare model, side by side in one run, on one device.

    python benchmarks/train_step.py                                   # CPU: convmae_small, batch 8, fp32
    python benchmarks/train_step.py --precision bf16 --json
    python benchmarks/train_step.py --device cuda --compile --official ../shared/reference/official

Paths (each with its own copy of the same initial weights):

* ``service``: the step exactly as a Ray Train worker builds and runs it, without Ray (one
  process): ``PretrainConfig``, ``Engine.build`` (the generated DeepSpeed config, the engine and
  its dtype; ``--compile-service`` compiles the model as ``dist.compile`` does), then per
  micro-batch what ``loop.run_epochs`` does: ``engine.set_lr``, ``engine(images, mask_ratio=,
  generator=mask_generator(...))``, ``engine.backward_and_step``, the loss into the on-device
  ``LossWindow``, and ``log_progress`` (the loss to the host) at log steps.
* ``bare``: the model alone, autocast to ``--precision`` (no autocast in fp32) and fused torch
  AdamW (``param_groups`` as the service's; ``--bare-adamw default`` for torch's default AdamW),
  eager; ``bare_compiled`` the same under ``torch.compile`` (``--compile``).
* ``official``: the official ConvMAE code at the same size (``--official DIR``, a copy of
  ``../shared/reference/official``; 224 px only), autocast and fused AdamW as ``bare``.

A step is data + forward + backward + optimizer step. The timed steps of the paths are
interleaved (one step of each path in turn), so drifting machine load hits every path alike; each
step ends with a device synchronization. Per path: images/s (median step), achieved TFLOP/s
(forward+backward FLOPs of ``benchmarks/model_step.py``'s counter), MFU against the device's dense
bf16 peak (none on CPU), peak memory (CUDA), host time per step (until the step's Python code
returns) against device time per step (GPU kernel time, from the profiler; null on CPU), the
process's CPU time per step (all threads; with ``--threads 1`` on a busy shared machine steadier
than wall time, as idle OpenMP threads spin), and the aten ops, host syncs
(``aten::_local_scalar_dense``) and kernel launches of one profiled step. The profiled step runs
with one intra-op thread: with more, CPU kernels dispatch ops of their own (``cat`` a ``narrow``,
``slice`` and ``as_strided`` per input and thread chunk, which DeepSpeed's gradient flattening
pays per parameter tensor), so the count would follow the machine's core count instead of the
code: with one thread it is the same on every machine.

Synthetic images by default (one fixed CPU batch, copied to the device every step as the loader's
would be); ``--data URL`` reads batches from the real loader (``service.data.build_train_loader``,
shared by all paths in turn), so time spent waiting for data shows as ``data_ms``.
``--ds-set KEY=VALUE`` changes the generated DeepSpeed config (dotted keys, JSON values), to
measure alternatives: ``--ds-set bf16.check_grad_overflow=true``.

``--grad-norm-cost``: what the engine's own gradient norm (``service.runtime.engine.GradNorm``,
the ``train/grad_norm`` metric) costs: a second service path, ``service_no_norm``, built without
it (only what DeepSpeed computes itself), timed interleaved with ``service``; and the time spent
inside ``GradNorm`` per step in the ``service`` path (its hook and its work before and after
DeepSpeed's step, each ended with a device synchronization), against the service's median step;
with ``--ds-set zero_optimization.compute_grad_norm=true`` (no clipping) DeepSpeed's own
per-tensor ZeRO-1/2 norm, which the engine then reads, is timed in the same sum.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

import convmae  # noqa: E402
from service.config import (  # noqa: E402
    DataConfig,
    DistributedConfig,
    MLflowConfig,
    ModelConfig,
    PretrainConfig,
    TrainConfig,
)
from service.runtime.engine import Engine, deepspeed_config, fused_adamw  # noqa: E402
from service.runtime.flops import (  # noqa: E402
    count_step_flops,
    dense_bf16_peak_flops,
    grouped_conv_backward_flop,
)
from service.runtime.optim import lr_at, param_groups  # noqa: E402
from service.runtime.worker import worker_context  # noqa: E402
from service.tracking import NullTracker  # noqa: E402
from service.training.checkpoints import TrainState  # noqa: E402

# The worker loop's pieces (the loop is service.training.loop.run_epochs).
from service.training.loop import LossWindow, WorkerSession, log_progress  # noqa: E402
from service.training.pretrain_worker import mask_generator  # noqa: E402
from service.training.progress import ProgressMeter  # noqa: E402

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp32": None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, choices=sorted(convmae.PRESETS),
                   help="default: convmae_base on CUDA, convmae_small on CPU")
    p.add_argument("--img-size", type=int, default=None, help="default: the preset's (224)")
    p.add_argument("--batch-size", type=int, default=None, help="per step; default 128 on CUDA, 8 on CPU")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--precision", default=None, choices=sorted(AUTOCAST_DTYPES),
                   help="default: what the service uses on the device (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--zero-stage", type=int, default=DistributedConfig.zero_stage, choices=[0, 1, 2, 3])
    p.add_argument("--ds-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the generated DeepSpeed config (JSON value); repeatable")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per path first")
    p.add_argument("--compile", action="store_true", help="also time the bare model under torch.compile")
    p.add_argument("--bare-adamw", default="fused", choices=["fused", "default"],
                   help="the bare paths' optimizer: torch's fused AdamW, or torch's default implementation "
                        "(a loop per tensor on CPU, foreach on CUDA)")
    p.add_argument("--official", default=None, metavar="DIR",
                   help="also time the official code (a copy of ../shared/reference/official)")
    p.add_argument("--data", default=None, metavar="URL", help="read the real loader instead of synthetic images")
    p.add_argument("--loader-workers", type=int, default=DataConfig.loader_workers)
    p.add_argument("--compile-service", action="store_true",
                   help="service: torch.compile the model in the engine (dist.compile, on by default on GPU)")
    p.add_argument("--log-every", type=int, default=TrainConfig.log_every_steps, help="service log steps")
    p.add_argument("--no-service", action="store_true", help="skip the service path")
    p.add_argument("--grad-norm-cost", action="store_true",
                   help="also time the service without the engine's gradient norm (path service_no_norm), "
                        "and the time spent computing the norm per step")
    p.add_argument("--top-ops", type=int, default=0, metavar="N",
                   help="also list each path's N most frequent aten ops (JSON: paths.*.top_ops)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("convmae_base" if cuda else "convmae_small")
    args.batch_size = args.batch_size or (128 if cuda else 8)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    return args


# ---------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def profile_step(step: Callable[[], None], device: torch.device, top: int = 0) -> dict[str, Any]:
    """aten ops, host syncs, kernel launches and device time of one step (torch.profiler);
    ``top``: also the ``top`` most frequent aten ops with their counts."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the count of the code, not of the core count (module docstring)
    try:
        _sync(device)
        with profile(activities=activities) as prof:
            step()
            _sync(device)
    finally:
        torch.set_num_threads(threads)
    events = prof.events()
    out: dict[str, Any] = {
        "aten_ops": sum(1 for e in events if e.name.startswith("aten::")),
        "host_syncs": sum(1 for e in events if e.name == "aten::_local_scalar_dense"),
        "kernel_launches": None,
        "device_ms": None,
    }
    if top:
        counts = Counter(e.name for e in events if e.name.startswith("aten::"))
        out["top_ops"] = counts.most_common(top)
    if device.type == "cuda":
        out["kernel_launches"] = sum(1 for e in events if "LaunchKernel" in e.name)
        out["device_ms"] = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    return out


@dataclasses.dataclass
class PathRun:
    """One path: its step, its FLOPs per step and what was measured."""

    name: str
    step: Callable[[torch.Tensor], None]  # one training step on a CPU batch of fp32 images
    flops_per_step: int | None = None
    note: str = ""
    resident_bytes: int = 0  # device memory the path holds between steps (weights, optimizer)
    step_s: list[float] = dataclasses.field(default_factory=list)
    host_s: list[float] = dataclasses.field(default_factory=list)
    cpu_s: list[float] = dataclasses.field(default_factory=list)
    data_s: list[float] = dataclasses.field(default_factory=list)
    profile: dict[str, Any] = dataclasses.field(default_factory=dict)
    peak_bytes: int | None = None
    model: torch.nn.Module | None = None  # the eager model, for the FLOP count
    engine: Any = None


class Batches:
    """Synthetic: the same CPU batch every time. ``--data``: the real loader, epoch after epoch."""

    def __init__(self, args: argparse.Namespace, img_size: int, pin: bool) -> None:
        self.args, self.img_size, self.epoch, self.iterator = args, img_size, 0, None
        self.loader: Any = None
        if args.data is None:
            g = torch.Generator().manual_seed(args.seed)
            images = torch.randn(args.batch_size, 3, img_size, img_size, generator=g)
            self.fixed = images.pin_memory() if pin else images
        else:
            self.data_cfg = DataConfig(url=args.data, loader_workers=args.loader_workers)

    def next(self) -> torch.Tensor:
        if self.args.data is None:
            return self.fixed
        from service.data import build_train_loader

        while True:
            if self.iterator is None:
                self.loader = build_train_loader(
                    self.data_cfg, img_size=self.img_size, batch_size=self.args.batch_size, rank=0,
                    world_size=1, seed=self.args.seed, epoch=self.epoch)
                self.iterator = iter(self.loader)
                self.epoch += 1
            try:
                return next(self.iterator)["images"]
            except StopIteration:
                self.iterator = None

    def state_dict(self) -> dict[str, Any]:  # what the loop records at each optimizer step
        return self.loader.state_dict() if self.loader is not None else {}

    @property
    def corrupt_samples(self) -> int:
        return self.loader.corrupt_samples if self.loader is not None else 0


# ---------------------------------------------------------------- the paths


def bare_path(name: str, model: torch.nn.Module, cfg: PretrainConfig, args: argparse.Namespace,
              device: torch.device, lr: float, compiled: bool = False,
              official: bool = False) -> PathRun:
    """The model alone: autocast + fused AdamW, as a plain PyTorch training script would."""
    model = model.to(device).train()
    groups = param_groups(model, cfg.train.weight_decay)
    if args.bare_adamw == "fused":
        optimizer = fused_adamw(groups, lr=lr, betas=cfg.train.betas)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.train.betas, eps=1e-8)
    forward = torch.compile(model) if compiled else model
    counter = iter(range(2**62))

    def step(batch: torch.Tensor) -> None:
        images = batch.to(device, non_blocking=True)
        with _autocast(device, args.precision):
            if official:  # the official code draws its masks from the global generator
                loss, _, _ = forward(images, mask_ratio=args.mask_ratio)
            else:
                loss, _, _ = forward(images, mask_ratio=args.mask_ratio,
                                     generator=mask_generator(cfg.train.seed, 0, next(counter)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return PathRun(name, step, model=model)


def official_model(directory: str, name: str, cfg: convmae.ConvMAEConfig) -> torch.nn.Module:
    """The official ``MaskedAutoencoderConvViT`` at the size of preset ``name`` (224 px only)."""
    from functools import partial

    sys.path.insert(0, str(Path(directory).resolve()))
    import models_convmae  # the official file, imported from DIR

    if name == "convmae_base":
        return models_convmae.convmae_convvit_base_patch16(norm_pix_loss=cfg.norm_pix_loss)
    return models_convmae.MaskedAutoencoderConvViT(
        img_size=[cfg.img_size, cfg.img_size // 4, cfg.img_size // 8], patch_size=list(cfg.patch_sizes),
        embed_dim=list(cfg.embed_dims), depth=list(cfg.depths), num_heads=cfg.num_heads,
        decoder_embed_dim=cfg.decoder_embed_dim, decoder_depth=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_num_heads, mlp_ratio=list(cfg.mlp_ratios),
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), norm_pix_loss=cfg.norm_pix_loss,
    )


def official_flops(model: torch.nn.Module, images: torch.Tensor, args: argparse.Namespace,
                   device: torch.device) -> int:
    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.convolution_backward: grouped_conv_backward_flop})
    with counter:
        with _autocast(device, args.precision):
            loss, _, _ = model(images, mask_ratio=args.mask_ratio)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _single_process_env() -> None:
    """What Ray Train sets up for a worker's process group, for one process."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


class NormTimer:
    """Seconds spent inside ``GradNorm`` (its optimizer hook, before and after the step) per
    optimizer step: its methods are wrapped, for this process, before the engines are built."""

    def __init__(self, device: torch.device) -> None:
        from service.runtime.engine import GradNorm

        self.device, self.pending, self.per_step = device, (0.0, 0.0), []  # (wall, CPU) seconds
        for name in ("_add_partitions", "before_step", "after_step"):
            setattr(GradNorm, name, self._timed(getattr(GradNorm, name), last=name == "after_step"))

    def watch(self, engine: Engine) -> None:
        """Also times DeepSpeed's own ZeRO-1/2 norm in this engine (``--ds-set
        zero_optimization.compute_grad_norm=true``: GradNorm then reads DeepSpeed's)."""
        optimizer = engine.ds_engine.optimizer
        if hasattr(optimizer, "scaled_global_norm"):
            optimizer.scaled_global_norm = self._timed(optimizer.scaled_global_norm, last=False)

    def _timed(self, method: Callable[..., Any], last: bool) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            _sync(self.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            out = method(*a, **kw)
            _sync(self.device)
            wall, cpu = self.pending
            self.pending = (wall + time.perf_counter() - start, cpu + time.process_time() - cpu_start)
            if last:  # the step's norm is complete
                self.per_step.append(self.pending)
                self.pending = (0.0, 0.0)
            return out
        return wrapper


def service_path(cfg: PretrainConfig, args: argparse.Namespace, batches: Batches, name: str = "service",
                 grad_norm: bool = True, norm_timer: NormTimer | None = None) -> tuple[PathRun, dict]:
    """The step as ``pretrain_worker.train_worker`` builds it and ``loop.run_epochs`` runs it
    (one worker, no Ray): the same engine, lr setting, forward, backward/step, loss window on
    the device and progress logging at log steps."""
    _single_process_env()
    ctx = worker_context()
    use_gpu = ctx.device.type == "cuda"
    t, m = cfg.train, cfg.model
    lr = cfg.learning_rate
    # The driver's resolve_precision refuses bf16 on CPU (CPU training runs fp32); the benchmark
    # asks for it on purpose, to see DeepSpeed's bf16 host work on a machine without a GPU.
    ds_config = deepspeed_config(cfg, use_gpu=use_gpu, precision=args.precision, lr=lr)
    for item in args.ds_set:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        _set_dotted(ds_config, key, value)
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = convmae.build_model(m.name, img_size=m.img_size, norm_pix_loss=m.norm_pix_loss)
    engine = Engine.build(model, cfg, use_gpu=use_gpu, precision=args.precision, lr=lr, ds_config=ds_config,
                          compile_model=args.compile_service, grad_norm=grad_norm)
    if norm_timer is not None:
        norm_timer.watch(engine)
    session = WorkerSession(ctx, engine, TrainState(), NullTracker(), lr)
    state = session.state
    total_steps = 10**9
    meter = ProgressMeter(total_steps=total_steps)
    window = LossWindow(ctx.device)
    images_per_micro = t.batch_size_per_worker * ctx.world_size

    def step(batch: torch.Tensor) -> None:
        images = batch.to(ctx.device, dtype=session.dtype, non_blocking=True)
        lr_now = lr_at(state.optimizer_step, base_lr=lr, min_lr=t.min_lr, warmup_steps=args.warmup + args.steps,
                       total_steps=total_steps)
        engine.set_lr(lr_now)
        loss, _, _ = engine(images, mask_ratio=m.mask_ratio, generator=mask_generator(t.seed, ctx.rank, state.micro_step))
        boundary = engine.backward_and_step(loss)
        window.add(loss)
        state.micro_step += 1
        meter.update(images_per_micro, steps=0)
        if not boundary:
            return
        state.optimizer_step += 1
        meter.update(0, steps=1)
        if state.optimizer_step % t.log_every_steps == 0:
            log_progress(session, window, meter, lr_now, batches, t.epochs)

    return PathRun(name, step, engine=engine.ds_engine), ds_config


def service_config(args: argparse.Namespace, img_size: int) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(name=args.model, img_size=img_size, mask_ratio=args.mask_ratio),
        train=TrainConfig(batch_size_per_worker=args.batch_size, seed=args.seed, log_every_steps=args.log_every),
        dist=DistributedConfig(num_workers=1, zero_stage=args.zero_stage, precision=args.precision),
        mlflow=MLflowConfig(enabled=False),
    ).validate()


# ---------------------------------------------------------------- the run


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    model_cfg = convmae.get_config(args.model)
    img_size = args.img_size or model_cfg.img_size
    cfg = service_config(args, img_size)
    batches = Batches(args, img_size, pin=device.type == "cuda")
    lr = cfg.learning_rate

    def build(path_fn: Callable[[], PathRun]) -> PathRun:
        before = _allocated(device)
        path = path_fn()
        path.resident_bytes = -before  # completed after the warm-up steps
        return path

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(cfg.train.seed)
        return convmae.build_model(args.model, img_size=img_size, norm_pix_loss=cfg.model.norm_pix_loss)

    paths: list[PathRun] = [build(lambda: bare_path("bare", fresh_model(), cfg, args, device, lr))]
    if args.compile:
        paths.append(build(lambda: bare_path("bare_compiled", fresh_model(), cfg, args, device, lr,
                                             compiled=True)))
    official_note = None
    if args.official:
        if img_size != 224:
            official_note = f"skipped: the official code runs at 224 px only (--img-size {img_size})"
        else:
            torch.manual_seed(cfg.train.seed)
            paths.append(build(lambda: bare_path(
                "official", official_model(args.official, args.model, model_cfg), cfg, args, device, lr,
                official=True)))
    ds_config = None
    norm_timer = NormTimer(device) if args.grad_norm_cost and not args.no_service else None
    if not args.no_service:
        def make_service() -> PathRun:
            nonlocal ds_config
            path, ds_config = service_path(cfg, args, batches, norm_timer=norm_timer)
            return path

        paths.append(build(make_service))
        if norm_timer is not None:
            paths.append(build(lambda: service_path(cfg, args, batches, name="service_no_norm",
                                                    grad_norm=False)[0]))

    def timed(path: PathRun) -> None:
        _sync(device)
        cpu_start = time.process_time()
        start = time.perf_counter()
        batch = batches.next()
        fetched = time.perf_counter()
        path.step(batch)
        returned = time.perf_counter()
        _sync(device)
        end = time.perf_counter()
        path.cpu_s.append(time.process_time() - cpu_start)
        path.data_s.append(fetched - start)
        path.host_s.append(returned - fetched)
        path.step_s.append(end - start)

    # Warm-up (compilation, DeepSpeed's first-step set-up), then each path's resident memory.
    for path in paths:
        for _ in range(args.warmup):
            path.step(batches.next())
        _sync(device)
        path.resident_bytes += _allocated(device)
    # One profiled step per path: ops, host syncs, launches, device time.
    for path in paths:
        batch = batches.next()
        path.profile = profile_step(lambda p=path, b=batch: p.step(b), device, args.top_ops)
    # Timed steps, interleaved.
    if norm_timer is not None:
        norm_timer.per_step.clear()  # the timed steps' only
    for _ in range(args.steps):
        for path in paths:
            timed(path)
    norm_s = list(norm_timer.per_step) if norm_timer is not None else []
    # Peak memory of one more step per path (CUDA): the step's own peak above what all paths
    # hold, plus what this path holds.
    if device.type == "cuda":
        for path in paths:
            batch = batches.next()
            _sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            path.step(batch)
            _sync(device)
            path.peak_bytes = torch.cuda.max_memory_allocated(device) - base + path.resident_bytes

    # FLOPs (of the eager models; torch.compile'd graphs are invisible to the counter).
    images = batches.next().to(device)
    autocast_dtype = AUTOCAST_DTYPES[args.precision]
    ours_flops = None
    for path in paths:
        if path.name == "official":
            path.flops_per_step = official_flops(path.model, images, args, device)
        elif path.name == "bare":
            _, ours_flops = count_step_flops(path.model, images, args.mask_ratio, device, autocast_dtype,
                                             custom=True)
    for path in paths:
        if path.name != "official":
            path.flops_per_step = ours_flops

    peak = dense_bf16_peak_flops(device)
    results = {path.name: _summary(path, args.batch_size, peak) for path in paths}
    bare, service = results["bare"], results.get("service")
    out: dict[str, Any] = {
        "model": args.model,
        "img_size": img_size,
        "batch_size": args.batch_size,
        "mask_ratio": args.mask_ratio,
        "precision": args.precision,
        "device": _describe(device),
        "zero_stage": args.zero_stage,
        "compile_service": args.compile_service,
        "bare_adamw": args.bare_adamw,
        "data": args.data or "synthetic",
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": peak / 1e12 if peak else None,
        "bare_img_per_s": bare["img_per_s"],
        "service_img_per_s": service["img_per_s"] if service else None,
        "service_over_bare": service["img_per_s"] / bare["img_per_s"] if service else None,
        # The same ratio in the process's CPU time per step (bare's over the service's).
        "service_over_bare_cpu": bare["cpu_ms"] / service["cpu_ms"] if service else None,
        "ops_per_step_bare": bare["aten_ops"],
        "ops_per_step_service": service["aten_ops"] if service else None,
        "ops_service_over_bare": service["aten_ops"] / bare["aten_ops"] if service else None,
        "mfu": service["mfu"] if service else None,
        "paths": results,
        "deepspeed_config": ds_config,
    }
    if official_note:
        out["official"] = official_note
    if norm_timer is not None:
        without = results["service_no_norm"]
        norm_ms = statistics.median(w for w, _ in norm_s) * 1e3 if norm_s else None
        norm_cpu_ms = statistics.median(c for _, c in norm_s) * 1e3 if norm_s else None
        out["grad_norm"] = {
            # Time inside GradNorm per timed step (median), and its share of the service's step;
            # the same in the process's CPU time (steadier on a busy machine, with one thread).
            "norm_ms": norm_ms,
            "norm_share_of_step": norm_ms / service["step_ms"] if norm_ms is not None else None,
            "norm_cpu_ms": norm_cpu_ms,
            "norm_cpu_share_of_step": norm_cpu_ms / service["cpu_ms"] if norm_cpu_ms is not None else None,
            # The A/B of whole steps (noisy on a shared machine; the op count is not).
            "step_ratio": service["step_ms"] / without["step_ms"],
            "cpu_ratio": service["cpu_ms"] / without["cpu_ms"],
            "extra_aten_ops": service["aten_ops"] - without["aten_ops"],
        }

    for path in paths:  # free the models and engines (the process group stays)
        path.model = path.engine = None
    gc.collect()
    return out


def _summary(path: PathRun, batch_size: int, peak: float | None) -> dict[str, Any]:
    step = statistics.median(path.step_s)
    achieved = path.flops_per_step / step if path.flops_per_step else None
    return {
        "img_per_s": batch_size / step,
        "step_ms": step * 1e3,
        "step_ms_all": [round(s * 1e3, 2) for s in path.step_s],
        "host_ms": statistics.median(path.host_s) * 1e3,
        "cpu_ms": statistics.median(path.cpu_s) * 1e3,
        "device_ms": path.profile.get("device_ms"),
        "data_ms": statistics.median(path.data_s) * 1e3,
        "tflop_per_s": achieved / 1e12 if achieved else None,
        "gflop_per_image": path.flops_per_step / batch_size / 1e9 if path.flops_per_step else None,
        "mfu": achieved / peak if achieved and peak else None,
        "peak_memory_bytes": path.peak_bytes,
        "aten_ops": path.profile.get("aten_ops"),
        "host_syncs": path.profile.get("host_syncs"),
        "kernel_launches": path.profile.get("kernel_launches"),
        **({"top_ops": path.profile["top_ops"]} if "top_ops" in path.profile else {}),
    }


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(r: dict[str, Any]) -> str:
    lines = [
        f"model {r['model']} | img {r['img_size']} | batch {r['batch_size']} | mask ratio {r['mask_ratio']} "
        f"| precision {r['precision']} | ZeRO-{r['zero_stage']} | data {r['data']}",
        f"device {r['device']} | dense bf16 peak {_fmt(r['peak_tflops'], '.0f')} TFLOP/s | median of "
        f"{r['steps']} steps after {r['warmup']} warm-up",
        f"{'path':<14} {'img/s':>8} {'step ms':>8} {'host ms':>8} {'dev ms':>8} {'cpu ms':>8} {'data ms':>8} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'aten ops':>9} {'syncs':>6} {'launches':>9}",
    ]
    for name, p in r["paths"].items():
        peak_gib = p["peak_memory_bytes"] / 2**30 if p["peak_memory_bytes"] is not None else None
        lines.append(
            f"{name:<14} {p['img_per_s']:8.1f} {p['step_ms']:8.1f} {p['host_ms']:8.1f} "
            f"{_fmt(p['device_ms'], '8.1f'):>8} {p['cpu_ms']:8.1f} {p['data_ms']:8.1f} "
            f"{_fmt(p['tflop_per_s'], '8.3f'):>8} "
            f"{_fmt(p['mfu'], '6.1%'):>6} {_fmt(peak_gib, '9.2f'):>9} {_fmt(p['aten_ops'], '9d'):>9} "
            f"{_fmt(p['host_syncs'], '6d'):>6} {_fmt(p['kernel_launches'], '9d'):>9}"
        )
    if r["service_over_bare"] is not None:
        lines.append(f"service / bare: {r['service_over_bare']:.3f} of the images/s "
                     f"({r['service_over_bare_cpu']:.3f} by CPU time per step), "
                     f"{r['ops_service_over_bare']:.3f}x the aten ops per step")
    if r.get("official"):
        lines.append(f"official: {r['official']}")
    if r.get("grad_norm"):
        g = r["grad_norm"]
        lines.append(f"grad norm: {_fmt(g['norm_ms'], '.3f')} ms per step inside GradNorm "
                     f"({_fmt(g['norm_share_of_step'], '.2%')} of the service's step; CPU time "
                     f"{_fmt(g['norm_cpu_ms'], '.3f')} ms, {_fmt(g['norm_cpu_share_of_step'], '.2%')}); "
                     f"service / service_no_norm: "
                     f"{g['step_ratio']:.3f} step time, {g['cpu_ratio']:.3f} CPU time, "
                     f"{g['extra_aten_ops']:+d} aten ops per step")
    for name, p in r["paths"].items():
        if p.get("top_ops"):
            lines.append(f"{name}: most frequent aten ops: "
                         + ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in p["top_ops"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result) if args.json else report(result), flush=True)
    return result


if __name__ == "__main__":
    main()
