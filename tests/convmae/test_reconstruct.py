import torch

import convmae
from convmae import patchify, reconstruct


def test_perfect_prediction_reconstructs_the_image(images):
    cfg = convmae.convmae_tiny().replace(norm_pix_loss=False)
    x = images(batch=2)
    mask = convmae.random_block_mask(2, (4, 4), 0.75, "cpu", torch.Generator().manual_seed(0)).mask
    out = reconstruct(cfg, x, patchify(x), mask)
    assert set(out) == {"masked", "reconstruction", "pasted"}
    assert torch.allclose(out["reconstruction"], x) and torch.allclose(out["pasted"], x)
    hidden = convmae.unpatchify(mask[..., None].expand(-1, -1, 768)).bool()
    assert torch.all(out["masked"][hidden] == 0) and torch.equal(out["masked"][~hidden], x[~hidden])


def test_norm_pix_prediction_is_denormalised_with_patch_statistics(images):
    cfg = convmae.convmae_tiny()  # norm_pix_loss=True
    x = images(batch=2)
    target = patchify(x)
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.ones(2, 16)
    assert torch.allclose(reconstruct(cfg, x, normalised, mask)["reconstruction"], x, atol=1e-4)


def test_pasted_keeps_visible_pixels_from_the_input(tiny_model, images):
    model = tiny_model()
    x = images(batch=2)
    _, pred, mask = model(x, generator=torch.Generator().manual_seed(0))
    out = reconstruct(model, x, pred, mask)
    visible = convmae.unpatchify((1 - mask)[..., None].expand(-1, -1, 768)).bool()
    assert torch.equal(out["pasted"][visible], x[visible])
    assert torch.equal(out["pasted"][~visible], out["reconstruction"][~visible])
    assert all(v.shape == x.shape for v in out.values())


def test_visible_statistics_use_nothing_of_the_masked_patches(images):
    cfg = convmae.convmae_tiny()  # norm_pix_loss=True
    x = images(batch=2)
    mask = convmae.random_block_mask(2, (4, 4), 0.75, "cpu", torch.Generator().manual_seed(0)).mask
    pred = torch.randn(2, 16, 768)
    out = reconstruct(cfg, x, pred, mask, stats="visible")
    hidden = convmae.unpatchify(mask[..., None].expand(-1, -1, 768)).bool()
    changed = x.clone()
    changed[hidden] = torch.randn(int(hidden.sum()))  # other pixels under the mask
    again = reconstruct(cfg, changed, pred, mask, stats="visible")
    assert torch.allclose(out["pasted"], torch.where(hidden, again["pasted"], out["pasted"]))
    assert torch.allclose(out["reconstruction"], again["reconstruction"])
    # The patch's own statistics would have shown the change.
    assert not torch.allclose(reconstruct(cfg, x, pred, mask)["reconstruction"],
                              reconstruct(cfg, changed, pred, mask)["reconstruction"])


def test_visible_statistics_are_the_pooled_mean_and_variance_of_the_visible_pixels(images):
    cfg = convmae.convmae_tiny()
    x = images(batch=1)
    mask = torch.zeros(1, 16)
    mask[0, 5:] = 1
    visible = patchify(x)[0, :5].reshape(-1)
    flat = torch.zeros(1, 16, 768)  # a prediction of 0 everywhere: the visible mean
    out = reconstruct(cfg, x, flat, mask, stats="visible")
    assert torch.allclose(out["reconstruction"], torch.full_like(x, visible.mean().item()), atol=1e-5)
    ones = torch.ones(1, 16, 768)  # one standard deviation above it
    std = (visible.var(unbiased=False) + 1e-6).sqrt()
    assert torch.allclose(reconstruct(cfg, x, ones, mask, stats="visible")["reconstruction"],
                          torch.full_like(x, (visible.mean() + std).item()), atol=1e-4)
