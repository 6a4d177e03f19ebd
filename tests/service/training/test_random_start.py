"""The random start that ``train.eval_before_training`` scores at the first validation."""

from __future__ import annotations

import torch

from convmae import build_model
from service.config import PretrainConfig, with_overrides
from service.training.pretrain_worker import starting_model


def test_the_starting_model_is_the_one_training_started_from_and_leaves_the_random_state_alone():
    cfg = with_overrides(PretrainConfig(), {"model.name": "convmae_tiny", "model.img_size": 32, "train.seed": 7})
    torch.manual_seed(cfg.train.seed)  # as the worker builds the model it trains
    trained = build_model("convmae_tiny", img_size=32, norm_pix_loss=cfg.model.norm_pix_loss).state_dict()

    torch.manual_seed(123)  # training has moved the random state on since
    state = torch.random.get_rng_state()
    rebuilt = starting_model(cfg, torch.device("cpu"), torch.bfloat16)

    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.dtype == torch.bfloat16 for p in rebuilt.parameters())
    weights = rebuilt.state_dict()
    assert weights.keys() == trained.keys()
    assert all(torch.equal(weights[k], trained[k].to(weights[k].dtype)) for k in trained)
