"""Turn a prediction into images: the masked input, the reconstruction, and the two pasted."""

from __future__ import annotations

import torch
import torch.nn as nn

from .configs import ConvMAEConfig
from .patches import patchify, unpatchify


def reconstruct(
    model_or_cfg: nn.Module | ConvMAEConfig, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """(B, C, H, W) images in the same (normalised) pixel space as ``imgs``.

    'masked': imgs with masked patches set to 0; 'reconstruction': the prediction for every patch;
    'pasted': visible patches from ``imgs``, masked ones from the prediction. With
    ``norm_pix_loss`` the prediction is per-patch normalised, so it is mapped back with the mean
    and variance of the corresponding patch of ``imgs`` (the statistics the loss normalised with).
    """
    cfg = model_or_cfg if isinstance(model_or_cfg, ConvMAEConfig) else model_or_cfg.config
    p = cfg.patch_size
    grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
    channels = imgs.shape[1]
    pred = pred.detach().float()
    if cfg.norm_pix_loss:
        target = patchify(imgs.float(), p)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = unpatchify(pred, p, grid=grid, channels=channels).to(imgs.dtype)
    pixel_mask = unpatchify(
        mask.detach().to(imgs.dtype)[..., None].expand(-1, -1, p * p * channels), p, grid=grid, channels=channels
    )
    visible = imgs * (1 - pixel_mask)
    return {"masked": visible, "reconstruction": recon, "pasted": visible + recon * pixel_mask}
