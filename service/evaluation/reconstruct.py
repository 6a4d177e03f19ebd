"""Reconstruction pictures of a pretrained model: the driver of ``jobs/reconstruct.py``.

Takes the first ``images`` images of a data set split (or image files / URLs given in
``inputs``), masks them with seeded masks at ``mask_ratio`` and writes one PNG: a row per
image with original | masked | reconstruction | reconstruction with the visible patches pasted
(``service.evaluation.visualize``, the pretraining loop's own code path; ``norm_pix_loss`` outputs are
mapped back to pixels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from service.config import ConfigError, ReconstructConfig

log = logging.getLogger(__name__)

@dataclass
class ReconstructResult:
    path: Path
    size: tuple[int, int]  # (width, height) in pixels
    images: int
    model: str
    run_id: str | None = None


def load_images(cfg: ReconstructConfig, img_size: int) -> torch.Tensor:
    """(N, 3, img_size, img_size) normalised images: ``cfg.inputs`` files, else the data split."""
    from service import data as data_lib

    if cfg.inputs:
        import fsspec
        from PIL import Image

        transform = data_lib.transforms.eval_transform(img_size)
        tensors = []
        for url in [u.strip() for u in cfg.inputs.split(",") if u.strip()][: cfg.images]:
            try:
                with fsspec.open(url, "rb") as f, Image.open(f) as img:
                    data_lib.transforms.check_pixels(img, cfg.data.max_image_pixels)
                    tensors.append(transform(img.convert("RGB")))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"inputs: cannot read image {url!r}: {exc}") from None
        return torch.stack(tensors)
    train_url, val_url = data_lib.resolve_data_urls(cfg.data)
    url = val_url if cfg.split == "val" else train_url
    if not url:
        raise ConfigError("split=val but the data set has no validation split: set data.val_url or split=train")
    batch = next(iter(data_lib.build_eval_loader(url, cfg.data, storage=cfg.storage, img_size=img_size, batch_size=cfg.images)), None)
    if batch is None:
        raise ConfigError(f"no decodable images in {url}")
    return batch["images"]


def run_reconstruct(cfg: ReconstructConfig) -> ReconstructResult:
    from service.data import storage_options
    from service.evaluation.visualize import render_reconstructions
    from service.models.source import ModelSourceError, load_model_source
    from service.tracking import Tracker, resolve_tracking_uri

    cfg.validate()
    source = load_model_source(cfg.model, tracking_uri=resolve_tracking_uri(cfg.tracking_uri),
                               preset=cfg.model_preset or None, img_size=cfg.img_size or None, seed=cfg.seed,
                               storage_options=storage_options(cfg.storage))
    if not source.is_pretraining_model:
        raise ModelSourceError(f"--model {cfg.model!r} has no decoder (a fine-tuned or backbone-only model): "
                               "reconstructions need a pretraining model")
    images = load_images(cfg, source.config.img_size)
    grid = render_reconstructions(source.model, images, mask_ratio=cfg.mask_ratio, seed=cfg.seed, scale=cfg.scale,
                                  stats=cfg.stats)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    log.info("wrote %s (%dx%d, %d images, mask ratio %.2f)", out, grid.width, grid.height, len(images),
             cfg.mask_ratio)
    if cfg.log_to_run and source.run_id and source.tracking_uri:
        Tracker(source.tracking_uri, source.run_id).log_image(grid, f"reconstructions/{out.name}")
    return ReconstructResult(path=out, size=grid.size, images=len(images), model=source.describe(),
                             run_id=source.run_id)
