"""Fixed 2-D sine-cosine position embeddings.

The official ConvMAE uses MAE's fixed (frozen) 2-D sin-cos table, without a cls token, both for
the stage-3 tokens (added after the stage-3 patch embedding and its linear projection) and for
the decoder. We reproduce MAE's exact layout so that our tables equal the ones stored in official
checkpoints: for the token at row ``i``, column ``j`` of the grid, with ``w_k = 10000^(-k/(D/4))``,

    [sin(j*w), cos(j*w), sin(i*w), cos(i*w)]      (each block D/4 wide)

i.e. the first half encodes the column index and the second half the row index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) table ``[sin(p*w), cos(p*w)]``."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int | tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """(grid_h * grid_w, dim) float32 table, rows in row-major grid order."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dim must be a multiple of 4, got {dim}")
    grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows = torch.arange(grid_h, dtype=torch.float64, device=device)
    cols = torch.arange(grid_w, dtype=torch.float64, device=device)
    row_idx, col_idx = torch.meshgrid(rows, cols, indexing="ij")
    by_col = sincos_1d(dim // 2, col_idx.reshape(-1))
    by_row = sincos_1d(dim // 2, row_idx.reshape(-1))
    return torch.cat([by_col, by_row], dim=1).float()


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (1, H*W, C) square-grid table to ``new_grid``, as MAE fine-tuning does."""
    _, n, c = pos_embed.shape
    old = int(round(n**0.5))
    if old * old != n:
        raise ValueError(f"position table with {n} entries is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    grid = pos_embed.reshape(1, old, old, c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c).to(pos_embed.dtype)
