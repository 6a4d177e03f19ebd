import torch

from service.config import PretrainConfig, with_overrides
from service.runtime.engine import deepspeed_config
from service.runtime.optim import param_groups


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


def test_deepspeed_config_leaves_out_per_tensor_work_a_single_worker_does_not_need():
    one = with_overrides(PretrainConfig(), {"dist.num_workers": 1, "dist.zero_stage": 2})
    gpu = deepspeed_config(one, use_gpu=True, precision="bf16", lr=1e-3)
    assert gpu["bf16"] == {"enabled": True, "check_grad_overflow": False}  # no inf/NaN scan per tensor
    assert gpu["gradient_clipping"] == 0.0  # clip_grad=null: none (DeepSpeed's own default is 1.0)
    # DeepSpeed's per-tensor norm off: nothing clips, the engine's GradNorm gives the metric.
    assert gpu["zero_optimization"]["compute_grad_norm"] is False
    zero = gpu["zero_optimization"]
    assert not zero["overlap_comm"] and not zero["contiguous_gradients"] and not zero["reduce_scatter"]

    four = deepspeed_config(with_overrides(one, {"dist.num_workers": 4}), use_gpu=True, precision="bf16", lr=1e-3)
    zero = four["zero_optimization"]
    assert zero["overlap_comm"] and zero["contiguous_gradients"] and zero["reduce_scatter"]
    assert not deepspeed_config(with_overrides(one, {"dist.num_workers": 4}), use_gpu=False, precision="fp32",
                                lr=1e-3)["zero_optimization"]["overlap_comm"]  # gloo

    clipped = deepspeed_config(with_overrides(one, {"train.clip_grad": 1.0}), use_gpu=True, precision="bf16",
                               lr=1e-3)
    assert clipped["gradient_clipping"] == 1.0 and "compute_grad_norm" not in clipped["zero_optimization"]
    for stage in (0, 3):  # DeepSpeed takes compute_grad_norm=false only at ZeRO-1/2
        other = deepspeed_config(with_overrides(one, {"dist.zero_stage": stage}), use_gpu=True, precision="bf16",
                                 lr=1e-3)
        assert "compute_grad_norm" not in other["zero_optimization"]


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


def test_layer_decay_groups_scale_lr_by_depth_as_the_official_recipe():
    from convmae import ConvMAEBackbone, get_config
    from service.runtime.optim import layer_decay_param_groups

    model = ConvMAEBackbone(get_config("convmae_tiny", img_size=32), num_classes=10)  # 2 blocks -> 3 layers
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)  # every trainable parameter in exactly one group
    scale = {name: by_param[id(p)]["lr_scale"] for name, p in named.items()}
    decay = {name: by_param[id(p)]["weight_decay"] for name, p in named.items()}
    # layer 0 (convs, embeddings): 0.5^3; block i: 0.5^(3 - (i + 1)); head and fc_norm: 1.
    assert scale["encoder.stage1_embed.proj.weight"] == scale["encoder.pos_embed"] == 0.125
    assert scale["encoder.stage3_blocks.0.attn.qkv.weight"] == 0.25
    assert scale["encoder.stage3_blocks.1.mlp.fc1.weight"] == 0.5
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert decay["head.weight"] == 0.05 and decay["head.bias"] == 0.0
    assert decay["encoder.pos_embed"] == 0.0 and decay["encoder.stage3_blocks.0.norm1.weight"] == 0.0
