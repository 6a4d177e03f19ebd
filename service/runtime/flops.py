"""FLOPs of a training step and the device's peak: what TFLOP/s and MFU are computed from.

Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention,
forward and backward) with one correction: torch's stock formula for a convolution's weight
gradient ignores ``groups`` and counts a CxC depthwise conv C times over.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets: (name part,
# name parts that exclude it, peak). H100 is the SXM part.
DENSE_BF16_PEAK_TFLOPS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("A100", (), 312.0),
    ("H100", ("PCIe", "NVL"), 989.0),
    ("H200", (), 989.0),
    ("B200", (), 2250.0),
)


def dense_bf16_peak_flops(device: torch.device) -> float | None:
    """FLOP/s of the device's dense bf16 peak; None on CPU and on GPUs not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, excluded, tflops in DENSE_BF16_PEAK_TFLOPS:
        if part in name and not any(x in name for x in excluded):
            return tflops * 1e12
    return None


def grouped_conv_backward_flop(
    grad_out_shape: Any, x_shape: Any, w_shape: Any, _bias: Any, _stride: Any, _padding: Any, _dilation: Any,
    transposed: bool, _output_padding: Any, _groups: Any, output_mask: Any, out_shape: Any = None, **kwargs: Any,
) -> int:
    """Backward of a convolution: the input gradient and the weight gradient each take as many
    multiply-adds as the forward conv; right for grouped and ordinary convolutions alike."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_step_flops(model: torch.nn.Module, images: torch.Tensor, mask_ratio: float, device: torch.device,
                     dtype: torch.dtype | None, custom: bool = True) -> tuple[int, int]:
    """(forward, forward+backward) FLOPs of one pretraining step of the eager ``model``;
    its gradients are dropped afterwards."""
    mapping = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop} if custom else None
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with counter:
        with autocast:
            loss, _, _ = model(images, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(0))
        forward = counter.get_total_flops()
        loss.backward()
    for p in model.parameters():
        p.grad = None
    return forward, counter.get_total_flops()


def pretraining_flops_per_image(model_config: Any, mask_ratio: float) -> int:
    """Forward+backward FLOPs of one image's pretraining step, counted on a CPU copy of the
    model (fresh weights, one image): FLOPs depend on shapes only."""
    from convmae import build_model_from_config

    model = build_model_from_config(model_config)
    images = torch.zeros(1, 3, model_config.img_size, model_config.img_size)
    return count_step_flops(model, images, mask_ratio, torch.device("cpu"), None)[1]
