"""``dist.compile``: the compiled engine trains like the eager one and saves the same names."""

from __future__ import annotations

import pytest
import torch

from convmae import build_model
from service.config import PretrainConfig, with_overrides
from service.runtime.engine import Engine
from service.training.pretrain_worker import mask_generator
from tests.service.runtime.engines import single_rank

# Inductor compiles the tiny model in 1-2 minutes on 2 cores: not part of the default run.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def single_process_group():
    """One gloo rank, as a worker outside Ray Train (a benchmark or notebook) has."""
    with single_rank():
        yield


def train_losses(compile_model: bool, steps: int = 3) -> tuple[list[float], list[str]]:
    cfg = with_overrides(PretrainConfig(), {"dist.use_gpu": False, "train.batch_size_per_worker": 4})
    torch.manual_seed(0)
    model = build_model("convmae_tiny", img_size=32)
    engine = Engine.build(model, cfg, use_gpu=False, precision="fp32", lr=1e-3, compile_model=compile_model)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(steps):
        loss, _, _ = engine(images, mask_ratio=0.75, generator=mask_generator(0, 0, step))
        engine.backward_and_step(loss)
        losses.append(float(loss.detach()))
    return losses, sorted(engine.module.state_dict())


def test_compiled_engine_gives_the_eager_losses_and_state_dict_names(single_process_group):
    eager, eager_names = train_losses(compile_model=False)
    compiled, compiled_names = train_losses(compile_model=True)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert compiled_names == eager_names and not any("_orig_mod" in n for n in compiled_names)
