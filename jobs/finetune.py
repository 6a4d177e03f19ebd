"""Fine-tune a pretrained ConvMAE encoder for classification with Ray Train + DeepSpeed ZeRO.

End to end as in the paper: the encoder plus a fresh linear head on the pooled tokens, AdamW
with layer-wise lr decay, drop path, Mixup/CutMix, label smoothing, warmup + cosine schedule.
Tracked in MLflow (params, train/loss, val/top1 per epoch, val/top1 at step 0 before any
update) and registered like pretraining; models:/ then loads it as a classifier.

With no flags it fine-tunes models:/convmae_tiny-96px-digits/latest (what jobs/pretrain.py
registers with no flags) on the embedded digits on a local Ray cluster, with ./mlruns.db. --model takes the same sources as
jobs/evaluate.py (an official ConvMAE .pth file or URL too).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from service.cli import run_job  # noqa: E402
from service.config import FinetuneConfig, redact_url  # noqa: E402


def _finetune(config: FinetuneConfig):
    from service.training.finetune import run_finetuning

    return run_finetuning(config)


def _report(result, config: FinetuneConfig) -> int:
    start, end = result.metrics.get("val/top1_start"), result.metrics.get("val/top1")
    print(f"run {result.run_name}: fine-tuned {result.source}, {result.num_classes} classes; "
          f"checkpoint {result.checkpoint_path}")
    if end is not None:
        print(f"val top-1: {end:.4f}" + (f" (before fine-tuning: {start:.4f})" if start is not None else ""))
    if result.registered_uri:
        print(f"registered model: {result.registered_uri} (MLflow {redact_url(result.tracking_uri)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    example = "python jobs/finetune.py --config jobs/configs/finetune_tiny_cpu.yaml --model models:/convmae_tiny-96px-digits/1"
    return run_job("finetune.py", __doc__, FinetuneConfig, example, _finetune, _report, argv)


if __name__ == "__main__":
    sys.exit(main())
