"""The optimizer's parameter groups and the learning-rate schedule (MAE/ConvMAE recipes).

Groups: AdamW without weight decay on norms, biases, position embeddings and mask tokens;
fine-tuning adds layer-wise lr decay (each group's ``lr_scale``). Schedule: linear warmup, then
half-cosine decay.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_at(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
