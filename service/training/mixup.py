"""Mixup, CutMix and label smoothing for fine-tuning, on whole batches (no timm).

As in the MAE/ConvMAE fine-tuning recipe (timm's ``Mixup`` in "batch" mode): with probability
``prob`` a batch is mixed with itself reversed, by CutMix with probability ``switch_prob`` when
both are on, else by Mixup; one mixing coefficient ``lam ~ Beta(alpha, alpha)`` per batch.
Targets are always soft: one-hot smoothed by ``smoothing`` and mixed with the same ``lam``, so
one loss (soft-target cross-entropy) serves every setting.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MixSettings:
    mixup_alpha: float = 0.8  # 0 turns Mixup off
    cutmix_alpha: float = 1.0  # 0 turns CutMix off
    prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both are on
    smoothing: float = 0.1  # label smoothing

    @property
    def active(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) int labels -> (B, num_classes) targets: 1 - s + s/K on the label, s/K elsewhere.

    A label of -1 (the loader's placeholder for an undecodable image) gets the uniform target.
    """
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    known = labels >= 0
    targets[known] = targets[known].scatter(1, labels[known].long()[:, None], 1.0 - smoothing + off)
    targets[~known] = 1.0 / num_classes
    return targets


def cutmix_box(height: int, width: int, lam: float, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box covering about ``1 - lam`` of the image, centred
    uniformly at random and clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    h, w = int(height * cut), int(width * cut)
    cy, cx = rng.randrange(height), rng.randrange(width)
    top, bottom = max(cy - h // 2, 0), min(cy + h // 2, height)
    left, right = max(cx - w // 2, 0), min(cx + w // 2, width)
    return top, bottom, left, right


def mix_batch(
    images: torch.Tensor,  # (B, C, H, W)
    labels: torch.Tensor,  # (B,)
    num_classes: int,
    settings: MixSettings,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mixed images (B, C, H, W), soft targets (B, num_classes), lam); lam = 1 means unmixed."""
    targets = smoothed_one_hot(labels, num_classes, settings.smoothing)
    if not settings.active or rng.random() >= settings.prob:
        return images, targets, 1.0
    use_cutmix = settings.cutmix_alpha > 0 and (settings.mixup_alpha <= 0 or rng.random() < settings.switch_prob)
    alpha = settings.cutmix_alpha if use_cutmix else settings.mixup_alpha
    lam = rng.betavariate(alpha, alpha)
    partner = images.flip(0)
    if use_cutmix:
        height, width = images.shape[-2:]
        top, bottom, left, right = cutmix_box(height, width, lam, rng)
        images = images.clone()
        images[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        # The box was clipped: the label weight follows the pixels actually pasted.
        lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
    else:
        images = images * lam + partner * (1.0 - lam)
    targets = targets * lam + targets.flip(0) * (1.0 - lam)
    return images, targets, lam


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k targets_k * log softmax(logits)_k (computed in float32)."""
    return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
