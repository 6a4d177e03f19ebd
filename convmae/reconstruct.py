"""Turn a prediction into images: the masked input, the reconstruction, and the two pasted."""

from __future__ import annotations

import torch
import torch.nn as nn

from .configs import ConvMAEConfig, MAEConfig
from .patches import patchify, unpatchify

STATS = ("target", "visible")


def reconstruct(
    model_or_cfg: nn.Module | ConvMAEConfig | MAEConfig, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
    *, stats: str = "target",
) -> dict[str, torch.Tensor]:
    """(B, C, H, W) images in the same (normalised) pixel space as ``imgs``.

    'masked': imgs with masked patches set to 0; 'reconstruction': the prediction for every patch;
    'pasted': visible patches from ``imgs``, masked ones from the prediction. With
    ``norm_pix_loss`` the prediction is per-patch normalised and ``stats`` says how it is mapped
    back: "target", with the mean and variance of the corresponding patch of ``imgs`` (the
    statistics the loss normalised with, as MAE's and ConvMAE's demos show it; a masked patch's
    brightness then comes from the image itself), or "visible", with those of each image's
    visible patches pooled, so that nothing of a masked patch is shown but what the model made.
    """
    if stats not in STATS:
        raise ValueError(f"stats={stats!r} is not allowed: one of {', '.join(STATS)}")
    cfg = model_or_cfg if isinstance(model_or_cfg, (ConvMAEConfig, MAEConfig)) else model_or_cfg.config
    p = cfg.patch_size
    grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
    channels = imgs.shape[1]
    pred = pred.detach().float()
    if cfg.norm_pix_loss:
        target = patchify(imgs.float(), p)  # (B, L, p*p*C)
        if stats == "target":
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        else:
            visible = (1 - mask.detach().float())[..., None].expand_as(target)  # (B, L, p*p*C)
            count = visible.sum(dim=(1, 2), keepdim=True).clamp_min(1)
            mean = (target * visible).sum(dim=(1, 2), keepdim=True) / count  # (B, 1, 1)
            var = (((target - mean) ** 2) * visible).sum(dim=(1, 2), keepdim=True) / count
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = unpatchify(pred, p, grid=grid, channels=channels).to(imgs.dtype)
    pixel_mask = unpatchify(
        mask.detach().to(imgs.dtype)[..., None].expand(-1, -1, p * p * channels), p, grid=grid, channels=channels
    )
    visible_pixels = imgs * (1 - pixel_mask)
    return {"masked": visible_pixels, "reconstruction": recon, "pasted": visible_pixels + recon * pixel_mask}
