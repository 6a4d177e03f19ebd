"""The plain-ViT MAE baseline presets: sizes, FLOP parity with ConvMAE, masking, save/load.

Parameter counts are computed here from the layer definitions of the official MAE code
(facebookresearch/mae ``models_mae.py``: PatchEmbed, Block, decoder), less its cls token (the
baseline has none, like ConvMAE), not from our modules.
"""

import json

import pytest
import torch

import convmae
from service.runtime.flops import pretraining_flops_per_image

# Pretraining FLOPs per image of each MAE preset are within this fraction of its ConvMAE match.
FLOP_TOLERANCE = 0.02


def linear(n_in, n_out):
    return n_in * n_out + n_out


def block(d, mlp_ratio):  # norm1, attn.qkv, attn.proj, norm2, Mlp
    hidden = int(d * mlp_ratio)
    return 2 * d + linear(d, 3 * d) + linear(d, d) + 2 * d + linear(d, hidden) + linear(hidden, d)


def official_mae_params(cfg):
    d, dec, p, c = cfg.embed_dim, cfg.decoder_embed_dim, cfg.patch_size, cfg.in_chans
    tokens = cfg.num_patches
    encoder = (c * d * p * p + d) + tokens * d + cfg.depth * block(d, cfg.mlp_ratio) + 2 * d
    decoder = (linear(d, dec) + dec + tokens * dec + cfg.decoder_depth * block(dec, cfg.decoder_mlp_ratio)
               + 2 * dec + linear(dec, p * p * c))
    return encoder + decoder


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["mae_tiny", "mae_small", "mae_base"])
def test_parameter_counts_equal_official_mae_closed_form(name):
    cfg = convmae.get_config(name)
    with torch.device("meta"):
        model = convmae.build_model(name)
    assert isinstance(model, convmae.MAE)
    assert count(model) == official_mae_params(cfg)


def test_mae_base_at_twelve_blocks_is_the_papers_vit_b():
    with torch.device("meta"):
        model = convmae.build_model("mae_base", depth=12)
    encoder = count(model.encoder) - model.encoder.pos_embed.numel()
    # ViT-B/16 (the MAE paper's "86M") less its cls token, position embedding, final norm and head.
    assert round(encoder / 1e6) == 86


def test_the_baseline_shares_convmae_token_grid_and_decoder():
    for mae_name, conv_name in convmae.MAE_FLOP_MATCH.items():
        mae, conv = convmae.get_config(mae_name), convmae.get_config(conv_name)
        assert (mae.img_size, mae.patch_size, mae.encoder_dim) == (conv.img_size, conv.patch_size, conv.encoder_dim)
        assert (mae.decoder_embed_dim, mae.decoder_depth, mae.decoder_num_heads, mae.decoder_mlp_ratio) == (
            conv.decoder_embed_dim, conv.decoder_depth, conv.decoder_num_heads, conv.decoder_mlp_ratio)
        assert mae.norm_pix_loss == conv.norm_pix_loss


def flop_ratio(mae_name):
    conv_name = convmae.MAE_FLOP_MATCH[mae_name]
    conv = pretraining_flops_per_image(convmae.get_config(conv_name), 0.75)
    return pretraining_flops_per_image(convmae.get_config(mae_name), 0.75) / conv


