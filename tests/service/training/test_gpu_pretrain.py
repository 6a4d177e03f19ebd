"""The GPU path on a CUDA machine (``pytest -m gpu``): bf16, NCCL, DeepSpeed's fused Adam.

Skipped where there is no GPU; CI runs the CPU path (fp32, gloo) in test_pretrain_e2e.py.
"""

from __future__ import annotations

import pytest
import torch

from service.config import PretrainConfig, with_overrides
from service.tracking.registry import load_model
from service.training.pretrain import run_pretraining
from tests.fixtures.mlflow_server import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.e2e,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def gpu_config(tmp_path) -> PretrainConfig:
    return with_overrides(PretrainConfig(), {
        "run_name": "gpu", "model.name": "convmae_tiny", "model.img_size": 64, "data.loader_workers": 2,
        "train.epochs": 1, "train.batch_size_per_worker": 64, "train.blr": 1.5e-3, "train.max_steps": 20,
        "train.log_every_steps": 5, "train.knn_train_samples": 512,
        "dist.num_workers": 1, "dist.use_gpu": True, "dist.precision": "bf16", "dist.zero_stage": 2,
        "checkpoint.storage_path": str(tmp_path / "runs"), "checkpoint.every_steps": 10,
        "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlruns.db", "mlflow.registered_model_name": "gpu-tiny",
    })


def test_the_gpu_engine_holds_bf16_weights_over_nccl_with_deepspeeds_fused_adam(tmp_path, monkeypatch):
    """The engine a GPU worker builds for this config (Engine.build, the precision the driver
    resolves), in this process as a single NCCL rank."""
    from deepspeed.ops.adam import FusedAdam

    from convmae import build_model
    from service.runtime.cluster import resolve_precision
    from service.runtime.engine import Engine

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    cfg = gpu_config(tmp_path).validate()
    precision = resolve_precision(cfg, use_gpu=True)
    torch.manual_seed(0)
    engine = Engine.build(build_model("convmae_tiny", img_size=64).cuda(), cfg, use_gpu=True, precision=precision,
                          lr=1e-3)
    try:
        assert torch.distributed.get_backend() == "nccl"
        weights = list(engine.module.parameters())
        assert {p.dtype for p in weights} == {torch.bfloat16} and all(p.is_cuda for p in weights)
        optimizer = engine.ds_engine.optimizer  # ZeRO-2 wraps the optimizer that steps
        assert isinstance(getattr(optimizer, "optimizer", optimizer), FusedAdam)
        images = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
        loss, _, _ = engine(images, mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
        before = [p.detach().clone() for p in weights]
        assert engine.backward_and_step(loss) and torch.isfinite(loss)
        assert any(not torch.equal(a, p) for a, p in zip(before, weights))  # the fused step moved the weights
    finally:
        torch.distributed.destroy_process_group()


def test_bf16_zero2_pretraining_on_gpu_registers_a_loadable_model(ray_cluster, digits_dir, tmp_path):
    cfg = with_overrides(gpu_config(tmp_path), {"data.embedded_dir": str(digits_dir)}).validate()
    result = run_pretraining(cfg)
    assert result.metrics["step"] == 20
    assert result.metrics["val/recon_loss"] < 1.5  # finite and sane after bf16 steps
    model = load_model(result.registered_uri, tracking_uri=result.tracking_uri)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # consolidated fp32 master weights
