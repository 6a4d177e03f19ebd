import torch

from service.config import PretrainConfig, with_overrides
from service.distributed import deepspeed_config, param_groups


def test_deepspeed_config_is_generated_from_the_run_config():
    cfg = with_overrides(PretrainConfig(), {"dist.zero_stage": 3, "dist.num_workers": 4,
                                            "train.batch_size_per_worker": 8, "train.grad_accum_steps": 2,
                                            "train.clip_grad": 3.0})
    cpu = deepspeed_config(cfg, use_gpu=False, precision="fp32", lr=1e-3)
    assert cpu["zero_optimization"]["stage"] == 3
    assert cpu["train_batch_size"] == 8 * 2 * 4
    assert cpu["gradient_clipping"] == 3.0
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    assert "optimizer" not in cpu  # CPU: torch AdamW as client optimizer
    assert cpu["zero_optimization"]["reduce_scatter"] is False  # gloo has none

    gpu = deepspeed_config(with_overrides(cfg, {"dist.offload_optimizer": True}), use_gpu=True,
                           precision="bf16", lr=1e-3)
    assert gpu["bf16"]["enabled"]
    assert gpu["optimizer"]["type"] == "AdamW"
    assert gpu["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8))
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)

    def no_weight_decay(self):
        return {"pos_embed"}


def test_no_weight_decay_on_norms_biases_and_position_embeddings():
    groups = param_groups(_Toy(), weight_decay=0.05)
    no_decay, decay = groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert len(decay["params"]) == 1 and decay["params"][0].shape == (8, 8)  # only proj.weight
    assert len(no_decay["params"]) == 4  # pos_embed, proj.bias, norm.weight, norm.bias