def test_mae_tiny_costs_convmae_tiny_pretraining_flops():
    assert abs(flop_ratio("mae_tiny") - 1.0) <= FLOP_TOLERANCE
    # One block fewer would be measurably cheaper: the match is a choice, not an accident.
    cfg = convmae.get_config("mae_tiny")
    fewer = pretraining_flops_per_image(cfg.replace(depth=cfg.depth - 1), 0.75)
    assert fewer < pretraining_flops_per_image(cfg, 0.75) * (1.0 - FLOP_TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mae_small", "mae_base"])
def test_large_mae_presets_cost_their_convmae_match_pretraining_flops(name):
    assert abs(flop_ratio(name) - 1.0) <= FLOP_TOLERANCE


def tiny_mae():
    torch.manual_seed(0)
    return convmae.build_model("mae_tiny").eval()


def test_masked_pixels_do_not_reach_the_visible_tokens(images):
    model, imgs = tiny_mae(), images(batch=2)
    mask = model.random_mask(imgs, 0.75, torch.Generator().manual_seed(1))
    masked_pixels = convmae.unpatchify(mask.mask[..., None].expand(-1, -1, 16 * 16 * 3), 16)  # 1 where masked
    changed = imgs + 5.0 * torch.randn_like(imgs) * masked_pixels
    with torch.no_grad():
        latent = model.forward_encoder(imgs, mask)
        assert torch.equal(model.forward_encoder(changed, mask), latent)
        # ...while a change to a visible pixel does change them.
        visible_change = imgs + 5.0 * (1.0 - masked_pixels) * torch.randn_like(imgs)
        assert not torch.allclose(model.forward_encoder(visible_change, mask), latent)
        # The prediction (made from visible latents only) is the same; only the loss target moved.
        _, pred, _ = model(imgs, block_mask=mask)
        _, pred_changed, _ = model(changed, block_mask=mask)
    assert torch.equal(pred, pred_changed)


def test_per_patch_random_mask_is_maes(images):
    model, imgs = tiny_mae(), images(batch=3)
    mask = model.random_mask(imgs, 0.75, torch.Generator().manual_seed(2))
    assert mask.grid == (4, 4) and mask.num_visible == 4
    assert torch.equal(mask.mask.sum(dim=1), torch.full((3,), 12.0))
    again = convmae.random_block_mask(3, (4, 4), 0.75, "cpu", torch.Generator().manual_seed(2))
    assert torch.equal(mask.ids_keep, again.ids_keep)


def test_every_weight_gets_a_gradient(images):
    # DeepSpeed and DDP need every parameter used; a dead branch would also be a silent bug.
    model = tiny_mae().train()
    loss, pred, mask = model(images(batch=2), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert pred.shape == (2, 16, 16 * 16 * 3) and mask.shape == (2, 16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    without = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert trainable and not without


def test_save_load_round_trip(tmp_path, images):
    model, imgs = tiny_mae(), images(batch=2)
    convmae.save_pretrained(model, tmp_path / "mae")
    assert json.loads((tmp_path / "mae" / "config.json").read_text())["config"]["family"] == "mae"
    loaded = convmae.load_pretrained(tmp_path / "mae")
    assert isinstance(loaded, convmae.MAE) and loaded.config == model.config
    mask = model.random_mask(imgs, 0.75, torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(imgs, block_mask=mask)[0], model(imgs, block_mask=mask)[0])
        assert torch.equal(convmae.encoder_embedding(loaded, imgs), convmae.encoder_embedding(model, imgs))


def test_a_backbone_config_of_the_baseline_is_refused(tmp_path):
    folder = convmae.save_pretrained(tiny_mae(), tmp_path / "mae")
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "architecture": "backbone"}))
    with pytest.raises(ValueError, match="architecture 'backbone' is not allowed for the plain-ViT MAE"):
        convmae.load_pretrained(folder)


def test_config_round_trip_and_family():
    cfg = convmae.mae_small().replace(img_size=112, norm_pix_loss=False)
    restored = convmae.config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg and isinstance(restored, convmae.MAEConfig)
    conv = convmae.convmae_tiny()
    assert convmae.config_from_dict(conv.to_dict()) == conv  # ConvMAE dicts carry no family key
    with pytest.raises(ValueError, match="family='vit' is not allowed"):
        convmae.config_from_dict({**cfg.to_dict(), "family": "vit"})
    with pytest.raises(ValueError, match="depth=1000 is not allowed: a whole number in 1..64"):
        convmae.config_from_dict({**cfg.to_dict(), "depth": 1000})
    with pytest.raises(ValueError, match="unknown MAEConfig fields"):
        convmae.config_from_dict({**cfg.to_dict(), "embed_dims": [1, 2, 3]})


def test_encoder_embedding_pools_the_unmasked_tokens(images):
    model, imgs = tiny_mae(), images(batch=3)
    with torch.no_grad():
        embedding = convmae.encoder_embedding(model, imgs)
        tokens = model.encoder.forward_features(imgs)  # (B, L, D)
    assert embedding.shape == (3, 64)
    expected = torch.nn.functional.layer_norm(tokens.mean(dim=1), (64,), eps=1e-6)
    torch.testing.assert_close(embedding, expected)


def test_reconstructions_of_the_baseline(images):
    # Reconstruction grids (jobs/reconstruct.py, epoch-end images) take the baseline's config too.
    model, x = tiny_mae(), images(batch=2)
    with torch.no_grad():
        _, pred, mask = model(x, generator=torch.Generator().manual_seed(0))
    for source in (model, model.config):
        out = convmae.reconstruct(source, x, pred, mask)
        hidden = convmae.unpatchify(mask[..., None].expand(-1, -1, 768)).bool()
        assert torch.equal(out["pasted"][~hidden], x[~hidden])
