"""All distributed setup lives here: Ray start-up, worker context, DeepSpeed engine, collectives.

Model and data code never ask for ranks; the train loop asks this module once and passes
rank and world size down.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.config import ConfigError, PretrainConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- driver side


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Joins the cluster at ``address`` / ``RAY_ADDRESS``, or starts a local one on this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        _start_local_ray(num_cpus, kwargs)


def _start_local_ray(num_cpus: int | None, kwargs: dict[str, Any]) -> None:
    """A local cluster whose own actors can find it.

    Ray Train frees the worker placement group of a trial that Tune stops early through the
    state API (served by the dashboard) at the address the actor finds by itself, which fails
    when another Ray instance runs on the same machine. So the GCS port is chosen here and
    handed to every process as RAY_ADDRESS; and actors import this checkout's packages even
    when it is not pip-installed.
    """
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
        "RAY_ADDRESS": f"127.0.0.1:{port}",
    }
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=True, runtime_env={"env_vars": env}, **kwargs)
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(cfg: PretrainConfig) -> bool:
    """``dist.use_gpu: null`` means: use GPUs when the cluster has them."""
    use_gpu = cfg.dist.use_gpu if cfg.dist.use_gpu is not None else cluster_has_gpus()
    if use_gpu and not cluster_has_gpus():
        raise ConfigError("dist.use_gpu=true but the Ray cluster has no GPUs; set dist.use_gpu=false")
    if cfg.dist.offload_optimizer and not use_gpu:
        raise ConfigError(
            "dist.offload_optimizer=true needs GPU workers (it moves optimizer state from GPU "
            "to CPU memory); set dist.offload_optimizer=false for CPU training"
        )
    return use_gpu


def resolve_precision(cfg: PretrainConfig, use_gpu: bool) -> str:
    precision = cfg.dist.precision
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if not use_gpu and precision != "fp32":
        raise ConfigError(f"dist.precision={precision!r} needs GPUs; CPU training runs in fp32")
    return precision


def scaling_config(cfg: PretrainConfig, use_gpu: bool):
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": cfg.dist.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.dist.gpus_per_worker
    return ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def deepspeed_config(cfg: PretrainConfig, *, use_gpu: bool, precision: str, lr: float) -> dict[str, Any]:
    """The DeepSpeed JSON config, generated from our config (never hand-written per run)."""
    t, d = cfg.train, cfg.dist
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if use_gpu:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_scatter=True)
    else:
        # gloo has no reduce_scatter; all-reduce instead and keep CPU runs simple.
        zero.update(overlap_comm=False, contiguous_gradients=False, reduce_scatter=False)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size_per_worker,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size_per_worker * t.grad_accum_steps * d.num_workers,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        # CPU runs pass torch's AdamW as a client optimizer (DeepSpeed's fused Adam is CUDA-only).
        "zero_allow_untested_optimizer": True,
    }
    if t.clip_grad is not None:
        config["gradient_clipping"] = t.clip_grad
    if use_gpu:
        # DeepSpeed's own AdamW: FusedAdam on GPU, DeepSpeedCPUAdam with offload.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay},
        }
    return config


# ---------------------------------------------------------------- worker side


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def worker_context() -> WorkerContext:
    """Rank, world size and device of this Ray Train worker (or a single local process)."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    except Exception:  # not inside Ray Train: a single-process run (benchmarks, notebooks)
        rank, world, local = 0, 1, 0
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return WorkerContext(rank=rank, world_size=world, local_rank=local, device=device)


def _decays(model: torch.nn.Module) -> Any:
    """``(name, param) -> bool``: no decay on norms, biases, position embeddings, mask tokens."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    return lambda name, p: not (p.ndim <= 1 or name in skip or name.endswith(".bias"))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on norms, biases, position embeddings and mask tokens."""
    decays = _decays(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def layer_decay_param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """Fine-tuning groups with layer-wise lr decay (BEiT/MAE/ConvMAE ``param_groups_lrd``).

    ``model`` is a ``ConvMAEBackbone``: parameter ``name`` sits at layer
    ``model.layer_groups()[name]`` (0 = conv stages and embeddings, i = transformer block i - 1,
    ``num_layers`` = head) and its lr is scaled by ``layer_decay ** (num_layers - layer)``,
    recorded as the group's ``lr_scale``: whoever sets the lr multiplies by it. Weight decay
    follows ``param_groups``.
    """
    num_layers = model.num_layers
    layer_of = model.layer_groups()
    decays = _decays(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decay = layer_of[name], decays(name, p)
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers - layer),
        })
        group["params"].append(p)
    return [groups[key] for key in sorted(groups)]


def build_engine(model: torch.nn.Module, cfg: PretrainConfig, ds_config: dict[str, Any], lr: float,
                 groups: list[dict[str, Any]] | None = None):
    """A DeepSpeed engine over ``model``; the process group is the one Ray Train set up.

    ``groups``: the optimizer's parameter groups (default ``param_groups``); fine-tuning passes
    ``layer_decay_param_groups``. ``cfg`` needs ``train.weight_decay`` and ``train.betas``.
    """
    import deepspeed

    if not torch.distributed.is_initialized():
        # Single process outside Ray Train (a benchmark or notebook).
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if groups is None:
        groups = param_groups(model, cfg.train.weight_decay)
    if "optimizer" in ds_config:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.train.betas, eps=1e-8)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def engine_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    if ds_config["bf16"]["enabled"]:
        return torch.bfloat16
    if ds_config["fp16"]["enabled"]:
        return torch.float16
    return torch.float32


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over workers (identity in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def all_reduce_max(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.long, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def all_gather_tensors(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` (same trailing shape, any leading length) from all workers on dim 0."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    world = torch.distributed.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)], dim=0)
