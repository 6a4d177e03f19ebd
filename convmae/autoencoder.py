"""What every masked autoencoder here shares: the mask, the decoder call, the pixel loss, the
forward pass, and the official MAE initialisation of Linear and LayerNorm layers.

Subclasses (``ConvMAE``, the plain-ViT ``MAE``) build ``encoder``, ``decoder`` and
``encoder_norm``, and say how an image becomes visible latents (``forward_encoder``) and which
weight sets the input dtype (``input_weight``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .configs import ModelConfig
from .masking import BlockMask, random_block_mask
from .patches import masked_patch_loss


class MaskedAutoencoder(nn.Module):
    """forward(imgs) -> (loss, pred (B, L, p*p*Cin), mask (B, L) with 1 = masked)."""

    config: ModelConfig
    encoder: nn.Module
    decoder: nn.Module

    @property
    def input_weight(self) -> torch.Tensor:
        """The first weight the image meets: inputs are cast to its dtype (e.g. bf16 engines)."""
        raise NotImplementedError

    def forward_encoder(self, imgs: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
        """Latents of the visible tokens, (B, K, C), in ``block_mask.ids_keep`` order."""
        raise NotImplementedError

    def init_linear_and_norm_layers(self, keep: tuple[type[nn.Module], ...] = ()) -> None:
        """MAE's init: xavier-uniform Linear weights, zero biases, unit LayerNorms; modules of the
        ``keep`` types keep PyTorch's default init. Visits modules in ``self.modules()`` order, so
        the random draws, and with them the weights, follow the official code's."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and not isinstance(m, keep):
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
        """A random mask on the token grid (block-wise on ConvMAE's finer grids)."""
        p = self.config.patch_size
        grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
        return random_block_mask(imgs.shape[0], grid, mask_ratio, imgs.device, generator)

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
        if block_mask is None:
            block_mask = self.random_mask(imgs, mask_ratio, generator)
        # Inputs follow the weights' dtype; the loss target keeps full precision.
        latent = self.forward_encoder(imgs.to(self.input_weight.dtype), block_mask)
        pred = self.forward_decoder(latent, block_mask)
        loss = self.forward_loss(imgs, pred, block_mask.mask)
        return loss, pred, block_mask.mask
