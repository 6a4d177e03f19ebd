"""benchmarks/model_step.py runs on CPU and counts FLOPs correctly (timings are never asserted)."""

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "model_step.py"


def load_script():
    spec = importlib.util.spec_from_file_location("model_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_depthwise_conv_backward_counts_twice_the_forward():
    from service.runtime.flops import grouped_conv_backward_flop  # the counter model_step.py uses

    conv = nn.Conv2d(16, 16, 5, padding=2, groups=16)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    forward = 2 * 2 * 8 * 8 * 16 * 25  # 2 FLOPs per multiply-add, 25 taps per output element
    mapping = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        conv(x).sum().backward()
    assert counter.get_total_flops() == 3 * forward  # forward + input grad + weight grad


def test_benchmark_runs_on_cpu(capsys):
    model_step = load_script()
    args = ["--model", "convmae_tiny", "--img-size", "32", "--batch-size", "2", "--steps", "1",
            "--warmup", "0", "--device", "cpu"]
    result = model_step.main(args)
    out = capsys.readouterr().out
    assert "images/s" in out and "TFLOP/s" in out and "GFLOP forward+backward" in out
    assert result["images_per_s"] > 0 and result["flops_per_s"] > 0
    # Backward costs about twice the forward: forward+backward is ~3x the forward count.
    assert 2.5 < result["flops_per_image"] / result["forward_flops_per_image"] < 3.5
