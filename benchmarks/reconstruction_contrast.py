"""How far apart a trained model's reconstruction grid and its random start's look, for each
way of mapping a ``norm_pix_loss`` prediction back to pixels (``convmae.reconstruct``'s
``stats``).

"target" denormalises each masked patch with its own mean and variance, as MAE's demos do: the
patch's coarse brightness then comes from the image, so a random model's grid already shows the
digit's shape. "visible" uses only the visible patches' statistics. The figure printed is the
error of the masked pixels (pasted grid against the original, in [0, 1] pixels, mean squared)
of the baseline over that of the model: the larger, the more obvious the difference to the eye.

    python3 benchmarks/reconstruction_contrast.py --model models:/convmae_tiny-96px-digits/1 \\
        --baseline random:convmae_tiny:96 --tracking-uri sqlite:///mlruns.db
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from convmae import reconstruct, unpatchify  # noqa: E402
from convmae.reconstruct import STATS  # noqa: E402
from service.config import DataConfig  # noqa: E402
from service.evaluation.visualize import masked_prediction, to_uint8  # noqa: E402


def pixel_mask(config: object, mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) True where a pixel's patch is masked."""
    p = config.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    per_patch = mask.float()[..., None].expand(-1, -1, p * p * images.shape[1])
    return unpatchify(per_patch, p, grid=grid, channels=images.shape[1])[:, 0].bool()


def masked_error(model: torch.nn.Module, images: torch.Tensor, *, mask_ratio: float, seed: int) -> dict[str, float]:
    """Mean squared error of the masked pixels of the pasted grid, per ``stats``."""
    _, pred, mask = masked_prediction(model, images, mask_ratio=mask_ratio, seed=seed)
    original = torch.from_numpy(to_uint8(images)).float() / 255.0  # (B, H, W, 3)
    errors = {}
    for stats in STATS:
        out = reconstruct(model.config, images, pred.float(), mask.float(), stats=stats)
        pasted = torch.from_numpy(to_uint8(out["pasted"])).float() / 255.0
        hidden = pixel_mask(model.config, mask, images)  # (B, H, W)
        errors[stats] = float(((pasted - original) ** 2).mean(dim=-1)[hidden].mean())
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the trained model (any --model source)")
    parser.add_argument("--baseline", required=True, help="its random start, e.g. random:convmae_tiny:96")
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns.db")
    parser.add_argument("--embedded-dir", default="convmae_data", help="where the embedded digits are (or go)")
    parser.add_argument("--images", type=int, default=180, help="validation images scored")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images {args.images}: at least 1")

    from service import data as data_lib
    from service.models.source import load_model_source

    model = load_model_source(args.model, tracking_uri=args.tracking_uri)
    baseline = load_model_source(args.baseline, tracking_uri=args.tracking_uri)
    data = DataConfig(embedded_dir=args.embedded_dir)
    _, val_url = data_lib.resolve_data_urls(data)
    loader = data_lib.build_eval_loader(val_url, data, img_size=model.config.img_size, batch_size=args.images)
    images = next(iter(loader))["images"].float()
    errors = {name: masked_error(source.model.eval(), images, mask_ratio=args.mask_ratio, seed=args.seed)
              for name, source in (("model", model), ("baseline", baseline))}
    ratios = {s: errors["baseline"][s] / max(errors["model"][s], 1e-12) for s in STATS}
    if args.json:
        print(json.dumps({"errors": errors, "baseline_over_model": ratios, "images": len(images)}))
        return 0
    print(f"masked-pixel MSE over {len(images)} validation images, mask ratio {args.mask_ratio}")
    print(f"{'stats':<8} {'baseline':>10} {'model':>10} {'baseline/model':>15}")
    for s in STATS:
        print(f"{s:<8} {errors['baseline'][s]:>10.4f} {errors['model'][s]:>10.4f} {ratios[s]:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
