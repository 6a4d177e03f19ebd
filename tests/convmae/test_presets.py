"""Presets, config round trips and parameter counts (computed on the meta device).

Expected parameter counts are computed here independently, from the layer definitions of the
official code (Alpha-VL/ConvMAE ``models_convmae.py`` and ``vision_transformer.py``: PatchEmbed,
CBlock, CMlp, Block, Attention, Mlp), not from our modules. Where the official project states a
number, it is checked too:

* ConvMAE-L: 322M parameters (official README, May 2022 "Main Results on ImageNet-1K" table).
* ConvMAE-B: the README/paper table says 88M, but that is the ViT-B figure repeated for every
  row; the official code (and checkpoint) for Base has 84.45M encoder parameters, which is what
  the closed form below gives. We therefore only check Base against the closed form.
"""

import json
import math

import pytest
import torch

import convmae

# Constructor arguments of the official model for each preset (see convmae/configs.py for where
# each comes from). decoder: 512-d, 8 blocks, 16 heads, MLP ratio = mlp_ratio[0] (official).
OFFICIAL_ARGS = {
    "convmae_small": dict(embed_dim=(128, 256, 384), depth=(2, 2, 11), num_heads=6, mlp_ratio=(4, 4, 4)),
    "convmae_base": dict(embed_dim=(256, 384, 768), depth=(2, 2, 11), num_heads=12, mlp_ratio=(4, 4, 4)),
    "convmae_large": dict(embed_dim=(384, 768, 1024), depth=(2, 2, 23), num_heads=16, mlp_ratio=(8, 8, 4)),
    "convmae_huge": dict(embed_dim=(768, 1024, 1280), depth=(2, 2, 31), num_heads=16, mlp_ratio=(8, 8, 4)),
}


def linear(n_in, n_out):
    return n_in * n_out + n_out


def layer_norm(d):
    return 2 * d


def patch_embed(c_in, c_out, p):  # Conv2d(k=p, s=p) + LayerNorm
    return c_in * c_out * p * p + c_out + layer_norm(c_out)


def cblock(d, mlp_ratio, kernel=5):  # norm1, conv1 (1x1), attn (depthwise kxk), conv2 (1x1), norm2, CMlp
    hidden = int(d * mlp_ratio)
    return (
        layer_norm(d) + linear(d, d) + (d * kernel * kernel + d) + linear(d, d) + layer_norm(d)
        + linear(d, hidden) + linear(hidden, d)
    )


def block(d, mlp_ratio):  # norm1, attn.qkv, attn.proj, norm2, Mlp
    hidden = int(d * mlp_ratio)
    return layer_norm(d) + linear(d, 3 * d) + linear(d, d) + layer_norm(d) + linear(d, hidden) + linear(hidden, d)


def official_encoder_params(embed_dim, depth, mlp_ratio, in_chans=3, patch=(4, 2, 2)):
    """ConvViT without head: patch_embed1-4, blocks1-3 (pos_embed counted separately)."""
    c1, c2, c3 = embed_dim
    return (
        patch_embed(in_chans, c1, patch[0]) + patch_embed(c1, c2, patch[1]) + patch_embed(c2, c3, patch[2])
        + linear(c3, c3)  # patch_embed4
        + depth[0] * cblock(c1, mlp_ratio[0]) + depth[1] * cblock(c2, mlp_ratio[1])
        + depth[2] * block(c3, mlp_ratio[2])
    )


def official_pretrain_params(embed_dim, depth, mlp_ratio, img_size=224, in_chans=3, dec=512, dec_depth=8):
    c1, c2, c3 = embed_dim
    tokens = (img_size // 16) ** 2
    return (
        official_encoder_params(embed_dim, depth, mlp_ratio, in_chans)
        + tokens * c3  # pos_embed (frozen, but an nn.Parameter in the official model)
        + (c1 * c3 * 16 + c3) + (c2 * c3 * 4 + c3)  # stage1/2_output_decode
        + layer_norm(c3)  # norm
        + linear(c3, dec) + dec + tokens * dec  # decoder_embed, mask_token, decoder_pos_embed
        + dec_depth * block(dec, mlp_ratio[0]) + layer_norm(dec) + linear(dec, 16 * 16 * in_chans)
    )


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_preset_names_and_types():
    assert set(convmae.PRESETS) == {"convmae_tiny", "convmae_small", "convmae_base", "convmae_large", "convmae_huge",
                                    "mae_tiny", "mae_small", "mae_base"}
    for name, make in convmae.PRESETS.items():
        cfg = make()
        family = convmae.MAEConfig if name.startswith("mae_") else convmae.ConvMAEConfig
        assert isinstance(cfg, family), name
        assert cfg == getattr(convmae, name)()


@pytest.mark.parametrize("name", sorted(OFFICIAL_ARGS))
def test_preset_matches_official_arguments(name):
    cfg = convmae.PRESETS[name]()
    args = OFFICIAL_ARGS[name]
    assert cfg.img_size == 224 and cfg.in_chans == 3
    assert cfg.patch_sizes == (4, 2, 2) and cfg.patch_size == 16
    assert cfg.embed_dims == args["embed_dim"]
    assert cfg.depths == args["depth"]
    assert cfg.num_heads == args["num_heads"]
    assert cfg.mlp_ratios == tuple(float(r) for r in args["mlp_ratio"])
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 8, 16)
    assert cfg.decoder_mlp_ratio == args["mlp_ratio"][0]
    assert cfg.dw_kernel_size == 5


