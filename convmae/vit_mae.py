"""The plain-ViT MAE baseline (He et al., 2022), built from ConvMAE's own parts.

    image (B, 3, H, W)
      -> patch_embed (16x16 stride 16, linear)  -> + fixed sin-cos pos_embed    (B, L, D)
      -> keep the visible tokens (random per-patch mask, MAE's argsort)       (B, K, D)
      -> blocks: transformer blocks on the visible tokens -> encoder_norm
      -> the same MAEDecoder and masked-patch pixel loss as ConvMAE

What ConvMAE adds on top of this is exactly what the comparison is about: the two convolution
stages at stride 4 and 8 (with the mask carried down to them, "block-wise" masking) and the
multi-scale fusion. On a 16x16 token grid MAE's per-patch random masking and ConvMAE's
block-wise mask are the same draw (``random_block_mask``); only ConvMAE has finer grids to
carry it to. Unlike the official MAE there is no cls token (ConvMAE has none either, and the
downstream embedding is the mean of the tokens in both).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .autoencoder import MaskedAutoencoder
from .blocks import TRANSFORMER_NORM_EPS, TransformerBlock
from .configs import MAEConfig
from .decoder import MAEDecoder
from .encoder import stochastic_depth_rates, take_tokens
from .masking import BlockMask
from .pos_embed import resize_pos_embed, sincos_2d


class ViTEncoder(nn.Module):
    def __init__(self, cfg: MAEConfig, learnable_pos_embed: bool = False) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        # MAE's patch embedding: a kernel == stride conv, no norm, no activation.
        self.patch_embed = nn.Conv2d(cfg.in_chans, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, dim), requires_grad=learnable_pos_embed)
        dpr = stochastic_depth_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(TransformerBlock(dim, cfg.num_heads, cfg.mlp_ratio, dpr[i]) for i in range(cfg.depth))
        self.reset_pos_embed()

    def reset_pos_embed(self) -> None:
        grid = int(round(self.pos_embed.shape[1] ** 0.5))
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], grid, self.pos_embed.device).unsqueeze(0))

    def embed(self, imgs: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> every patch's token with its position, (B, L, D), and the grid."""
        h, w = imgs.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        grid = (h // self.patch_size, w // self.patch_size)
        tokens = self.patch_embed(imgs).flatten(2).transpose(1, 2)  # (B, L, D), row-major
        return tokens + resize_pos_embed(self.pos_embed, grid), grid

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked pass: every token after the transformer blocks, (B, L, D)."""
        tokens, _ = self.embed(imgs)
        for blk in self.blocks:
            tokens = blk(tokens)
        return tokens

    def forward_visible(self, imgs: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
        """Masked pass: the K visible tokens only, (B, K, D), in ``block_mask.ids_keep`` order.
        A patch embedding sees only its own 16x16 pixels, so nothing masked reaches them."""
        tokens, grid = self.embed(imgs)
        if grid != block_mask.grid:
            raise ValueError(f"mask grid {block_mask.grid} does not match the image's token grid {grid}")
        tokens = take_tokens(tokens, block_mask.ids_keep)
        for blk in self.blocks:
            tokens = blk(tokens)
        return tokens


class MAE(MaskedAutoencoder):
    """Same interface as ``ConvMAE``: forward -> (loss, pred (B, L, p*p*Cin), mask (B, L))."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = ViTEncoder(cfg, learnable_pos_embed=False)
        self.encoder_norm = nn.LayerNorm(cfg.embed_dim, eps=TRANSFORMER_NORM_EPS)
        self.decoder = MAEDecoder(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official MAE initialisation: patch embedding like a Linear layer, xavier Linear
        layers, unit LayerNorms, mask token N(0, 0.02)."""
        self.encoder.reset_pos_embed()
        self.decoder.reset_pos_embed()
        w = self.encoder.patch_embed.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        self.init_linear_and_norm_layers()

    def forward_encoder(self, imgs: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
        """Latents of the visible tokens, (B, K, D), in ``block_mask.ids_keep`` order."""
        return self.encoder_norm(self.encoder.forward_visible(imgs, block_mask))

    @property
    def input_weight(self) -> torch.Tensor:
        return self.encoder.patch_embed.weight

    def pooled_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the unmasked image's encoder tokens, (B, D), before any norm."""
        return self.encoder.forward_features(images.to(self.encoder.patch_embed.weight.dtype)).mean(dim=1)
