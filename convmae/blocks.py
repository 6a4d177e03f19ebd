"""Building blocks: strided patch embeddings, conv blocks (stages 1-2), transformer blocks.

Conv-stage features are channels-last, (B, H, W, C) on a full grid or (B, M, C) visible cells
(see masked_conv.py), so a 1x1 convolution is a ``Pointwise`` linear layer over the last dim.

LayerNorm epsilons follow the official model: 1e-5 (PyTorch default) in the patch embeddings
and conv blocks, which the official code builds with a bare ``nn.LayerNorm``; 1e-6 in the
transformer blocks and the final norms, which it builds with ``partial(nn.LayerNorm, eps=1e-6)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .masked_conv import DenseGrid, VisibleCells, conv_channels_last
from .patches import conv_as_linear

CONV_NORM_EPS = 1e-5
TRANSFORMER_NORM_EPS = 1e-6


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch for whole samples."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Pointwise(nn.Linear):
    """A 1x1 convolution on channels-last features.

    Kept a distinct type so that weight init can tell it apart from the transformer's Linear
    layers: the official model's 1x1 convs are ``nn.Conv2d`` with PyTorch's default init (which
    equals ``nn.Linear``'s), not the xavier init it applies to ``nn.Linear``.
    """


class PatchEmbed(nn.Module):
    """Strided conv (kernel == stride) -> LayerNorm -> GELU, as between the official stages."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=CONV_NORM_EPS)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, Cin) -> (B, H/p, W/p, C)."""
        return self.act(self.norm(conv_channels_last(x, self.proj)))

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., p*p*Cin) patches in (ky, kx, Cin) order -> (..., C); same math as ``forward``."""
        x = F.linear(patches, conv_as_linear(self.proj.weight), self.proj.bias)
        return self.act(self.norm(x))


class ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Pointwise(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Pointwise(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvBlock(nn.Module):
    """Transformer-like block with a 5x5 depthwise conv in place of self-attention:

        x = x + pw_out(masked_dwconv(pw_in(norm1(x))))
        x = x + mlp(norm2(x))
    """

    def __init__(self, dim: int, mlp_ratio: float, kernel_size: int = 5, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=CONV_NORM_EPS)
        self.pw_in = Pointwise(dim, dim)
        self.dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.pw_out = Pointwise(dim, dim)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=CONV_NORM_EPS)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, layout: DenseGrid | VisibleCells) -> torch.Tensor:
        h = layout.depthwise(self.pw_in(self.norm1(x)), self.dw)
        x = x + self.drop_path(self.pw_out(h))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block on (B, N, C) tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=TRANSFORMER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=TRANSFORMER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
