"""MAE decoder: visible latents + mask tokens -> pixels of every 16x16 patch."""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import TRANSFORMER_NORM_EPS, TransformerBlock
from .configs import ModelConfig
from .pos_embed import resize_pos_embed, sincos_2d


class MAEDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.embed = nn.Linear(cfg.encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, cfg.decoder_num_heads, cfg.decoder_mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=TRANSFORMER_NORM_EPS)
        self.pred = nn.Linear(dim, cfg.patch_size**2 * cfg.in_chans)
        self.reset_pos_embed()

    def reset_pos_embed(self) -> None:
        grid = int(round(self.pos_embed.shape[1] ** 0.5))
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], grid, self.pos_embed.device).unsqueeze(0))

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """latent (B, K, C) visible tokens in shuffle order -> (B, L, p*p*Cin) predictions."""
        x = self.embed(latent)
        b, k, d = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - k, d)], dim=1)  # [visible, masked]
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # back to grid order
        x = x + resize_pos_embed(self.pos_embed, grid)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))
