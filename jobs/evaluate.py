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

from service.cli import build_parser, parse_config, report_config_error, setup_logging  # noqa: E402
from service.evaluate import EvaluateConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "evaluate.py",
        __doc__,
        EvaluateConfig,
        "python jobs/evaluate.py --model models:/convmae-tiny@champion --knn_k 20\n"
        "  python jobs/evaluate.py --model random:convmae_tiny:64      # untrained baseline",
    )
    _, config = parse_config(parser, EvaluateConfig, argv)
    setup_logging()
    from service.evaluate import run_evaluation
    from service.job_errors import USER_ERRORS

    try:
        result = run_evaluation(config)
    except USER_ERRORS as exc:
        report_config_error(parser, exc)
    print(result.table())
    if result.logged:
        print(f"logged to MLflow run {result.run_id}")
    elif config.output:
        print(f"results written to {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
