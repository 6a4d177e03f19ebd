import argparse
import io
import json
import pathlib

import pytest
import torch

import convmae
from convmae import CheckpointMismatchError


def official_keys_and_shapes(cfg):
    """The state_dict of the official MaskedAutoencoderConvViT for ``cfg``, enumerated from its
    module definitions (models_convmae.py, vision_transformer.py), independently of our code."""
    c1, c2, c3 = cfg.embed_dims
    dec = cfg.decoder_embed_dim
    tokens = cfg.num_patches
    keys = {}

    def lin(name, n_in, n_out):
        keys[f"{name}.weight"] = (n_out, n_in)
        keys[f"{name}.bias"] = (n_out,)

    def conv(name, n_in, n_out, k, groups=1):
        keys[f"{name}.weight"] = (n_out, n_in // groups, k, k)
        keys[f"{name}.bias"] = (n_out,)

    def norm(name, d):
        keys[f"{name}.weight"] = (d,)
        keys[f"{name}.bias"] = (d,)

    for i, (n_in, n_out, p) in enumerate([(3, c1, 4), (c1, c2, 2), (c2, c3, 2)], start=1):
        conv(f"patch_embed{i}.proj", n_in, n_out, p)
        norm(f"patch_embed{i}.norm", n_out)
    lin("patch_embed4", c3, c3)
    conv("stage1_output_decode", c1, c3, 4)
    conv("stage2_output_decode", c2, c3, 2)
    keys["pos_embed"] = (1, tokens, c3)
    for stage, (dim, depth, ratio) in enumerate(zip((c1, c2), cfg.depths[:2], cfg.mlp_ratios[:2]), start=1):
        hidden = int(dim * ratio)
        for b in range(depth):
            pre = f"blocks{stage}.{b}"
            norm(f"{pre}.norm1", dim)
            conv(f"{pre}.conv1", dim, dim, 1)
            conv(f"{pre}.conv2", dim, dim, 1)
            conv(f"{pre}.attn", dim, dim, 5, groups=dim)
            norm(f"{pre}.norm2", dim)
            conv(f"{pre}.mlp.fc1", dim, hidden, 1)
            conv(f"{pre}.mlp.fc2", hidden, dim, 1)

    def vit_block(pre, dim, ratio):
        norm(f"{pre}.norm1", dim)
        lin(f"{pre}.attn.qkv", dim, 3 * dim)
        lin(f"{pre}.attn.proj", dim, dim)
        norm(f"{pre}.norm2", dim)
        lin(f"{pre}.mlp.fc1", dim, int(dim * ratio))
        lin(f"{pre}.mlp.fc2", int(dim * ratio), dim)

    for b in range(cfg.depths[2]):
        vit_block(f"blocks3.{b}", c3, cfg.mlp_ratios[2])
    norm("norm", c3)
    lin("decoder_embed", c3, dec)
    keys["mask_token"] = (1, 1, dec)
    keys["decoder_pos_embed"] = (1, tokens, dec)
    for b in range(cfg.decoder_depth):
        vit_block(f"decoder_blocks.{b}", dec, cfg.mlp_ratios[0])
    norm("decoder_norm", dec)
    lin("decoder_pred", dec, 16 * 16 * 3)
    return keys


def outputs(model, x):
    with torch.no_grad():
        return model(x, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["convmae_tiny", "convmae_base"])
def test_export_uses_official_names_and_shapes(name):
    with torch.device("meta"):
        model = convmae.build_model(name)
    exported = convmae.export_official_state_dict(model)
    expected = official_keys_and_shapes(model.config)
    assert set(exported) == set(expected)
    for key, shape in expected.items():
        assert tuple(exported[key].shape) == shape, key


def test_official_round_trip(tiny_model, images):
    model = tiny_model()
    exported = convmae.export_official_state_dict(model)
    fresh = convmae.build_model("convmae_tiny").eval()
    convmae.load_official_checkpoint(exported, fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = images(batch=2)
    for a, b in zip(outputs(model, x), outputs(fresh, x)):
        assert torch.equal(a, b)


def test_official_training_checkpoint_file_with_args(tmp_path, tiny_model):
    """Official checkpoints are {'model', 'optimizer', 'epoch', 'scaler', 'args': Namespace}."""
    model = tiny_model()
    path = tmp_path / "checkpoint-1599.pth"
    torch.save(
        {
            "model": convmae.export_official_state_dict(model),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "epoch": 1599,
            "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model="convmae_convvit_base_patch16", norm_pix_loss=True),
        },
        path,
    )
    fresh = convmae.build_model("convmae_tiny")
    convmae.load_official_checkpoint(path, fresh)
    assert torch.equal(fresh.encoder.token_proj.weight, model.encoder.token_proj.weight)
    buf = io.BytesIO(path.read_bytes())
    convmae.load_official_checkpoint(buf, convmae.build_model("convmae_tiny"))


class _Exploit:
    """Unpickling this would create ``marker``: the classic code-execution-on-load payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "payload-ran"
    torch.save({"model": {"pos_embed": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(ValueError, match="refusing"):
        convmae.load_official_checkpoint(path, convmae.build_model("convmae_tiny"))
    with pytest.raises(ValueError, match="refusing"):
        convmae.ConvMAEBackbone.from_pretrained(path, cfg=convmae.convmae_tiny())
    assert not marker.exists()


def test_mismatched_official_checkpoint_names_keys(tiny_model):
    model = tiny_model()
    exported = convmae.export_official_state_dict(model)
    exported.pop("blocks3.1.attn.qkv.weight")
    exported["blocks3.7.attn.qkv.weight"] = torch.zeros(3)
    exported["some_extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointMismatchError) as err:
        convmae.load_official_checkpoint(exported, convmae.build_model("convmae_tiny"))
    message = str(err.value)
    for key in ("blocks3.1.attn.qkv.weight", "blocks3.7.attn.qkv.weight", "some_extra.weight"):
        assert key in message
    assert err.value.missing == ["blocks3.1.attn.qkv.weight"]


def test_checkpoint_of_another_size_is_rejected_with_shapes(tiny_model):
    exported = convmae.export_official_state_dict(tiny_model())
    other = convmae.build_model("convmae_tiny", embed_dims=(32, 48, 96))
    with pytest.raises(CheckpointMismatchError, match="mis-shaped") as err:
        convmae.load_official_checkpoint(exported, other)
    assert ("patch_embed4.weight", (64, 64), (96, 96)) in err.value.mismatched
    assert "decoder_embed.weight: checkpoint (64, 64) vs model (64, 96)" in str(err.value)


def test_non_official_state_dict_is_rejected(tiny_model):
    with pytest.raises(CheckpointMismatchError, match="not an official"):
        convmae.load_official_checkpoint(tiny_model().state_dict(), convmae.build_model("convmae_tiny"))


def test_ddp_prefix_is_stripped(tiny_model):
    source = tiny_model()
    exported = {f"module.{k}": v for k, v in convmae.export_official_state_dict(source).items()}
    torch.manual_seed(1)
    target = convmae.build_model("convmae_tiny")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    loaded = convmae.load_official_checkpoint({"model": exported}, target).state_dict()
    expected = source.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)  # every weight came from the checkpoint
    assert not all(torch.equal(before[k], expected[k]) for k in expected)  # and the two starts differed


def test_official_checkpoint_into_backbone(tiny_model, tmp_path):
    model = tiny_model()
    path = tmp_path / "official.pth"
    torch.save({"model": convmae.export_official_state_dict(model)}, path)
    backbone = convmae.ConvMAEBackbone.from_pretrained(path, cfg=model.config)
    assert torch.equal(backbone.encoder.stage1_blocks[0].pw_in.weight, model.encoder.stage1_blocks[0].pw_in.weight)
    convmae.load_official_checkpoint(path, convmae.ConvMAEBackbone(model.config))


def test_save_and_load_pretrained(tmp_path, tiny_model, images):
    model = tiny_model(img_size=32, norm_pix_loss=False)
    convmae.save_pretrained(model, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]
    loaded = convmae.load_pretrained(tmp_path / "run").eval()
    assert loaded.config == model.config
    x = images(batch=2, size=32)
    for a, b in zip(outputs(model, x), outputs(loaded, x)):
        assert torch.equal(a, b)
    backbone = convmae.ConvMAEBackbone.from_pretrained(tmp_path / "run")
    assert backbone.config == model.config


def test_save_and_load_a_fine_tuned_backbone_with_its_head(tmp_path, tiny_model, images):
    torch.manual_seed(1)
    classifier = convmae.ConvMAEBackbone.from_pretrained(tiny_model(img_size=32), num_classes=7).eval()
    torch.nn.init.normal_(classifier.head.weight)  # a trained head, not the near-zero init
    convmae.save_pretrained(classifier, tmp_path / "clf")
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert meta["architecture"] == "backbone" and meta["num_classes"] == 7 and meta["global_pool"] is True
    loaded = convmae.load_pretrained(tmp_path / "clf").eval()
    assert isinstance(loaded, convmae.ConvMAEBackbone) and loaded.num_classes == 7
    x = images(batch=2, size=32)
    with torch.no_grad():
        assert torch.equal(loaded(x), classifier(x))
    with pytest.raises(ValueError, match="unknown architecture 'detector'"):
        (tmp_path / "clf" / "config.json").write_text(json.dumps({**meta, "architecture": "detector"}))
        convmae.load_pretrained(tmp_path / "clf")


def test_load_pretrained_with_wrong_config_names_keys(tmp_path, tiny_model):
    convmae.save_pretrained(tiny_model(), tmp_path / "run")
    config = (tmp_path / "run" / "config.json").read_text().replace('"decoder_depth": 2', '"decoder_depth": 3')
    (tmp_path / "run" / "config.json").write_text(config)
    with pytest.raises(CheckpointMismatchError, match="decoder.blocks.2.attn.qkv.weight"):
        convmae.load_pretrained(tmp_path / "run")


def test_key_mapping_is_a_bijection_on_the_official_keys():
    for key in official_keys_and_shapes(convmae.convmae_tiny()):
        ours = convmae.official_key_to_ours(key)
        assert ours is not None and convmae.our_key_to_official(ours) == key
    assert convmae.official_key_to_ours("blocks1.0.attn.weight") == "encoder.stage1_blocks.0.dw.weight"
    assert convmae.official_key_to_ours("blocks3.0.attn.qkv.weight") == "encoder.stage3_blocks.0.attn.qkv.weight"
