"""Block-wise masking.

The mask is drawn once per image on the token grid (stride 16), exactly like MAE: per-image
uniform noise, argsort, keep the ``int(L * (1 - mask_ratio))`` lowest. The conv stages see the
same mask upsampled to their grids (each token = a 4x4 block at stride 4, 2x2 at stride 8), so a
masked token hides the whole 16x16 pixel block at every scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockMask:
    ids_keep: torch.Tensor  # (B, K) token indices fed to the encoder, in shuffle order
    ids_restore: torch.Tensor  # (B, L) inverse permutation: un-shuffles [visible, masked]
    mask: torch.Tensor  # (B, L) float, 1 = masked, 0 = visible
    grid: tuple[int, int]  # token grid (rows, cols)

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]


def num_visible_tokens(num_patches: int, mask_ratio: float) -> int:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible token out of {num_patches}")
    return keep


def random_block_mask(
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> BlockMask:
    """A fresh random mask per image; identical for identical generator states.

    The noise is drawn on the generator's own device (so a CPU generator reproduces the same mask
    for CUDA inputs) and then moved to ``device``.
    """
    num_patches = grid[0] * grid[1]
    keep = num_visible_tokens(num_patches, mask_ratio)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=noise_device).to(device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first `keep` are visible
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return BlockMask(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask, grid=grid)


def upsample_mask(mask: torch.Tensor, grid: tuple[int, int], cells: int) -> torch.Tensor:
    """(B, L) token mask -> (B, rows*cells, cols*cells) mask of a finer grid."""
    b = mask.shape[0]
    gh, gw = grid
    m = mask.view(b, gh, 1, gw, 1).expand(b, gh, cells, gw, cells)
    return m.reshape(b, gh * cells, gw * cells)


def visible_cell_index(ids_keep: torch.Tensor, grid: tuple[int, int], cells: int) -> torch.Tensor:
    """Flat indices of the visible cells of a stride-(16/cells) map flattened to (B*H*W,).

    Order: image, kept token (shuffle order), cell row in block, cell column in block, which is
    the row order of the visible-only features (B, K*cells*cells, C).
    """
    b, k = ids_keep.shape
    _, gw = grid
    width = gw * cells
    height = grid[0] * cells
    rows = torch.div(ids_keep, gw, rounding_mode="floor") * cells  # (B, K) top cell row
    cols = (ids_keep % gw) * cells
    offs = torch.arange(cells, device=ids_keep.device)
    cell_rows = rows[:, :, None, None] + offs[None, None, :, None]  # (B, K, cells, 1)
    cell_cols = cols[:, :, None, None] + offs[None, None, None, :]  # (B, K, 1, cells)
    flat = cell_rows * width + cell_cols  # (B, K, cells, cells)
    flat = flat + (torch.arange(b, device=ids_keep.device) * (height * width))[:, None, None, None]
    return flat.reshape(-1)
