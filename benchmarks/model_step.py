"""Forward+backward throughput of a ConvMAE pretraining step on the current device.

Prints images/s, achieved FLOP/s and the FLOPs per image (counted by
``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention, forward and
backward), so that the same numbers can be taken for the official implementation side by side.

    python benchmarks/model_step.py --model convmae_base --batch-size 8
    python benchmarks/model_step.py --model convmae_base --batch-size 128 --device cuda --dtype bf16

``--conv-stages dense`` runs stages 1-2 densely over all cells (the official formulation);
the default, ``sparse``, computes only the cells of visible blocks (same loss and gradients).
A step is forward + backward (no optimizer update); gradients are dropped between steps.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

import convmae  # noqa: E402
from service.runtime.flops import count_step_flops  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convmae_base", choices=sorted(convmae.PRESETS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=None, help="default: the preset's (224)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16/fp16 use autocast")
    p.add_argument("--conv-stages", default="sparse", choices=["sparse", "dense"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if args.dtype == "fp16" and device.type != "cuda":
        raise SystemExit("--dtype fp16 is only supported on CUDA")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    overrides: dict[str, Any] = {"sparse_conv_stages": args.conv_stages == "sparse"}
    if args.img_size:
        overrides["img_size"] = args.img_size
    torch.manual_seed(args.seed)
    model = convmae.build_model(args.model, **overrides).to(device).train()
    cfg = model.config
    step_model = torch.compile(model) if args.compile else model
    dtype = DTYPES[args.dtype]
    images = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)

    def step(i: int) -> None:
        with _autocast(device, dtype):
            loss, _, _ = step_model(images, mask_ratio=args.mask_ratio, generator=torch.Generator().manual_seed(i))
        loss.backward()
        for p in model.parameters():
            p.grad = None

    for i in range(args.warmup):
        step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    times = []
    for i in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        step(args.warmup + i)
        _sync(device)
        times.append(time.perf_counter() - start)

    # FLOPs of the eager model (torch.compile'd graphs are not visible to the counter).
    forward_flops, total_flops = count_step_flops(model, images, args.mask_ratio, device, dtype, custom=True)
    _, stock_total_flops = count_step_flops(model, images, args.mask_ratio, device, dtype, custom=False)

    step_time = statistics.median(times) if times else float("nan")
    flops_per_image = total_flops / args.batch_size
    return {
        "model": args.model,
        "img_size": cfg.img_size,
        "batch_size": args.batch_size,
        "device": _describe(device),
        "dtype": args.dtype,
        "conv_stages": args.conv_stages,
        "mask_ratio": args.mask_ratio,
        "params": sum(p.numel() for p in model.parameters()),
        "forward_flops_per_image": forward_flops / args.batch_size,
        "flops_per_image": flops_per_image,
        "stock_counter_flops_per_image": stock_total_flops / args.batch_size,
        "step_times": times,
        "step_time": step_time,
        "images_per_s": args.batch_size / step_time,
        "flops_per_s": total_flops / step_time,
        "peak_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def report(r: dict[str, Any]) -> str:
    lines = [
        f"model {r['model']} | img {r['img_size']} | batch {r['batch_size']} | mask ratio {r['mask_ratio']} "
        f"| conv stages {r['conv_stages']}",
        f"device {r['device']} | dtype {r['dtype']} | params {r['params'] / 1e6:.2f}M",
        f"FLOPs per image: {r['flops_per_image'] / 1e9:.2f} GFLOP forward+backward "
        f"({r['forward_flops_per_image'] / 1e9:.2f} GFLOP forward; torch's stock counter says "
        f"{r['stock_counter_flops_per_image'] / 1e9:.2f}, overcounting depthwise-conv weight gradients)",
        f"step time: {r['step_time'] * 1e3:.1f} ms median of {len(r['step_times'])} "
        f"({', '.join(f'{t * 1e3:.0f}' for t in r['step_times'])} ms)",
        f"throughput: {r['images_per_s']:.2f} images/s",
        f"achieved: {r['flops_per_s'] / 1e12:.3f} TFLOP/s ({r['flops_per_s'] / 1e9:.1f} GFLOP/s)",
    ]
    if r["peak_memory"] is not None:
        lines.append(f"peak memory: {r['peak_memory'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = run(parse_args(argv))
    print(report(result), flush=True)
    return result


if __name__ == "__main__":
    main()
