"""Masked convolution: the depthwise convolution of stages 1-2 never sees a masked cell.

The conv blocks hold channels-last features, so every pointwise op is a GEMM over the channel
dim and the LayerNorms need no transposes; only the depthwise conv needs a (B, C, H, W) view,
which for channels-last memory is free. Where the features live is a *layout*:

* ``DenseGrid``: a full (B, H, W, C) map. With ``visible`` (B, H, W, 1) it is the paper's masked
  convolution: masked cells are zeroed right before every depthwise conv.
* ``VisibleCells``: only the cells of visible 16x16 blocks, (B, M, C). For the depthwise conv they
  are scattered into a zeroed grid, so the result at visible cells is identical to ``DenseGrid``
  with the same mask, and the pointwise work (most of the FLOPs) is done on visible cells only.

Why zeroing before the depthwise conv is enough: patch embeddings (kernel == stride, aligned with
the 16x16 blocks), LayerNorms, 1x1 convs and MLPs never mix cells, so the depthwise conv is the
only place where a masked cell could reach a visible one.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def conv_channels_last(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Apply ``conv`` to a (B, H, W, C) map; returns (B, H', W', C')."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def depthwise_channels_last(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The depthwise conv on a (B, H, W, C) map.

    On CPU, oneDNN's depthwise backward is about 2x slower on channels-last than on NCHW memory,
    more than the two layout copies cost, so CPU runs it NCHW; elsewhere the channels-last view
    is used directly (no copies).
    """
    if x.device.type == "cpu":
        return conv(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1).contiguous()
    return conv_channels_last(x, conv)


class DenseGrid:
    def __init__(self, visible: torch.Tensor | None = None) -> None:
        self.visible = visible  # (B, H, W, 1), 1 = visible; None = no masking

    def depthwise(self, h: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        if self.visible is not None:
            h = h * self.visible.to(h.dtype)
        return depthwise_channels_last(h, conv)


class VisibleCells:
    def __init__(self, index: torch.Tensor, batch: int, height: int, width: int) -> None:
        self.index = index  # (B*M,) flat cell indices into (B*H*W,), see masking.visible_cell_index
        self.batch, self.height, self.width = batch, height, width

    def depthwise(self, h: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        b, m, c = h.shape  # (B, M, C) visible cells
        grid = h.new_zeros(b * self.height * self.width, c).index_copy(0, self.index, h.reshape(b * m, c))
        out = depthwise_channels_last(grid.view(b, self.height, self.width, c), conv)
        return out.reshape(-1, c).index_select(0, self.index).view(b, m, c)
