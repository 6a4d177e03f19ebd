"""The engine boundary: everything DeepSpeed-specific lives behind ``Engine``.

The training loops, checkpoints and exports speak to ``Engine`` only: build it from our config,
run forward, backward and (at accumulation boundaries) the optimizer step, set the lr, save and
load its state into a checkpoint folder, and read the consolidated fp32 weights back from such
a folder. Swapping the engine (FSDP2, ...) or compiling the model changes this module alone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.config import TrainingJobConfig
from service.runtime.logs import DEEPSPEED_PRINTS, DEEPSPEED_PROGRESS_BARS, dropping_printed_lines
from service.runtime.optim import param_groups
from service.runtime.safe_checkpoint import (
    DamagedCheckpointError,
    safe_load,
    verify_checkpoint,
    weights_only_loads,
)
from service.runtime.worker import world_size

log = logging.getLogger(__name__)

# The engine's sub-folder of a checkpoint folder (DeepSpeed's "tag"): Ray Train gives every
# checkpoint its own folder, so one fixed tag per folder is enough.
ENGINE_STATE_DIR = "ds"
# The optimizer shards of a partitioned optimizer, one per data-parallel rank: ZeRO-1/2/3, and
# DeepSpeed's bf16 optimizer at ZeRO-0 (which partitions its fp32 master weights too).
_OPTIMIZER_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def deepspeed_config(cfg: TrainingJobConfig, *, use_gpu: bool, precision: str, lr: float) -> dict[str, Any]:
    """The DeepSpeed JSON config, generated from our config (never hand-written per run)."""
    t, d = cfg.train, cfg.dist
    zero: dict[str, Any] = {"stage": d.zero_stage}
    # Overlapping the gradient reduction with the backward pass (and the contiguous buckets and
    # reduce-scatter that go with it) pays only when there is something to communicate: more than
    # one GPU worker. With one they only add per-parameter copies (benchmarks/train_step.py, CPU
    # bf16, convmae_small, batch 8: 16,481 aten ops per step with contiguous_gradients, 13,996
    # without), and the H200 ZeRO-2 step went from 882 to 1338 img/s with them off. gloo (CPU)
    # has no reduce_scatter.
    overlap = use_gpu and d.num_workers > 1
    zero.update(overlap_comm=overlap, contiguous_gradients=overlap, reduce_scatter=overlap)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    elif t.clip_grad is None and d.zero_stage in (1, 2):
        # Without clipping DeepSpeed's step needs no gradient norm, which ZeRO-1/2 otherwise
        # compute tensor by tensor (a norm, a cast and a copy per parameter tensor): measured with
        # benchmarks/train_step.py --grad-norm-cost (convmae_tiny 96 px, batch 32, CPU fp32, one
        # thread) 3.0 ms of CPU time per step, 2.3% of the step, and +1,170 aten ops on 4,138.
        # The engine takes the train/grad_norm metric from the flat gradient partitions instead
        # (GradNorm: 0.4%).
        zero["compute_grad_norm"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size_per_worker,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size_per_worker * t.grad_accum_steps * d.num_workers,
        "zero_optimization": zero,
        # DeepSpeed's bf16 mode (bf16 weights and gradients, fp32 master weights in the ZeRO
        # optimizer), not its "torch_autocast" mode (fp32 weights under torch.autocast): measured
        # with benchmarks/train_step.py (CPU bf16, convmae_small, batch 8, ZeRO-2) autocast casts
        # the fp32 weights to bf16 again at every forward (16,429 aten ops per step against
        # 13,996) and keeps weights and gradients in fp32 (twice the bytes).
        # check_grad_overflow: DeepSpeed 0.19 checks every gradient tensor for inf/NaN before each
        # step (isfinite/amax/amin/... and a host sync per tensor: 30,682 against the bare model's
        # 12,003 aten ops per step), which bf16, with fp32's exponent range and no loss scale, does
        # not need; a non-finite loss still stops the run in the training loop.
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        # CPU runs pass torch's AdamW as a client optimizer (DeepSpeed's fused Adam is CUDA-only).
        "zero_allow_untested_optimizer": True,
        # Always written: DeepSpeed's default is to clip at 1.0, and train.clip_grad=null means none.
        "gradient_clipping": t.clip_grad if t.clip_grad is not None else 0.0,
    }
    if use_gpu:
        # DeepSpeed's own AdamW: FusedAdam on GPU, DeepSpeedCPUAdam with offload.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay},
        }
    return config


def fused_adamw(groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel (CUDA, and CPU since torch 2.4), else the default one.

    The default on CPU is a loop of element-wise ops per tensor: on the ZeRO partitions of
    convmae_small (CPU, bf16 engine, batch 8) its step took 184 ms against 20 ms fused
    (benchmarks/train_step.py, profiled).
    """
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for these tensors in this torch
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def engine_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype of the engine's weights, and so of the inputs it takes."""
    if ds_config["bf16"]["enabled"]:
        return torch.bfloat16
    if ds_config["fp16"]["enabled"]:
        return torch.float16
    return torch.float32


