"""Cutting images and feature maps into 16x16-token patches and back.

``patchify``/``unpatchify`` use MAE's pixel order inside a patch (row, column, channel), which is
the order of the decoder's prediction and of the loss target.

The block helpers serve the visible-only conv stages: a feature map at stride ``s`` has
``r = 16 / s`` cells per token side, and a token's ``r x r`` cells form one block.
"""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch*patch*C), L = (H/patch) * (W/patch), row-major."""
    b, c, h, w = imgs.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch {patch}")
    gh, gw = h // patch, w // patch
    x = imgs.reshape(b, c, gh, patch, gw, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(
    x: torch.Tensor, patch: int = 16, grid: tuple[int, int] | None = None, channels: int | None = None
) -> torch.Tensor:
    """(B, L, patch*patch*C) -> (B, C, H, W). ``grid`` defaults to a square grid."""
    b, n, d = x.shape
    c = channels if channels is not None else d // (patch * patch)
    if c * patch * patch != d:
        raise ValueError(f"last dim {d} is not patch*patch*channels for patch {patch}")
    if grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=(h, w)")
        grid = (side, side)
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"grid {grid} does not hold {n} patches")
    x = x.reshape(b, gh, gw, patch, patch, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return x.reshape(b, c, gh * patch, gw * patch)


def gather_blocks(x: torch.Tensor, ids_keep: torch.Tensor, cells: int) -> torch.Tensor:
    """Blocks of the kept tokens from a channels-last map.

    x: (B, H, W, C) with H, W multiples of ``cells``; ids_keep: (B, K) row-major token indices.
    Returns (B, K, cells, cells, C). Only the kept blocks are read.
    """
    b, h, w, c = x.shape
    gh, gw = h // cells, w // cells
    blocks = x.view(b, gh, cells, gw, cells, c)
    rows = torch.div(ids_keep, gw, rounding_mode="floor")
    cols = ids_keep % gw
    batch = torch.arange(b, device=x.device)[:, None]
    # Advanced indices on dims 0, 1, 3 -> result dims (B, K) then the sliced (cells, cells, C).
    return blocks[batch, rows, :, cols]


def split_cells(blocks: torch.Tensor, kernel: int) -> torch.Tensor:
    """Regroup blocks for a stride-``kernel`` patch embedding applied inside each block.

    blocks: (B, K, R, R, C) -> (B, K * (R/kernel)^2, kernel*kernel*C); outer order is the output
    cell (row, col) inside the block, inner order (ky, kx, C) matches ``conv_as_linear``.
    """
    b, k, r, r2, c = blocks.shape
    if r != r2 or r % kernel:
        raise ValueError(f"blocks of {r}x{r2} cells cannot be split by kernel {kernel}")
    out = r // kernel
    x = blocks.reshape(b, k, out, kernel, out, kernel, c).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, k * out * out, kernel * kernel * c)


def conv_as_linear(weight: torch.Tensor) -> torch.Tensor:
    """Weight of a kernel==stride Conv2d, (Cout, Cin, k, k), as a Linear weight over (ky, kx, Cin)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def masked_patch_loss(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix_loss: bool
) -> torch.Tensor:
    """MAE's loss: mean squared error over the pixels of masked patches only (in float32).

    imgs (B, C, H, W), pred (B, L, patch*patch*C), mask (B, L) with 1 = masked. With
    ``norm_pix_loss`` each target patch is normalised by its own mean and (unbiased) variance.
    """
    target = patchify(imgs.float(), patch)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official loss
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
