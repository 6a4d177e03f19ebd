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
