"""ConvMAE pretraining model: masked hybrid encoder, multi-scale fusion, MAE decoder, pixel loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import TRANSFORMER_NORM_EPS, Pointwise
from .configs import ConvMAEConfig, MAEConfig, ModelConfig, get_config
from .decoder import MAEDecoder
from .encoder import ConvViTEncoder
from .masking import BlockMask, random_block_mask
from .patches import conv_as_linear, masked_patch_loss
from .vit_mae import MAE


def fuse_blocks(conv: nn.Conv2d, blocks: torch.Tensor) -> torch.Tensor:
    """A kernel==stride conv evaluated only on the given blocks.

    blocks (B, K, r, r, C) -> (B, K, Cout); equal to running ``conv`` on the full map and taking
    the K tokens, at K/L of the cost.
    """
    b, k = blocks.shape[:2]
    return F.linear(blocks.reshape(b, k, -1), conv_as_linear(conv.weight), conv.bias)


class ConvMAE(nn.Module):
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
        for m in self.modules():
            if isinstance(m, nn.Linear) and not isinstance(m, Pointwise):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.pos_embed", "decoder.pos_embed", "decoder.mask_token"}

    def random_mask(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None
    ) -> BlockMask:
        p = self.config.patch_size
        grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
        return random_block_mask(imgs.shape[0], grid, mask_ratio, imgs.device, generator)

    def forward_encoder(self, imgs: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
        """Latents of the visible tokens, (B, K, C3), in ``block_mask.ids_keep`` order."""
        stage1, stage2, tokens = self.encoder.forward_visible(
            imgs, block_mask, sparse=self.config.sparse_conv_stages
        )
        fused = tokens + fuse_blocks(self.fuse_stage1, stage1) + fuse_blocks(self.fuse_stage2, stage2)
        return self.encoder_norm(fused)

    def forward_decoder(self, latent: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
        return self.decoder(latent, block_mask.ids_restore, block_mask.grid)  # (B, L, p*p*Cin)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the pixels of masked patches only (computed in float32)."""
        return masked_patch_loss(imgs, pred, mask, self.config.patch_size, self.config.norm_pix_loss)

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float = 0.75,
        generator: torch.Generator | None = None,
        block_mask: BlockMask | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred (B, L, p*p*Cin), mask (B, L) with 1 = masked)."""
        if block_mask is None:
            block_mask = self.random_mask(imgs, mask_ratio, generator)
        # Inputs follow the weights' dtype (e.g. bf16 engines); the loss target keeps full precision.
        latent = self.forward_encoder(imgs.to(self.encoder.stage1_embed.proj.weight.dtype), block_mask)
        pred = self.forward_decoder(latent, block_mask)
        loss = self.forward_loss(imgs, pred, block_mask.mask)
        return loss, pred, block_mask.mask


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
