"""The GPU path on a CUDA machine (``pytest -m gpu``): bf16, NCCL, DeepSpeed's fused Adam.

Skipped where there is no GPU; CI runs the CPU path (fp32, gloo) in test_pretrain_e2e.py.
"""

from __future__ import annotations

import pytest
import torch

from service.config import with_overrides
from service.tracking.registry import load_model
from service.training.pretrain import run_pretraining

pytestmark = [pytest.mark.gpu, pytest.mark.e2e,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_zero2_pretraining_on_gpu_registers_a_loadable_model(ray_cluster, digits_dir, tmp_path):
    from service.config import PretrainConfig

    cfg = with_overrides(PretrainConfig(), {
        "run_name": "gpu", "model.name": "convmae_tiny", "model.img_size": 64,
        "data.embedded_dir": str(digits_dir), "data.loader_workers": 2,
        "train.epochs": 1, "train.batch_size_per_worker": 64, "train.blr": 1.5e-3, "train.max_steps": 20,
        "train.log_every_steps": 5, "train.knn_train_samples": 512,
        "dist.num_workers": 1, "dist.use_gpu": True, "dist.precision": "bf16", "dist.zero_stage": 2,
        "checkpoint.storage_path": str(tmp_path / "runs"), "checkpoint.every_steps": 10,
        "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlruns.db", "mlflow.registered_model_name": "gpu-tiny",
    }).validate()
    result = run_pretraining(cfg)
    assert result.metrics["step"] == 20
    assert result.metrics["val/recon_loss"] < 1.5  # finite and sane after bf16 steps
    model = load_model(result.registered_uri, tracking_uri=result.tracking_uri)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # consolidated fp32 master weights
