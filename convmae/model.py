"""ConvMAE pretraining model: masked hybrid encoder, multi-scale fusion, MAE decoder, pixel loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .autoencoder import MaskedAutoencoder
from .blocks import TRANSFORMER_NORM_EPS, Pointwise
from .configs import ConvMAEConfig, MAEConfig, ModelConfig, get_config
from .decoder import MAEDecoder
from .encoder import ConvViTEncoder
from .masking import BlockMask
from .patches import conv_as_linear
from .vit_mae import MAE


def fuse_blocks(conv: nn.Conv2d, blocks: torch.Tensor) -> torch.Tensor:
    """A kernel==stride conv evaluated only on the given blocks.

    blocks (B, K, r, r, C) -> (B, K, Cout); equal to running ``conv`` on the full map and taking
    the K tokens, at K/L of the cost.
    """
    b, k = blocks.shape[:2]
    return F.linear(blocks.reshape(b, k, -1), conv_as_linear(conv.weight), conv.bias)


class ConvMAE(MaskedAutoencoder):
    def __init__(self, cfg: ConvMAEConfig) -> None:
        super().__init__()
        self.config = cfg
        c1, c2, c3 = cfg.embed_dims
        _, p2, p3 = cfg.patch_sizes
        self.encoder = ConvViTEncoder(cfg, learnable_pos_embed=False)
        # Multi-scale fusion: stage-1/2 maps brought to the token grid by strided convs and added
        # to the stage-3 output (official: stage1_output_decode / stage2_output_decode).
        self.fuse_stage1 = nn.Conv2d(c1, c3, kernel_size=p2 * p3, stride=p2 * p3)
        self.fuse_stage2 = nn.Conv2d(c2, c3, kernel_size=p3, stride=p3)
        self.encoder_norm = nn.LayerNorm(c3, eps=TRANSFORMER_NORM_EPS)
        self.decoder = MAEDecoder(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation (xavier Linear layers, default-initialised convs)."""
        self.encoder.reset_pos_embed()
        self.decoder.reset_pos_embed()
        # The last patch embedding is initialised like a Linear layer, as in the official model.
        w = self.encoder.stage3_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        # The 1x1 convs of the conv blocks (Pointwise) keep PyTorch's conv init, as in the official code.
        self.init_linear_and_norm_layers(keep=(Pointwise,))

    def forward_encoder(self, imgs: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
        """Latents of the visible tokens, (B, K, C3), in ``block_mask.ids_keep`` order."""
        stage1, stage2, tokens = self.encoder.forward_visible(
            imgs, block_mask, sparse=self.config.sparse_conv_stages
        )
        fused = tokens + fuse_blocks(self.fuse_stage1, stage1) + fuse_blocks(self.fuse_stage2, stage2)
        return self.encoder_norm(fused)

    @property
    def input_weight(self) -> torch.Tensor:
        return self.encoder.stage1_embed.proj.weight


# Either pretraining model: both take (imgs, mask_ratio, generator, block_mask) and return
# (loss, pred, mask), and have random_mask, forward_encoder, forward_decoder and forward_loss.
PRETRAINING_MODELS = (ConvMAE, MAE)


def build_model_from_config(cfg: ModelConfig) -> ConvMAE | MAE:
    """A ``ConvMAE`` for a ``ConvMAEConfig``, the plain-ViT ``MAE`` baseline for an ``MAEConfig``."""
    if isinstance(cfg, MAEConfig):
        return MAE(cfg)
    return ConvMAE(cfg)


def build_model(name: str, **overrides: Any) -> ConvMAE | MAE:
    """A preset by name; ``overrides`` replace config fields, e.g. ``img_size=32``."""
    return build_model_from_config(get_config(name, **overrides))