class GradNorm:
    """The global 2-norm of the averaged, unscaled gradient of each optimizer step, where
    DeepSpeed computes none: at ZeRO-1/2 without clipping (``compute_grad_norm: false``) and at
    ZeRO-0 without a mixed-precision optimizer (fp32; DeepSpeed's fp32 clipping computes a norm
    and drops it). DeepSpeed's own per-tensor norm where it computes one anyway (ZeRO-3, bf16 and
    fp16 at ZeRO-0, ZeRO-1/2 with clipping or optimizer offload).

    ZeRO-1/2: a step pre-hook on the wrapped torch optimizer, which DeepSpeed steps once per
    parameter group with that group's flat fp32 gradient partition (unscaled, unclipped: clipping
    is off here): one norm per group and worker, then one all_reduce of the squared sum over the
    data-parallel group. Each element of the gradient lies in exactly one worker's partition
    (the last one's zero padding adds nothing). ZeRO-0 fp32: the module's gradients before the
    step (averaged over workers by DeepSpeed's backward, not yet clipped), one ``_foreach_norm``
    over them, nothing to communicate. The result stays on the device until it is read (at log
    steps). Its cost, measured with ``benchmarks/train_step.py --grad-norm-cost`` (CPU fp32,
    ZeRO-2, one worker, one thread, 2026-12-07 on the project's 2-core machine; CPU time per
    step): convmae_tiny 96 px batch 32 0.33 ms, 0.40% of the step, +40 aten ops on 4,138
    (DeepSpeed's own per-tensor norm, timed alike: 3.0 ms, 2.3%, +1,170 ops); convmae_small
    224 px batch 8 20.5 ms, 0.62% of a 3.3 s step (DeepSpeed's: 76 ms, 2.2%, +3,250 ops).
    """

    def __init__(self, ds_engine: Any) -> None:
        self.ds_engine = ds_engine
        self._value: torch.Tensor | None = None
        self._squares: list[torch.Tensor] = []
        optimizer = ds_engine.optimizer
        self.partitions = getattr(optimizer, "compute_grad_norm", True) is False
        # Where DeepSpeed's optimizer keeps a norm of its own (it computes one every step).
        self.own = self.partitions or not hasattr(optimizer, "_global_grad_norm")
        if self.partitions:
            optimizer.optimizer.register_step_pre_hook(self._add_partitions)

    @torch.no_grad()
    def _add_partitions(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            self._squares.append(torch.stack(torch._foreach_norm(grads)).float().square().sum())

    @torch.no_grad()
    def before_step(self) -> None:
        """At an accumulation boundary, before DeepSpeed's step."""
        self._squares = []
        if self.partitions or not self.own:
            return
        grads = [p.grad for p in self.ds_engine.module.parameters() if p.grad is not None]
        if grads:
            self._value = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())

    @torch.no_grad()
    def after_step(self) -> None:
        """At an accumulation boundary, after DeepSpeed's step (a collective at ZeRO-1/2)."""
        if not self.partitions:
            return
        if getattr(self.ds_engine.optimizer, "overflow", False):  # fp16: no step was taken
            self._value = torch.tensor(float("inf"))
            return
        total = torch.stack(self._squares).sum() if self._squares else torch.zeros((), device=self.ds_engine.device)
        group = self.ds_engine.optimizer.dp_process_group
        if torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(total, group=group)
        self._value = total.sqrt()
        self._squares = []

    def value(self) -> float | None:
        if not self.own:
            norm = self.ds_engine.get_global_grad_norm()
            return None if norm is None else float(norm)
        return None if self._value is None else float(self._value)


