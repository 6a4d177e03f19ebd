"""Reconstruction grids: pixel size, panel order, and norm_pix_loss outputs drawn in pixel space."""

import numpy as np
import torch

import convmae
from service.evaluation.visualize import (
    COLUMNS,
    reconstruction_grid,
    render_reconstructions,
    to_uint8,
)

GAP = 2


def tile(grid: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    y, x = GAP + row * (size + GAP), GAP + col * (size + GAP)
    return grid[y : y + size, x : x + size]


def normalised_images(batch: int, size: int, seed: int = 0, low: int = 0, high: int = 256) -> torch.Tensor:
    """Images in the loaders' ImageNet-normalised space, from uint8 pixels in [low, high)."""
    from service.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(low, high, (batch, 3, size, size), generator=g).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def test_grid_has_one_row_per_image_and_four_panels_with_gaps():
    torch.manual_seed(0)
    model = convmae.build_model("convmae_tiny", img_size=32)
    images = normalised_images(3, 32)
    grid = render_reconstructions(model, images, mask_ratio=0.75, seed=0, scale=3)
    assert len(COLUMNS) == 4
    assert grid.size == ((4 * 32 + 5 * GAP) * 3, (3 * 32 + 4 * GAP) * 3)  # (width, height)
    unscaled = np.asarray(render_reconstructions(model, images, mask_ratio=0.75, seed=0))
    assert unscaled.shape == (3 * 32 + 4 * GAP, 4 * 32 + 5 * GAP, 3)
    # The first column is the input itself; the masked panel hides 3 of the 4 16x16 patches.
    from service.evaluation.visualize import to_uint8

    assert np.array_equal(tile(unscaled, 1, 0, 32), to_uint8(images)[1])
    masked = tile(unscaled, 1, 1, 32).reshape(2, 16, 2, 16, 3)
    hidden = [(masked[i, :, j] == to_uint8(torch.zeros(1, 3, 1, 1))[0, 0, 0]).all() for i in (0, 1) for j in (0, 1)]
    assert sum(hidden) == 3


def test_norm_pix_predictions_are_drawn_in_pixel_space_with_each_patchs_statistics():
    images = normalised_images(2, 32, seed=1, low=100, high=140)  # low contrast: unit variance is far off
    target = convmae.patchify(images, 16)
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.ones(2, 4)  # everything masked: the reconstruction panel is the prediction alone
    cfg = convmae.get_config("convmae_tiny", img_size=32)  # norm_pix_loss=True
    grid = np.asarray(reconstruction_grid(cfg, images, normalised, mask, stats="target")).astype(int)
    for row in range(2):
        assert np.abs(tile(grid, row, 2, 32) - tile(grid, row, 0, 32)).max() <= 1
    # Drawn as if the model predicted raw pixels, the same output would be far off.
    raw = np.asarray(reconstruction_grid(cfg.replace(norm_pix_loss=False), images, normalised, mask,
                                         stats="target")).astype(int)
    assert np.abs(tile(raw, 0, 2, 32) - tile(raw, 0, 0, 32)).mean() > 20


def test_grids_draw_masked_patches_with_the_visible_patches_statistics_by_default():
    images = normalised_images(1, 32, seed=2, low=0, high=255)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])  # one visible patch
    cfg = convmae.get_config("convmae_tiny", img_size=32)
    flat = torch.zeros(1, 4, 768)  # the per-patch mean everywhere
    grid = np.asarray(reconstruction_grid(cfg, images, flat, mask)).astype(int)
    visible_mean = convmae.patchify(images, 16)[0, 0].mean()
    expected = to_uint8(torch.full((1, 3, 1, 1), float(visible_mean)).expand(1, 3, 32, 32) * 1.0)[0]
    # The reconstruction panel is flat at the visible patch's mean, whatever the masked pixels were.
    assert np.abs(tile(grid, 0, 2, 32) - expected.astype(int)).max() <= 1
