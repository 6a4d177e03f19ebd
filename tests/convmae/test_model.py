import pytest
import torch

import convmae
from convmae.patches import patchify, unpatchify


def pixel_mask(mask, size, channels=3):
    """(B, L) token mask -> (B, C, H, W) pixel mask."""
    return unpatchify(mask[..., None].expand(-1, -1, 16 * 16 * channels), 16, channels=channels)


@pytest.mark.parametrize("size", [32, 64])
def test_forward_shapes(tiny_model, images, size):
    model = tiny_model(img_size=size)
    x = images(batch=3, size=size)
    loss, pred, mask = model(x, mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    num_patches = (size // 16) ** 2
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (3, num_patches, 16 * 16 * 3)
    assert mask.shape == (3, num_patches)
    assert torch.all(mask.sum(1) == num_patches - int(num_patches * 0.25))


@pytest.mark.parametrize("sparse", [True, False])
def test_masked_pixels_do_not_leak_into_visible_tokens(tiny_model, images, sparse):
    """Changing every pixel of the masked 16x16 patches leaves the encoder output unchanged."""
    model = tiny_model(sparse_conv_stages=sparse)
    x = images(batch=3)
    block_mask = model.random_mask(x, 0.75, torch.Generator().manual_seed(0))
    hidden = pixel_mask(block_mask.mask, 64)
    x_changed = x + hidden * torch.randn_like(x) * 10
    with torch.no_grad():
        latent = model.forward_encoder(x, block_mask)
        latent_changed = model.forward_encoder(x_changed, block_mask)
        # The same change to a visible patch must move the output (the check can fail).
        visible_token = int(block_mask.ids_keep[0, 0])
        x_visible_changed = x.clone()
        r, c = divmod(visible_token, 4)
        x_visible_changed[0, :, r * 16 : r * 16 + 16, c * 16 : c * 16 + 16] += 1.0
        latent_visible_changed = model.forward_encoder(x_visible_changed, block_mask)
    assert torch.allclose(latent, latent_changed, atol=1e-5)
    assert (latent - latent_visible_changed).abs().max() > 1e-3


def test_without_masked_convolution_information_would_leak(tiny_model, images):
    """Sanity for the test above: the unmasked encoder's visible tokens do see masked pixels."""
    model = tiny_model()
    x = images(batch=2)
    block_mask = model.random_mask(x, 0.75, torch.Generator().manual_seed(0))
    x_changed = x + pixel_mask(block_mask.mask, 64) * torch.randn_like(x)
    with torch.no_grad():
        _, _, tokens = model.encoder.forward_features(x)
        _, _, tokens_changed = model.encoder.forward_features(x_changed)
    ids = block_mask.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    assert (tokens.gather(1, ids) - tokens_changed.gather(1, ids)).abs().max() > 1e-3


def test_sparse_and_dense_conv_stages_agree_in_loss_pred_and_gradients(tiny_model, images):
    sparse, dense = tiny_model(sparse_conv_stages=True), tiny_model(sparse_conv_stages=False)
    dense.load_state_dict(sparse.state_dict())
    x = images(batch=2)
    results = []
    for model in (sparse, dense):
        loss, pred, mask = model(x, generator=torch.Generator().manual_seed(1))
        loss.backward()
        results.append((loss, pred, mask, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l1, p1, m1, g1), (l2, p2, m2, g2) = results
    assert torch.equal(m1, m2)
    assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(p1, p2, atol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_mse_on_masked_patches_only(tiny_model, images, norm_pix):
    model = tiny_model(norm_pix_loss=norm_pix)
    x = images(batch=2)
    loss, pred, mask = model(x, generator=torch.Generator().manual_seed(2))
    target = patchify(x)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)
    assert torch.allclose(loss, per_patch[mask.bool()].mean(), atol=1e-6)

    pred = pred.detach()
    visible_changed = pred + (1 - mask)[..., None] * 5.0
    masked_changed = pred + mask[..., None] * 5.0
    base = model.forward_loss(x, pred, mask)
    assert torch.equal(model.forward_loss(x, visible_changed, mask), base)
    assert model.forward_loss(x, masked_changed, mask) > base


def test_pretraining_encoder_without_masking_matches_backbone_path(tiny_model, images):
    """mask_ratio=0: the visible-token path sees every token and equals the unmasked encoder."""
    model = tiny_model()
    x = images(batch=2)
    block_mask = model.random_mask(x, 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, _, visible_tokens = model.encoder.forward_visible(x, block_mask)
        _, _, tokens = model.encoder.forward_features(x)
    ids = block_mask.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    assert torch.allclose(visible_tokens, tokens.gather(1, ids), atol=1e-5)


def test_no_weight_decay_names_are_parameters():
    model = convmae.build_model("convmae_tiny")
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"encoder.pos_embed", "decoder.pos_embed", "decoder.mask_token"}
    assert model.no_weight_decay() <= names.keys()


def test_official_initialisation():
    torch.manual_seed(0)
    model = convmae.build_model("convmae_small", img_size=32)
    assert abs(model.decoder.mask_token.std().item() - 0.02) < 0.01
    assert torch.all(model.decoder.pred.bias == 0) and torch.all(model.encoder.token_proj.bias == 0)
    # Xavier-uniform bound for a Linear layer, the official init of every nn.Linear ...
    qkv = model.encoder.stage3_blocks[0].attn.qkv.weight
    bound = (6 / (qkv.shape[0] + qkv.shape[1])) ** 0.5
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    # ... but the 1x1 convs of the conv blocks keep PyTorch's conv init (bound 1/sqrt(fan_in)).
    pw = model.encoder.stage1_blocks[0].pw_in
    assert pw.weight.abs().max() <= 1 / pw.in_features**0.5
    assert pw.bias.abs().max() > 0


def test_overfits_a_single_batch():
    """With per-patch normalised targets of random images, the loss can only fall by memorising."""
    torch.manual_seed(0)
    model = convmae.build_model("convmae_tiny", img_size=32, norm_pix_loss=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(80):
        loss, _, _ = model(x, generator=torch.Generator().manual_seed(0))  # same mask every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


def test_bf16_autocast_on_cpu(tiny_model, images):
    model = tiny_model()
    x = images(batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(x, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert pred.dtype == torch.bfloat16


def test_drop_path_rate_trains(images):
    torch.manual_seed(0)
    model = convmae.build_model("convmae_tiny", drop_path_rate=0.3).train()
    rates = [blk.drop_path.drop_prob for blk in model.encoder.stage3_blocks]
    assert rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    loss, _, _ = model(images(batch=2))
    loss.backward()
    assert torch.isfinite(loss)


def test_runs_with_bf16_weights(tiny_model, images):
    """Engines that cast the module to bf16 (no autocast) feed float32 or bf16 images."""
    model = tiny_model().to(torch.bfloat16)
    x = images(batch=2)
    loss, pred, _ = model(x, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and pred.dtype == torch.bfloat16
    assert model.decoder.pred.weight.grad is not None
