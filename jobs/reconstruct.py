"""Render ConvMAE reconstructions as a PNG grid.

One row per image: original | masked | reconstruction | reconstruction with the visible
patches pasted back, de-normalised to pixels (per-patch normalised predictions of
norm_pix_loss models are mapped back with each patch's statistics). The same code draws the
pictures the pretraining job logs to MLflow. Images come from the data set (default: the
embedded digits' val split) or from --inputs files/URLs; masks are seeded (--seed).

--model takes the same sources as jobs/evaluate.py, but must be a pretraining model (with
its decoder): models:/..., runs:/..., a folder, a checkpoint file or URL (official ConvMAE
pretraining .pth included), or random:PRESET[:IMG_SIZE].
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from service.cli import run_job  # noqa: E402
from service.config import ReconstructConfig  # noqa: E402


def _reconstruct(config: ReconstructConfig):
    from service.evaluation.reconstruct import run_reconstruct

    return run_reconstruct(config)


def _report(result, config: ReconstructConfig) -> int:
    print(f"wrote {result.path} ({result.size[0]}x{result.size[1]} px, {result.images} images) "
          f"from {result.model}")
    return 0


def main(argv: list[str] | None = None) -> int:
    example = ("python jobs/reconstruct.py --model models:/convmae_tiny-96px-digits/1 --images 8 --out grid.png "
               "--mask_ratio 0.75 --seed 0")
    return run_job("reconstruct.py", __doc__, ReconstructConfig, example, _reconstruct, _report, argv)


if __name__ == "__main__":
    sys.exit(main())
