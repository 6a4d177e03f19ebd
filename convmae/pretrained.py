"""Our own model format: a directory with ``config.json`` and ``model.safetensors``.

Nothing is unpickled on load: the config is JSON, the weights safetensors. A directory holds a
pretraining ``ConvMAE`` (or the plain-ViT ``MAE`` baseline) or a ``ConvMAEBackbone`` (e.g. a
fine-tuned classifier).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .backbone import ConvMAEBackbone
from .checkpoint import (
    BACKBONE,
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    PRETRAIN,
    WEIGHTS_FILE,
    CheckpointMismatchError,
    compare_keys,
    read_pretrained_meta,
)
from .configs import MAEConfig, ModelConfig, config_from_dict
from .model import build_model_from_config

# A classifier head beyond this is a corrupt config.json, not a data set (ImageNet-22k has 21841).
MAX_NUM_CLASSES = 100_000


def read_config(meta: dict[str, Any], where: str | os.PathLike) -> ModelConfig:
    """The model config of a ``config.json`` (a ``ConvMAEConfig``, or an ``MAEConfig`` for
    ``family: mae``), checked against ``convmae.configs.LIMITS`` before anything is built; a
    ValueError naming ``where`` and the key otherwise."""
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{where}: 'config' is {config!r}, not a mapping of ConvMAEConfig fields")
    try:
        return config_from_dict(config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into the directory ``path``.

    ``model`` is a ``ConvMAE``, an ``MAE`` or a ``ConvMAEBackbone`` (e.g. a fine-tuned classifier); for a
    backbone, ``config.json`` also records ``architecture: backbone``, its head size and its
    pooling, so that ``load_pretrained`` rebuilds the same module.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": model.config.to_dict()}
    if isinstance(model, ConvMAEBackbone):
        meta.update(architecture=BACKBONE, num_classes=model.num_classes, global_pool=model.global_pool)
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def load_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the module saved by ``save_pretrained`` (no pickle involved): a ``ConvMAE``, or a
    ``ConvMAEBackbone`` when the directory holds one (``architecture: backbone``)."""
    meta = read_pretrained_meta(path)
    cfg = read_config(meta, Path(path) / CONFIG_FILE)
    architecture = meta.get("architecture", PRETRAIN)
    if architecture == BACKBONE and isinstance(cfg, MAEConfig):
        raise ValueError(f"{Path(path) / CONFIG_FILE}: architecture {BACKBONE!r} is not allowed for the plain-ViT "
                         f"MAE baseline (family {cfg.to_dict()['family']!r}): it has only a pretraining model")
    if architecture == BACKBONE:
        num_classes = meta.get("num_classes", 0)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 0 <= num_classes <= MAX_NUM_CLASSES:
            raise ValueError(f"{Path(path) / CONFIG_FILE}: num_classes={num_classes!r} is not allowed: "
                             f"a whole number in 0..{MAX_NUM_CLASSES}")
        model: nn.Module = ConvMAEBackbone(cfg, num_classes=num_classes, global_pool=bool(meta.get("global_pool", True)))
    elif architecture == PRETRAIN:
        model = build_model_from_config(cfg)
    else:
        raise ValueError(f"{path}: unknown architecture {architecture!r} (expected {PRETRAIN!r} or {BACKBONE!r})")
    state = load_file(str(Path(path) / WEIGHTS_FILE), device="cpu")
    diff = compare_keys(model.state_dict(), state)
    if not diff.ok:
        raise CheckpointMismatchError(
            f"weights in {path} do not match its config.json", diff.missing, diff.unexpected, diff.mismatched
        )
    model.load_state_dict(state, strict=True)
    return model.to(map_location)
