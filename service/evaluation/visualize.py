"""Reconstruction grids: original | masked | reconstruction | reconstruction + visible patches.

One code path for every picture: the pretraining loop (MLflow images every
``mlflow.recon_every_epochs``) and ``jobs/reconstruct.py`` both run ``masked_prediction`` and
draw with ``reconstruction_grid``, which undoes ``norm_pix_loss`` (``convmae.reconstruct``)
and the data's ImageNet normalisation.

Masked patches are drawn with the statistics of the image's visible patches (``stats="visible"``)
unless asked otherwise: with each patch's own (``"target"``, MAE's demo pictures) a random model's
grid already shows the image's coarse shape, and looks much like a trained one's
(``benchmarks/reconstruction_contrast.py`` measures the difference).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

COLUMNS = ("original", "masked", "reconstruction", "pasted")

# ImageNet statistics (the data pipeline normalises with these).
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) normalised -> (B, H, W, 3) uint8."""
    pixels = (images.float().cpu() * _STD + _MEAN).clamp(0, 1)
    return (pixels.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def reconstruction_panels(model_config: Any, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, *,
                          stats: str = "visible") -> dict[str, torch.Tensor]:
    """The four (B, 3, H, W) panels, in the data's normalised space (norm_pix_loss undone with
    ``stats``, see ``convmae.reconstruct``)."""
    from convmae import reconstruct

    out = reconstruct(model_config, images, pred, mask, stats=stats)
    return {"original": images, "masked": out["masked"], "reconstruction": out["reconstruction"],
            "pasted": out["pasted"]}


@torch.no_grad()
def masked_prediction(
    module: torch.nn.Module, images: torch.Tensor, *, mask_ratio: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, pred (B, L, p*p*3), mask (B, L)) in eval mode with masks seeded by ``seed``."""
    was_training = module.training
    module.eval()
    out = module(images, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(seed))
    module.train(was_training)
    return out


def render_reconstructions(
    model: torch.nn.Module, images: torch.Tensor, *, mask_ratio: float = 0.75, seed: int = 0, scale: int = 1,
    stats: str = "visible",
) -> Image.Image:
    """The grid of ``images`` (B, 3, H, W), normalised as the data loaders give them."""
    _, pred, mask = masked_prediction(model, images, mask_ratio=mask_ratio, seed=seed)
    return reconstruction_grid(model.config, images.float().cpu(), pred.float().cpu(), mask.float().cpu(),
                               scale=scale, stats=stats)


def reconstruction_grid(
    model_config: Any, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, *, scale: int = 1, gap: int = 2,
    stats: str = "visible",
) -> Image.Image:
    """One row per image, one column per panel (``COLUMNS``), white gaps between tiles."""
    panels = reconstruction_panels(model_config, images, pred, mask, stats=stats)
    tiles = [to_uint8(panels[c]) for c in COLUMNS]  # each (B, H, W, 3)
    b, h, w, _ = tiles[0].shape
    rows, cols = b, len(COLUMNS)
    canvas = np.full((rows * h + (rows + 1) * gap, cols * w + (cols + 1) * gap, 3), 255, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            canvas[y : y + h, x : x + w] = tiles[c][r]
    grid = Image.fromarray(canvas)
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid
