"""FLOP counting for train/tflops: shapes only, grouped convolutions counted right."""

import torch

from convmae import get_config
from service.runtime.flops import (
    count_step_flops,
    dense_bf16_peak_flops,
    pretraining_flops_per_image,
)

CHANNELS, SIDE, WIDTH = 4, 8, 5  # a conv stem, a depthwise 3x3 conv and a linear layer


class TinyStep(torch.nn.Module):
    """The shape of a ConvMAE stage small enough to count by hand: 1x1 conv (3 -> C), depthwise
    3x3 conv (C groups), linear (C -> WIDTH) over the SIDE*SIDE positions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, CHANNELS, 1)
        self.depthwise = torch.nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, groups=CHANNELS, bias=False)
        self.linear = torch.nn.Linear(CHANNELS, WIDTH)

    def forward(self, images, mask_ratio, generator):
        x = self.depthwise(self.stem(images)).flatten(2).transpose(1, 2)
        return self.linear(x).square().mean(), None, None


def test_a_steps_flops_are_the_ones_counted_by_hand():
    positions = SIDE * SIDE
    # 2 FLOPs per multiply-add, one image.
    stem = 2 * positions * CHANNELS * 3  # each output: 3 input channels
    depthwise = 2 * positions * CHANNELS * 9  # each output: its own channel's 3x3 window only
    linear = 2 * positions * CHANNELS * WIDTH
    forward_by_hand = stem + depthwise + linear
    # Backward: every layer's weight gradient costs its forward again, and so does the input
    # gradient of every layer but the stem (the images need none).
    backward_by_hand = stem + 2 * depthwise + 2 * linear

    forward, total = count_step_flops(TinyStep(), torch.zeros(1, 3, SIDE, SIDE), 0.75, torch.device("cpu"), None)
    assert forward == forward_by_hand
    assert total == forward_by_hand + backward_by_hand
    # torch's own formula counts the depthwise weight gradient as a dense CxC conv: C times over.
    _, stock = count_step_flops(TinyStep(), torch.zeros(1, 3, SIDE, SIDE), 0.75, torch.device("cpu"), None,
                                custom=False)
    assert stock == total + (CHANNELS - 1) * depthwise


def test_flops_per_image_fall_with_the_visible_tokens_and_drop_the_gradients():
    cfg = get_config("convmae_tiny", img_size=64)
    dense = pretraining_flops_per_image(cfg, mask_ratio=0.5)
    sparse = pretraining_flops_per_image(cfg, mask_ratio=0.75)
    assert 0 < sparse < dense  # fewer visible tokens, less work
    model = TinyStep()
    count_step_flops(model, torch.zeros(1, 3, SIDE, SIDE), 0.75, torch.device("cpu"), None)
    assert all(p.grad is None for p in model.parameters())


def test_no_peak_on_cpu():
    assert dense_bf16_peak_flops(torch.device("cpu")) is None
