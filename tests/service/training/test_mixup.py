"""Mixup / CutMix / label smoothing: targets and pixels mixed with the same weight."""

import random

import pytest
import torch
import torch.nn.functional as F

from service.training.mixup import (
    MixSettings,
    mix_batch,
    smoothed_one_hot,
    soft_target_cross_entropy,
)


def batch(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.tensor([0, 1, 2, 3])[:n]


def test_smoothing_and_unmixed_loss_equal_torch_label_smoothing():
    targets = smoothed_one_hot(torch.tensor([2, -1]), 4, 0.1)
    assert targets[0].tolist() == pytest.approx([0.025, 0.025, 0.925, 0.025])
    assert targets[1].tolist() == pytest.approx([0.25] * 4)  # undecodable placeholder: uniform
    images, labels = batch()
    out, soft, lam = mix_batch(images, labels, 5, MixSettings(mixup_alpha=0, cutmix_alpha=0, smoothing=0.1),
                               random.Random(0))
    assert out is images and lam == 1.0
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert soft_target_cross_entropy(logits, soft).item() == pytest.approx(expected.item(), rel=1e-6)


def test_mixup_blends_images_and_targets_with_one_weight():
    images, labels = batch()
    out, targets, lam = mix_batch(images, labels, 4, MixSettings(mixup_alpha=0.8, cutmix_alpha=0, smoothing=0),
                                  random.Random(3))
    assert 0 < lam < 1
    assert torch.allclose(out, lam * images + (1 - lam) * images.flip(0))
    # Sample 0 is mixed with sample 3: its target splits lam / 1 - lam between their labels.
    assert targets[0].tolist() == pytest.approx([lam, 0, 0, 1 - lam])
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    images, labels = batch(size=32)
    settings = MixSettings(mixup_alpha=0, cutmix_alpha=1.0, smoothing=0)
    for seed in range(20):
        out, targets, lam = mix_batch(images, labels, 4, settings, random.Random(seed))
        pasted = (out != images).any(dim=1)[0]  # (H, W) pixels of image 0 that changed
        area = pasted.float().mean().item()
        assert area == pytest.approx(1 - lam, abs=1e-6)
        assert torch.equal(out[0][:, pasted], images[3][:, pasted])
        assert targets[0, 3].item() == pytest.approx(1 - lam) and targets[0, 0].item() == pytest.approx(lam)


def test_mixing_is_seeded_and_can_be_switched_off_by_probability():
    images, labels = batch()
    both = MixSettings(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0)
    a = mix_batch(images, labels, 4, both, random.Random(7))
    b = mix_batch(images, labels, 4, both, random.Random(7))
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    never = MixSettings(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0)
    assert mix_batch(images, labels, 4, never, random.Random(7))[2] == 1.0