@dataclass
class Engine:
    """A model under DeepSpeed ZeRO with its optimizer; built by ``Engine.build``."""

    ds_engine: Any  # deepspeed.DeepSpeedEngine
    config: dict[str, Any]  # the DeepSpeed config it was built with
    norms: GradNorm | None = None  # the gradient norm of each step (made by build)

    @classmethod
    def build(cls, model: torch.nn.Module, cfg: TrainingJobConfig, *, use_gpu: bool, precision: str, lr: float,
              groups: list[dict[str, Any]] | None = None, compile_model: bool = False,
              ds_config: dict[str, Any] | None = None, grad_norm: bool = True) -> Engine:
        """An engine over ``model``; the process group is the one Ray Train set up.

        ``groups``: the optimizer's parameter groups (default ``param_groups``); fine-tuning
        passes ``layer_decay_param_groups``. ``compile_model``: ``torch.compile`` the model's
        forward in place (``nn.Module.compile``), so parameter and state-dict names, and so
        checkpoints, stay those of the eager model. ``ds_config``: a DeepSpeed config to use
        instead of the one generated from ``cfg`` (benchmarks measuring alternatives).
        ``grad_norm=False``: no ``GradNorm``, only what DeepSpeed computes itself (benchmarks
        measuring its cost).
        """
        import deepspeed

        if compile_model:
            model.compile()

        ds_config = ds_config or deepspeed_config(cfg, use_gpu=use_gpu, precision=precision, lr=lr)
        if not torch.distributed.is_initialized():
            # Single process outside Ray Train (a benchmark or notebook).
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        if groups is None:
            groups = param_groups(model, cfg.train.weight_decay)
        with dropping_printed_lines(DEEPSPEED_PRINTS):
            if "optimizer" in ds_config:
                ds_engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
            else:
                optimizer = fused_adamw(groups, lr=lr, betas=cfg.train.betas)
                ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        return cls(ds_engine, ds_config, GradNorm(ds_engine) if grad_norm else None)

    @property
    def module(self) -> torch.nn.Module:
        """The model itself (its parameters are gathered under ZeRO-3 only inside a forward)."""
        return self.ds_engine.module

    @property
    def dtype(self) -> torch.dtype:
        return engine_dtype(self.config)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds_engine(*args, **kwargs)

    def set_lr(self, lr: float) -> None:
        """Every group's lr: ``lr`` times its ``lr_scale`` (layer-wise decay; 1 when absent)."""
        for group in self.ds_engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def grad_norm(self) -> float | None:
        """The global 2-norm of the averaged, unscaled (and unclipped) gradient of the last
        optimizer step, over all workers; None before the first step. Reading it waits for the
        device."""
        if self.norms is None:
            norm = self.ds_engine.get_global_grad_norm()
            return None if norm is None else float(norm)
        return self.norms.value()

    def backward_and_step(self, loss: torch.Tensor) -> bool:
        """Backward and (at a gradient-accumulation boundary) an optimizer step; True at a boundary."""
        self.ds_engine.backward(loss)
        boundary = self.ds_engine.is_gradient_accumulation_boundary()
        if boundary and self.norms is not None:
            self.norms.before_step()
        self.ds_engine.step()
        if boundary and self.norms is not None:
            self.norms.after_step()
        return boundary

    def save(self, folder: str | Path, client_state: dict[str, Any]) -> None:
        """Writes this rank's share of the model and optimizer state (and ``client_state``) into
        ``folder``; every rank calls it."""
        self.ds_engine.save_checkpoint(str(folder), tag=ENGINE_STATE_DIR, client_state=client_state)

    def load(self, folder: str | Path) -> dict[str, Any]:
        """Restores model and optimizer state from ``folder``; returns the saved client state.

        A checkpoint whose optimizer state is partitioned over another number of workers than
        this engine's is resharded: converted into DeepSpeed's universal checkpoint format (one
        file per parameter and state: fp32 weights, Adam's moments; ``ds_to_universal``) in a
        scratch folder and loaded from there (``checkpoint.load_universal``), so the weights and
        the optimizer state carry over to the new partitioning. DeepSpeed's own unpickling, the
        conversion's included, is held to weights-only with the allow-list.
        """
        saved = saved_world_size(folder)
        current = world_size()
        if saved is None or saved == current:
            return self._load_tag(Path(folder), ENGINE_STATE_DIR)
        stage = self.config["zero_optimization"]["stage"]
        # DeepSpeed 0.19's ZeRO-3 universal loading gives every parameter group the
        # hyperparameters of the first (ours: weight decay 0 for all); ours come from our config.
        hyperparameters = [{k: v for k, v in group.items() if k != "params"}
                           for group in self.ds_engine.optimizer.param_groups]
        with _universal_copy(Path(folder), converts=self.ds_engine.local_rank == 0) as universal:
            self.ds_engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
            try:
                client_state = self._load_tag(universal, ENGINE_STATE_DIR)
            finally:
                self.ds_engine._config.load_universal_checkpoint = False
        for group, saved_hyperparameters in zip(self.ds_engine.optimizer.param_groups, hyperparameters):
            group.update(saved_hyperparameters)
        # ... and puts one step-count tensor into the state of every parameter group, which
        # torch's AdamW then advances once per group and step: each group its own copy.
        inner = getattr(self.ds_engine.optimizer, "optimizer", self.ds_engine.optimizer)
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        self._restore_untrained(Path(folder))
        log.info("resharded the ZeRO-%d engine state of %s from %d worker(s) to %d (DeepSpeed universal "
                 "checkpoint): fp32 weights and optimizer state repartitioned", stage, folder, saved, current)
        return client_state

    def check_state(self, folder: str | Path) -> dict[str, Any]:
        """Checks, before anything is loaded, that the engine state in ``folder`` fits this
        engine: each model-states file holds a weight of this model's shape under every name of
        its state dict. Raises ``DamagedCheckpointError`` naming the file (relative to
        ``folder``) and what does not fit; returns the first file's contents, the client state
        among them. Reads the files' metadata only (memory mapped)."""
        root = Path(folder)
        files = sorted((root / ENGINE_STATE_DIR).glob("*mp_rank_*_model_states.pt"))
        if not files:
            raise DamagedCheckpointError(f"it holds no engine state ({ENGINE_STATE_DIR}/*model_states.pt)")
        # Under ZeRO-3 both sides hold the same empty placeholders for partitioned parameters.
        expected = {name: tuple(t.shape) for name, t in self.module.state_dict().items()}
        first: dict[str, Any] | None = None
        for path in files:
            rel = path.relative_to(root).as_posix()
            saved = safe_load(path, mmap=zipfile.is_zipfile(path), name=rel)
            module = saved.get("module") if isinstance(saved, dict) else None
            if not isinstance(module, dict) or not module:
                raise DamagedCheckpointError(f"{rel} holds no model weights")
            missing = [name for name in expected if name not in module]
            if missing:
                raise DamagedCheckpointError(f"{rel} lacks {len(missing)} of the model's weights: "
                                             f"{', '.join(missing[:5])}")
            for name, shape in expected.items():
                found = module[name]
                if not isinstance(found, torch.Tensor) or tuple(found.shape) != shape:
                    what = tuple(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
                    raise DamagedCheckpointError(f"{rel} holds {name} as {what}, the model's is {shape}")
            first = first if first is not None else saved
        assert first is not None
        return first

    def _restore_untrained(self, folder: Path) -> None:
        """Frozen parameters and buffers from ``folder``: DeepSpeed's universal loading restores
        only what its optimizer holds (the trained parameters) and leaves these as built."""
        module = self.module
        frozen = {name: p for name, p in module.named_parameters() if not p.requires_grad}
        buffers = dict(module.named_buffers())
        if not frozen and not buffers:
            return
        saved = _fp32_state_dict(folder)
        missing = sorted(name for name in (*frozen, *buffers) if name not in saved)
        if missing:
            raise RuntimeError(f"checkpoint {folder} lacks {', '.join(missing[:5])}: cannot reshard it")
        gathered: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.config["zero_optimization"]["stage"] == 3:  # parameters are partitioned
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(frozen.values()), modifier_rank=0)
        with torch.no_grad(), gathered:
            for name, tensor in (*frozen.items(), *buffers.items()):
                tensor.data.copy_(saved[name])

    def _load_tag(self, folder: Path, tag: str) -> dict[str, Any]:
        with weights_only_loads():
            load_path, client_state = self.ds_engine.load_checkpoint(str(folder), tag=tag)
        if load_path is None:
            raise RuntimeError(f"checkpoint {folder} holds no engine state under {tag!r}")
        return client_state


