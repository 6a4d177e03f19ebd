import pytest
import torch

import convmae
from convmae import CheckpointMismatchError, ConvMAEBackbone, layer_id_for


@pytest.mark.parametrize("size", [32, 64])
def test_forward_features_shapes(size, images):
    cfg = convmae.convmae_tiny().replace(img_size=size)
    backbone = ConvMAEBackbone(cfg).eval()
    feats = backbone.forward_features(images(batch=2, size=size))
    c1, c2, c3 = cfg.embed_dims
    assert feats["stage1"].shape == (2, c1, size // 4, size // 4)
    assert feats["stage2"].shape == (2, c2, size // 8, size // 8)
    assert feats["stage3"].shape == (2, c3, size // 16, size // 16)
    assert feats["pooled"].shape == (2, c3)
    assert torch.equal(backbone(images(batch=2, size=size)), feats["pooled"])


def test_classification_head(images):
    backbone = ConvMAEBackbone(convmae.convmae_tiny(), num_classes=7, global_pool=False).eval()
    logits = backbone(images(batch=3))
    assert logits.shape == (3, 7)
    assert backbone.head.weight.std() < 1e-3  # official fine-tuning head init (std 2e-5)


def test_from_pretrained_model_reproduces_pretraining_encoder(tiny_model, images):
    model = tiny_model()
    backbone = ConvMAEBackbone.from_pretrained(model).eval()
    x = images(batch=2)
    with torch.no_grad():
        s1, s2, tokens = model.encoder.forward_features(x)
        feats = backbone.forward_features(x)
    assert torch.equal(feats["stage1"], s1.permute(0, 3, 1, 2))
    assert torch.equal(feats["stage2"], s2.permute(0, 3, 1, 2))
    assert torch.equal(feats["stage3"].flatten(2).transpose(1, 2), tokens)
    assert backbone.encoder.pos_embed.requires_grad  # learnable when fine-tuning, as official


def test_load_official_keys_reports_ignored_pretraining_parts(tiny_model):
    model = tiny_model()
    backbone = ConvMAEBackbone(model.config, num_classes=5)
    report = backbone.load_pretrain_state_dict({"model": convmae.export_official_state_dict(model)})
    assert any(k.startswith("decoder.") for k in report.ignored)
    assert "fuse_stage1.weight" in report.ignored and "encoder_norm.weight" in report.ignored
    assert set(report.newly_initialized) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    for name, value in backbone.encoder.state_dict().items():
        assert torch.equal(value, model.encoder.state_dict()[name]), name


def test_global_pool_false_loads_the_pretraining_norm(tiny_model):
    model = tiny_model()
    backbone = ConvMAEBackbone.from_pretrained(model, global_pool=False)
    assert torch.equal(backbone.encoder_norm.weight, model.encoder_norm.weight)


def test_position_embedding_is_interpolated_for_a_new_size(tiny_model, images):
    model = tiny_model()  # 64x64: 4x4 grid
    backbone = ConvMAEBackbone.from_pretrained(model, cfg=model.config.replace(img_size=32))
    assert backbone.encoder.pos_embed.shape == (1, 4, model.config.embed_dims[2])
    assert backbone(images(batch=1, size=32)).shape == (1, model.config.embed_dims[2])


def test_mismatched_checkpoint_names_the_keys(tiny_model):
    model = tiny_model()
    state = model.state_dict()
    del state["encoder.stage3_blocks.1.attn.qkv.weight"]
    state["encoder.stage9_blocks.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        ConvMAEBackbone(model.config).load_pretrain_state_dict(state)
    assert "encoder.stage3_blocks.1.attn.qkv.weight" in str(err.value)
    assert "encoder.stage9_blocks.0.weight" in str(err.value)

    wider = convmae.build_model("convmae_tiny", embed_dims=(32, 48, 96))
    with pytest.raises(CheckpointMismatchError, match="mis-shaped") as err:
        ConvMAEBackbone(model.config).load_pretrain_state_dict(wider.state_dict())
    assert ("encoder.token_proj.weight", (96, 96), (64, 64)) in err.value.mismatched
    assert "encoder.stage3_embed.norm.bias: checkpoint (96,) vs model (64,)" in str(err.value)


def test_head_of_another_size_is_reinitialised(tiny_model):
    model = tiny_model()
    finetuned = ConvMAEBackbone.from_pretrained(model, num_classes=10)
    report = ConvMAEBackbone(model.config, num_classes=3).load_pretrain_state_dict(finetuned.state_dict())
    assert "head.weight" in report.ignored and "head.weight" in report.newly_initialized


def test_layer_ids_follow_the_official_lr_decay_rule():
    backbone = ConvMAEBackbone(convmae.convmae_tiny(), num_classes=4)
    depth3 = backbone.config.depths[2]
    groups = backbone.layer_groups()
    assert set(groups) == {n for n, _ in backbone.named_parameters()}
    assert backbone.num_layers == depth3 + 1
    assert groups["encoder.stage1_embed.proj.weight"] == 0
    assert groups["encoder.stage2_blocks.0.dw.weight"] == 0
    assert groups["encoder.token_proj.weight"] == 0 and groups["encoder.pos_embed"] == 0
    assert groups[f"encoder.stage3_blocks.{depth3 - 1}.mlp.fc2.bias"] == depth3
    assert groups["head.weight"] == groups["fc_norm.bias"] == depth3 + 1
    assert layer_id_for("module.encoder.stage3_blocks.0.norm1.weight", 12) == 1


def test_drop_path_rates_span_all_encoder_blocks():
    backbone = ConvMAEBackbone(convmae.convmae_tiny(), drop_path_rate=0.2)
    blocks = [*backbone.encoder.stage1_blocks, *backbone.encoder.stage2_blocks, *backbone.encoder.stage3_blocks]
    rates = [b.drop_path.drop_prob for b in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)


def test_encoder_embedding_matches_a_fresh_backbone(tiny_model, images):
    model = tiny_model()
    x = images(batch=3)
    backbone = ConvMAEBackbone.from_pretrained(model).eval()
    with torch.no_grad():
        embedding = convmae.encoder_embedding(model, x)
        assert torch.allclose(embedding, backbone(x), atol=1e-5)
        assert torch.equal(convmae.encoder_embedding(backbone, x), backbone(x))

        class Wrapper(torch.nn.Module):  # DDP / DeepSpeed engines expose the model as .module
            def __init__(self, module):
                super().__init__()
                self.module = module

        assert torch.equal(convmae.encoder_embedding(Wrapper(model), x), embedding)
    assert embedding.shape == (3, model.config.embed_dims[2])
