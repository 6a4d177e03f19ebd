"""The hybrid convolution-transformer encoder (the official "ConvViT").

    image (B, 3, H, W)
      -> stage1_embed (4x4 stride 4)  -> stage1_blocks: conv blocks at H/4
      -> stage2_embed (2x2 stride 2)  -> stage2_blocks: conv blocks at H/8
      -> stage3_embed (2x2 stride 2)  -> token_proj (linear) + fixed sin-cos pos_embed
      -> stage3_blocks: transformer blocks on H/16 tokens (visible tokens only when masked)

Used by both the pretraining model (``forward_visible``) and the downstream backbone
(``forward_features``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import ConvBlock, PatchEmbed, TransformerBlock
from .configs import ConvMAEConfig
from .masked_conv import DenseGrid, VisibleCells
from .masking import BlockMask, upsample_mask, visible_cell_index
from .patches import gather_blocks, split_cells
from .pos_embed import resize_pos_embed, sincos_2d


def take_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L, C) gathered at (B, K) indices -> (B, K, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def stochastic_depth_rates(rate: float, n: int) -> list[float]:
    """Linearly increasing drop-path rates over all ``n`` encoder blocks (0 for the first)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class ConvViTEncoder(nn.Module):
    def __init__(
        self, cfg: ConvMAEConfig, drop_path_rate: float | None = None, learnable_pos_embed: bool = False
    ) -> None:
        super().__init__()
        c1, c2, c3 = cfg.embed_dims
        p1, p2, p3 = cfg.patch_sizes
        d1, d2, d3 = cfg.depths
        r1, r2, r3 = cfg.mlp_ratios
        dpr = stochastic_depth_rates(cfg.drop_path_rate if drop_path_rate is None else drop_path_rate, d1 + d2 + d3)
        self.patch_size = cfg.patch_size
        # Cells per token side in the stride-4 and stride-8 maps (4 and 2 for patch sizes 4/2/2).
        self.stage_cells = (p2 * p3, p3)

        self.stage1_embed = PatchEmbed(cfg.in_chans, c1, p1)
        self.stage1_blocks = nn.ModuleList(
            ConvBlock(c1, r1, cfg.dw_kernel_size, dpr[i]) for i in range(d1)
        )
        self.stage2_embed = PatchEmbed(c1, c2, p2)
        self.stage2_blocks = nn.ModuleList(
            ConvBlock(c2, r2, cfg.dw_kernel_size, dpr[d1 + i]) for i in range(d2)
        )
        self.stage3_embed = PatchEmbed(c2, c3, p3)
        self.token_proj = nn.Linear(c3, c3)
        # Fixed sin-cos in pretraining (as official); learnable, sin-cos initialised, for fine-tuning.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, c3), requires_grad=learnable_pos_embed)
        self.stage3_blocks = nn.ModuleList(
            TransformerBlock(c3, cfg.num_heads, r3, dpr[d1 + d2 + i]) for i in range(d3)
        )
        self.reset_pos_embed()

    def reset_pos_embed(self) -> None:
        grid = int(round(self.pos_embed.shape[1] ** 0.5))
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], grid, self.pos_embed.device).unsqueeze(0))

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        return resize_pos_embed(self.pos_embed, grid)

    def _grid_of(self, imgs: torch.Tensor) -> tuple[int, int]:
        h, w = imgs.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the token patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def forward_features(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unmasked pass over the whole image.

        Returns stage-1 (B, H/4, W/4, C1) and stage-2 (B, H/8, W/8, C2) channels-last maps and the
        stage-3 tokens (B, L, C3) after the transformer blocks.
        """
        b = imgs.shape[0]
        grid = self._grid_of(imgs)
        layout = DenseGrid()
        x = self.stage1_embed(imgs.permute(0, 2, 3, 1))
        for blk in self.stage1_blocks:
            x = blk(x, layout)
        stage1 = x
        x = self.stage2_embed(x)
        for blk in self.stage2_blocks:
            x = blk(x, layout)
        stage2 = x
        tokens = self.stage3_embed(x).reshape(b, grid[0] * grid[1], -1)
        tokens = self.token_proj(tokens) + self.pos_embed_for(grid)
        for blk in self.stage3_blocks:
            tokens = blk(tokens)
        return stage1, stage2, tokens

    def forward_visible(
        self, imgs: torch.Tensor, block_mask: BlockMask, sparse: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked pass: nothing from a masked 16x16 block reaches a visible token.

        Returns, for the K visible tokens only: stage-1 blocks (B, K, 4, 4, C1), stage-2 blocks
        (B, K, 2, 2, C2) and stage-3 tokens (B, K, C3), in ``block_mask.ids_keep`` order.
        ``sparse`` selects the visible-cells layout (same values, less work) over the dense one.
        """
        grid = self._grid_of(imgs)
        if grid != block_mask.grid:
            raise ValueError(f"mask grid {block_mask.grid} does not match the image's token grid {grid}")
        ids = block_mask.ids_keep
        if sparse:
            stage1, stage2, tokens = self._conv_stages_visible_cells(imgs, ids, grid)
        else:
            stage1, stage2, tokens = self._conv_stages_dense_masked(imgs, block_mask)
        pos = take_tokens(self.pos_embed_for(grid).expand(imgs.shape[0], -1, -1), ids)
        tokens = self.token_proj(tokens) + pos
        for blk in self.stage3_blocks:
            tokens = blk(tokens)
        return stage1, stage2, tokens

    def _conv_stages_visible_cells(
        self, imgs: torch.Tensor, ids: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, k = ids.shape
        cells1, cells2 = self.stage_cells
        pixels = gather_blocks(imgs.permute(0, 2, 3, 1), ids, self.patch_size)  # (B, K, 16, 16, Cin)
        x = self.stage1_embed.embed_patches(split_cells(pixels, self.stage1_embed.patch_size))
        layout = VisibleCells(visible_cell_index(ids, grid, cells1), b, grid[0] * cells1, grid[1] * cells1)
        for blk in self.stage1_blocks:
            x = blk(x, layout)  # (B, K*16, C1)
        stage1 = x.view(b, k, cells1, cells1, -1)
        x = self.stage2_embed.embed_patches(split_cells(stage1, self.stage2_embed.patch_size))
        layout = VisibleCells(visible_cell_index(ids, grid, cells2), b, grid[0] * cells2, grid[1] * cells2)
        for blk in self.stage2_blocks:
            x = blk(x, layout)  # (B, K*4, C2)
        stage2 = x.view(b, k, cells2, cells2, -1)
        tokens = self.stage3_embed.embed_patches(split_cells(stage2, self.stage3_embed.patch_size))
        return stage1, stage2, tokens  # tokens (B, K, C3)

    def _conv_stages_dense_masked(
        self, imgs: torch.Tensor, block_mask: BlockMask
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = imgs.shape[0]
        grid, ids = block_mask.grid, block_mask.ids_keep
        cells1, cells2 = self.stage_cells
        visible = 1.0 - block_mask.mask
        layout = DenseGrid(upsample_mask(visible, grid, cells1).unsqueeze(-1))
        x = self.stage1_embed(imgs.permute(0, 2, 3, 1))
        for blk in self.stage1_blocks:
            x = blk(x, layout)
        stage1 = gather_blocks(x, ids, cells1)
        layout = DenseGrid(upsample_mask(visible, grid, cells2).unsqueeze(-1))
        x = self.stage2_embed(x)
        for blk in self.stage2_blocks:
            x = blk(x, layout)
        stage2 = gather_blocks(x, ids, cells2)
        tokens = self.stage3_embed(x).reshape(b, grid[0] * grid[1], -1)
        return stage1, stage2, take_tokens(tokens, ids)