def saved_world_size(folder: str | Path) -> int | None:
    """The number of data-parallel workers whose partitioned optimizer state ``folder`` holds;
    None when its optimizer state is not partitioned (ZeRO-0 in fp32), which loads at any size."""
    ranks = {int(m.group(1)) for f in (Path(folder) / ENGINE_STATE_DIR).glob("*_optim_states.pt")
             if (m := _OPTIMIZER_SHARD.search(f.name))}
    return len(ranks) or None


@contextlib.contextmanager
def _universal_copy(folder: Path, *, converts: bool) -> Iterator[Path]:
    """A scratch folder holding ``folder``'s engine state in DeepSpeed's universal format (under
    the same tag), shared by the workers of each machine; removed when every worker has loaded.

    Every worker calls it (collectives). Rank 0 names the scratch folder; the worker of each
    machine that ``converts`` (its local rank 0) writes it, moving it into place when complete
    (if several do, as when local ranks are unknown, the first to finish wins), while the
    others wait at a barrier.
    """
    token = _shared_token()
    target = Path(tempfile.gettempdir()) / f"convmae-universal-{token:016x}"
    if converts and not (target / ENGINE_STATE_DIR).is_dir():
        scratch = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
        try:
            _convert_to_universal(folder / ENGINE_STATE_DIR, scratch / ENGINE_STATE_DIR)
            with contextlib.suppress(OSError):  # another worker of this machine was first
                scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    _barrier()  # every worker has a converted copy on its machine
    try:
        yield target
    finally:
        _barrier()  # every worker has loaded
        shutil.rmtree(target, ignore_errors=True)