@pytest.mark.parametrize("name", sorted(OFFICIAL_ARGS))
def test_parameter_counts_equal_official_closed_form(name):
    args = OFFICIAL_ARGS[name]
    with torch.device("meta"):
        model = convmae.build_model(name)
        backbone = convmae.ConvMAEBackbone(model.config, num_classes=1000)
    assert count(model) == official_pretrain_params(args["embed_dim"], args["depth"], args["mlp_ratio"])
    encoder = official_encoder_params(args["embed_dim"], args["depth"], args["mlp_ratio"])
    assert count(model.encoder) - model.encoder.pos_embed.numel() == encoder
    # Official fine-tuning ConvViT: encoder + pos_embed + fc_norm + head.
    c3 = args["embed_dim"][2]
    assert count(backbone) == encoder + 196 * c3 + layer_norm(c3) + linear(c3, 1000)


def test_large_encoder_matches_official_readme_322m():
    with torch.device("meta"):
        model = convmae.build_model("convmae_large")
    encoder = count(model.encoder) - model.encoder.pos_embed.numel()
    assert round(encoder / 1e6) == 322


def test_tiny_is_small_enough_for_cpu_tests():
    with torch.device("meta"):
        model = convmae.build_model("convmae_tiny")
    assert count(model) < 1_000_000
    cfg = model.config
    args = dict(embed_dim=cfg.embed_dims, depth=cfg.depths, mlp_ratio=cfg.mlp_ratios)
    expected = official_pretrain_params(
        img_size=cfg.img_size, dec=cfg.decoder_embed_dim, dec_depth=cfg.decoder_depth, **args
    )
    assert count(model) == expected


def test_config_round_trip_through_json():
    cfg = convmae.convmae_large().replace(img_size=448, norm_pix_loss=False)
    restored = convmae.ConvMAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert restored.embed_dims == (384, 768, 1024)  # lists from JSON become tuples again


def test_config_is_frozen_and_validated():
    cfg = convmae.convmae_base()
    with pytest.raises(AttributeError):
        cfg.img_size = 32
    with pytest.raises(ValueError, match="multiple"):
        convmae.convmae_base().replace(img_size=200)
    with pytest.raises(ValueError, match="unknown"):
        convmae.ConvMAEConfig.from_dict({"img_size": 224, "no_such_field": 1})
    with pytest.raises(ValueError, match="num_heads"):
        convmae.ConvMAEConfig(embed_dims=(32, 48, 66), num_heads=4)


@pytest.mark.parametrize("name", sorted(convmae.PRESETS))
def test_parameter_estimate_is_close_to_the_built_model(name):
    cfg = convmae.get_config(name)
    with torch.device("meta"):  # shapes only
        real = sum(p.numel() for p in convmae.build_model_from_config(cfg).parameters())
    assert abs(cfg.estimated_parameters() - real) <= 0.02 * real
    assert cfg.estimated_parameters() < convmae.configs.MAX_PARAMETERS / 5 or name == "convmae_huge"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"embed_dims": (256, 384, 100_000)}, r"embed_dims\[2\]=100000 is not allowed: a whole number in 1..4096"),
    ({"depths": (2, 2, 10_000)}, r"depths\[2\]=10000 is not allowed: a whole number in 1..64"),
    ({"img_size": 1_000_000}, r"img_size=1000000 is not allowed: a whole number in 1..4096"),
    ({"num_heads": 0}, r"num_heads=0 is not allowed"),
    ({"decoder_depth": 5000}, r"decoder_depth=5000 is not allowed"),
    ({"mlp_ratios": (4.0, 4.0, 1e6)}, r"mlp_ratios\[2\]=1000000.0 is not allowed: a number in \(0, 16\]"),
    ({"embed_dims": (256, 384, "768")}, r"embed_dims\[2\]='768' is not allowed"),
    ({"depths": 12}, r"depths=12 is not allowed: one entry per stage"),
    # Every key within its bound, the whole far beyond any real model.
    ({"embed_dims": (4096, 4096, 4096), "depths": (64, 64, 64), "mlp_ratios": (16.0, 16.0, 16.0)},
     r"a model of about \d+\.\dB parameters is not allowed: at most 4B"),
])
def test_absurd_sizes_fail_before_anything_is_allocated(overrides, message):
    # config.json comes from elsewhere (a folder, a registry download): the limits are checked
    # when the config is built, long before the ~100 GB such a model would take.
    with pytest.raises(ValueError, match=message):
        convmae.ConvMAEConfig.from_dict({**convmae.convmae_base().to_dict(), **overrides})


def test_the_largest_preset_fits_the_limits_with_room():
    huge = convmae.convmae_huge()
    assert huge.replace(img_size=1024, depths=(4, 4, 48)).estimated_parameters() > 1e9  # still allowed


def test_build_model_applies_overrides():
    model = convmae.build_model("convmae_tiny", img_size=32, norm_pix_loss=False)
    assert model.config == convmae.convmae_tiny().replace(img_size=32, norm_pix_loss=False)
    assert model.decoder.pos_embed.shape == (1, 4, model.config.decoder_embed_dim)
    assert convmae.build_model_from_config(model.config).config == model.config
    with pytest.raises(KeyError, match="convmae_gigantic"):
        convmae.build_model("convmae_gigantic")


def test_grid_properties():
    cfg = convmae.convmae_base()
    assert (cfg.patch_size, cfg.grid_size, cfg.num_patches) == (16, 14, 196)
    assert math.prod(cfg.patch_sizes) == cfg.patch_size
