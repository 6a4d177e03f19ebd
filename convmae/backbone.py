"""The pretrained encoder for downstream use (the official fine-tuning "ConvViT").

No masking; returns the multi-scale features (H/4, H/8, H/16) and a pooled embedding, with an
optional classification head. As in the official fine-tuning model, the pretraining-only parts
(multi-scale fusion convs, decoder) are dropped and the position embedding becomes learnable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import TRANSFORMER_NORM_EPS, Pointwise
from .checkpoint import (
    CONFIG_FILE,
    CheckpointMismatchError,
    convert_official_state_dict,
    extract_state_dict,
    load_pretrained_config,
    looks_official,
    read_checkpoint,
)
from .configs import ConvMAEConfig
from .encoder import ConvViTEncoder
from .model import ConvMAE
from .pos_embed import resize_pos_embed
from .vit_mae import MAE

# Pretraining-only weights that a backbone never uses.
_PRETRAIN_ONLY_PREFIXES = ("decoder.", "fuse_stage1.", "fuse_stage2.")


@dataclass
class PretrainLoadReport:
    loaded: list[str] = field(default_factory=list)
    newly_initialized: list[str] = field(default_factory=list)  # head / final norm not in the source
    ignored: list[str] = field(default_factory=list)  # decoder, fusion, unused norms, mis-sized head
    resized: list[str] = field(default_factory=list)  # position embeddings interpolated to a new grid


def layer_id_for(name: str, num_layers: int) -> int:
    """Layer index of a backbone parameter for layer-wise lr decay (official ``lr_decay.py``).

    Conv stages, patch embeddings, token projection and position embedding are layer 0,
    transformer block i is layer i + 1, and the final norm and head are ``num_layers``
    (= number of transformer blocks + 1).
    """
    if name.startswith("module."):
        name = name[len("module.") :]
    if name.startswith("encoder.stage3_blocks."):
        return int(name.split(".")[2]) + 1
    if name.startswith("encoder."):
        return 0
    return num_layers


class ConvMAEBackbone(nn.Module):
    def __init__(
        self, cfg: ConvMAEConfig, num_classes: int = 0, drop_path_rate: float = 0.0, global_pool: bool = True
    ) -> None:
        super().__init__()
        self.config = cfg
        self.num_classes = num_classes
        self.global_pool = global_pool
        dim = cfg.embed_dims[2]
        self.encoder = ConvViTEncoder(cfg, drop_path_rate=drop_path_rate, learnable_pos_embed=True)
        if global_pool:
            self.fc_norm = nn.LayerNorm(dim, eps=TRANSFORMER_NORM_EPS)  # norm of the pooled tokens
        else:
            self.encoder_norm = nn.LayerNorm(dim, eps=TRANSFORMER_NORM_EPS)  # norm of every token
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """Official fine-tuning init (weights are normally overwritten by a pretrained checkpoint)."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and not isinstance(m, Pointwise):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.reset_head()

    def reset_head(self) -> None:
        """Fresh classifier, initialised as the official fine-tuning does after loading."""
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    @property
    def num_layers(self) -> int:
        return self.config.depths[2] + 1

    def no_weight_decay(self) -> set[str]:
        return {"encoder.pos_embed"}

    def layer_groups(self) -> dict[str, int]:
        """Parameter name -> layer id for layer-wise lr decay (see ``layer_id_for``)."""
        return {name: layer_id_for(name, self.num_layers) for name, _ in self.named_parameters()}

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Multi-scale features as (B, C, H, W) tensors in channels-last memory, plus 'pooled' (B, C3)."""
        stage1, stage2, tokens = self.encoder.forward_features(x)
        b, n, c = tokens.shape
        grid = (x.shape[-2] // self.config.patch_size, x.shape[-1] // self.config.patch_size)
        if self.global_pool:
            pooled = self.fc_norm(tokens.mean(dim=1))
        else:
            # The official model takes token 0 here, a leftover from cls-token ViTs; there is no
            # cls token, so we average the normalised tokens instead.
            tokens = self.encoder_norm(tokens)
            pooled = tokens.mean(dim=1)
        return {
            "stage1": stage1.permute(0, 3, 1, 2),
            "stage2": stage2.permute(0, 3, 1, 2),
            "stage3": tokens.view(b, grid[0], grid[1], c).permute(0, 3, 1, 2),
            "pooled": pooled,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.forward_features(x)["pooled"]
        return self.head(pooled) if self.num_classes > 0 else pooled

    def load_pretrain_state_dict(self, state_dict: Mapping[str, Any]) -> PretrainLoadReport:
        """Load encoder weights from a pretraining (or fine-tuning) state_dict, ours or official.

        Decoder and fusion weights are ignored; encoder weights must all be present with the
        right shapes (the position embedding is interpolated if the grid differs); a head or
        final norm absent from the source, or a head of another size, stays freshly initialised.
        Raises ``CheckpointMismatchError`` naming missing, unexpected and mis-shaped keys.
        """
        state = extract_state_dict(state_dict)
        if looks_official(state):
            state, unknown = convert_official_state_dict(state)
        else:
            unknown = []
        own = self.state_dict()
        report = PretrainLoadReport()
        to_load: dict[str, torch.Tensor] = {}
        unexpected = list(unknown)
        mismatched = []
        for key, value in state.items():
            if key.startswith(_PRETRAIN_ONLY_PREFIXES) or (key.startswith("encoder_norm.") and key not in own):
                report.ignored.append(key)
            elif key not in own:
                if key.startswith(("fc_norm.", "head.")):
                    report.ignored.append(key)
                else:
                    unexpected.append(key)
            elif key == "encoder.pos_embed" and value.shape != own[key].shape:
                to_load[key] = resize_pos_embed(value, (self.config.grid_size, self.config.grid_size))
                report.resized.append(key)
            elif value.shape != own[key].shape:
                if key.startswith("head."):
                    report.ignored.append(key)  # a classifier for another label set
                else:
                    mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
            else:
                to_load[key] = value
        missing_encoder = sorted(k for k in own if k.startswith("encoder.") and k not in to_load)
        if unexpected or mismatched or missing_encoder:
            raise CheckpointMismatchError(
                "pretrained state_dict does not fit this ConvMAEBackbone "
                f"(config: {self.config})",
                missing=missing_encoder,
                unexpected=unexpected,
                mismatched=mismatched,
            )
        report.newly_initialized = sorted(k for k in own if k not in to_load)
        if any(k.startswith("head.") for k in report.newly_initialized):
            self.reset_head()
        self.load_state_dict(to_load, strict=False)
        report.loaded = sorted(to_load)
        return report

    @classmethod
    def from_pretrained(
        cls,
        source: ConvMAE | Mapping[str, Any] | str | os.PathLike,
        cfg: ConvMAEConfig | None = None,
        **kwargs: Any,
    ) -> ConvMAEBackbone:
        """A backbone initialised from a pretraining model, a state_dict (ours or official), a
        directory written by ``save_pretrained`` or an official checkpoint file.

        ``cfg`` defaults to the source's config where it has one (model or directory); pass it
        to change e.g. ``img_size`` for fine-tuning (the position embedding is interpolated).
        ``kwargs`` go to the constructor (num_classes, drop_path_rate, global_pool).
        """
        if isinstance(source, ConvMAE):
            cfg = cfg or source.config
            state: Mapping[str, Any] = source.state_dict()
        elif isinstance(source, Mapping):
            state = source
        else:
            if Path(source).is_dir() and (Path(source) / CONFIG_FILE).exists():
                cfg = cfg or load_pretrained_config(source)
            state = read_checkpoint(source)
        if cfg is None:
            raise ValueError("cfg is required when loading from a bare state_dict or checkpoint file")
        backbone = cls(cfg, **kwargs)
        backbone.load_pretrain_state_dict(state)
        return backbone


def encoder_embedding(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled encoder features (B, C3) of unmasked images, e.g. for k-NN or linear-probe checks.

    For a ``ConvMAEBackbone`` this is its 'pooled' output. For a pretraining ``ConvMAE`` it is
    what ``ConvMAEBackbone.from_pretrained(model)`` would return before any fine-tuning: the
    mean of the stage-3 tokens, layer-normalised without affine parameters (the backbone's fresh
    ``fc_norm``); for the plain-ViT ``MAE`` baseline the same pooling of its tokens. Wrappers exposing ``.module`` (DDP, DeepSpeed engines) are unwrapped.
    """
    while not isinstance(model, (ConvMAE, MAE, ConvMAEBackbone)) and hasattr(model, "module"):
        model = model.module
    if isinstance(model, ConvMAEBackbone):
        return model.forward_features(images)["pooled"]
    if isinstance(model, MAE):  # the plain-ViT baseline: its tokens, pooled the same way
        pooled = model.pooled_embedding(images)
    elif isinstance(model, ConvMAE):
        images = images.to(model.encoder.stage1_embed.proj.weight.dtype)
        _, _, tokens = model.encoder.forward_features(images)
        pooled = tokens.mean(dim=1)
    else:
        raise TypeError(f"expected a ConvMAE, MAE or ConvMAEBackbone, got {type(model).__name__}")
    return F.layer_norm(pooled, pooled.shape[-1:], eps=TRANSFORMER_NORM_EPS)