def _convert_to_universal(tag_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process (one extract and one merge worker: its
    process pools would not inherit the weights-only hold on ``torch.load``)."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # our models carry no UNIVERSAL_CHECKPOINT_INFO (no tensor
                              # parallelism to describe): the converter supplies an empty one
                              inject_missing_state=True)
    with weights_only_loads(), contextlib.redirect_stdout(_LogWriter()):
        ds_to_universal.main(args)


class _LogWriter:
    """A stdout for the converter's progress prints: debug log lines instead."""

    def write(self, text: str) -> int:
        if text.strip():
            log.debug("ds_to_universal: %s", text.strip())
        return len(text)

    def flush(self) -> None:
        pass


def _shared_token() -> int:
    """A random 63-bit number, the same on every worker (rank 0's)."""
    token = torch.tensor([int.from_bytes(os.urandom(8), "big") >> 1], dtype=torch.int64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
            else torch.device("cpu")
        token = token.to(device)
        torch.distributed.broadcast(token, src=0)
    return int(token.item())


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def has_engine_state(folder: str | Path) -> bool:
    """True if ``folder`` is a checkpoint folder written by ``Engine.save``."""
    return (Path(folder) / ENGINE_STATE_DIR).is_dir()


def consolidated_state_dict(folder: str | Path, *, label: str | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 model weights from a checkpoint folder of any ZeRO stage.

    Verified first (``service.runtime.safe_checkpoint``): its checksums manifest when it has
    one, and every file through the weights-only allow-list; errors name files as
    ``label/...`` (default: the folder).
    """
    verify_checkpoint(folder, label=label, require_manifest=False)
    return _fp32_state_dict(Path(folder))


def _fp32_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """``consolidated_state_dict`` of a folder already verified."""
    tag_dir = folder / ENGINE_STATE_DIR
    # ZeRO-3 names them zero_pp_rank_R_mp_rank_00_model_states.pt, other stages mp_rank_00_...
    files = sorted(tag_dir.glob("*mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no DeepSpeed model states under {tag_dir}")
    model_states = safe_load(files[0])
    stage = (model_states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if stage > 0:  # fp32 master weights are spread over the ranks' optimizer shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 calls torch.load(weights_only=False), and prints its progress.
        with (weights_only_loads(), dropping_printed_lines(DEEPSPEED_PRINTS),
              dropping_printed_lines(DEEPSPEED_PROGRESS_BARS, stream="stderr")):
            state = dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=ENGINE_STATE_DIR))
        # ZeRO-1 does not record frozen parameters (our fixed sin-cos position embeddings) in
        # its optimizer shards; below ZeRO-3 the module states hold them whole.
        for key, value in model_states["module"].items():
            if key not in state and value.numel() > 0:
                state[key] = value
    else:
        state = model_states["module"]
    return {k: v.float().contiguous() for k, v in state.items()}
