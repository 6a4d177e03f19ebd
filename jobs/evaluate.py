"""Evaluate a ConvMAE encoder: k-NN top-1, linear probe top-1, reconstruction loss.

Scores the encoder's pooled features on a labeled data set (default: the embedded digits,
train split as the k-NN bank and probe training set, val split as queries) and the MAE loss on
the val split at a fixed mask ratio with fixed masks. Prints a table; when the model came from
MLflow the metrics (eval/knn_top1, eval/linear_probe_top1, eval/recon_loss) are also logged on
the run that produced it. Runs in this process (GPU if present); no Ray needed.

--model takes models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest, runs:/ID/model, a
save_pretrained folder, a Ray/DeepSpeed checkpoint folder of our runs, a checkpoint file or URL
(file://, http(s)://, s3://; official ConvMAE .pth included), or random:PRESET[:IMG_SIZE] for
an untrained baseline (with the same seed, the starting point of a pretraining run).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from service.cli import run_job  # noqa: E402
from service.config import EvaluateConfig  # noqa: E402


def _evaluate(config: EvaluateConfig):
    from service.evaluation.evaluate import run_evaluation

    return run_evaluation(config)


def _report(result, config: EvaluateConfig) -> int:
    print(result.table())
    if result.logged:
        print(f"logged to MLflow run {result.run_id}")
    if config.output:
        print(f"results written to {config.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    example = ("python jobs/evaluate.py --model models:/convmae_tiny-64px-digits@best-sweep-tiny-mask-lr --knn_k 20\n"
               "  python jobs/evaluate.py --model random:convmae_tiny:64      # untrained baseline")
    return run_job("evaluate.py", __doc__, EvaluateConfig, example, _evaluate, _report, argv)


if __name__ == "__main__":
    sys.exit(main())
