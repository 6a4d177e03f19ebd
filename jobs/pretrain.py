"""Pretrain ConvMAE with Ray Train + DeepSpeed ZeRO, tracked and registered in MLflow.

With no flags it runs end to end on this machine: a local Ray cluster, CPU unless GPUs are
present, the embedded data set, and an MLflow store in ./mlruns.db. On a cluster:

    ray job submit --working-dir . -- python jobs/pretrain.py \\
        --config jobs/configs/convmae_base_in1k.yaml --data.url s3://bucket/imagenet
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from service.cli import run_job  # noqa: E402
from service.config import PretrainConfig, redact_url  # noqa: E402


def _train(config: PretrainConfig):
    from service.training.pretrain import run_pretraining

    return run_pretraining(config)


def _report(result, config: PretrainConfig) -> int:
    print(f"run {result.run_name}: checkpoint {result.checkpoint_path}")
    print(f"metrics: {result.metrics}")
    if result.registered_uri:
        print(f"registered model: {result.registered_uri} (MLflow {redact_url(result.tracking_uri)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    example = "python jobs/pretrain.py --config jobs/configs/tiny_cpu.yaml --train.epochs 3 --dist.num_workers 2"
    return run_job("pretrain.py", __doc__.split("\n\n")[0], PretrainConfig, example, _train, _report, argv)


if __name__ == "__main__":
    sys.exit(main())
