"""FLOP counting for train/tflops: shapes only, grouped convolutions counted right."""

import torch

from convmae import get_config
from service.runtime.flops import (
    count_step_flops,
    dense_bf16_peak_flops,
    pretraining_flops_per_image,
)


def test_flops_per_image_scale_with_the_visible_tokens_and_the_depthwise_fix_lowers_them():
    cfg = get_config("convmae_tiny", img_size=64)
    dense = pretraining_flops_per_image(cfg, mask_ratio=0.5)
    sparse = pretraining_flops_per_image(cfg, mask_ratio=0.75)
    assert 0 < sparse < dense  # fewer visible tokens, less work
    from convmae import build_model_from_config

    model, images = build_model_from_config(cfg), torch.zeros(1, 3, 64, 64)
    forward, total = count_step_flops(model, images, 0.75, torch.device("cpu"), None)
    _, stock = count_step_flops(model, images, 0.75, torch.device("cpu"), None, custom=False)
    assert 0 < forward < total == sparse and total < stock  # torch's formula overcounts depthwise convs


def test_no_peak_on_cpu():
    assert dense_bf16_peak_flops(torch.device("cpu")) is None
