import torch
import torch.nn.functional as F

from convmae.blocks import Attention, ConvBlock, DropPath, PatchEmbed, TransformerBlock
from convmae.masked_conv import DenseGrid


def test_patch_embed_on_patches_equals_strided_conv():
    torch.manual_seed(0)
    embed = PatchEmbed(6, 10, 2)
    x = torch.randn(2, 8, 8, 6)  # (B, H, W, C)
    dense = embed(x)  # (B, 4, 4, 10)
    patches = x.view(2, 4, 2, 4, 2, 6).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, 4, 24)  # (ky, kx, C) inner
    assert torch.allclose(embed.embed_patches(patches), dense, atol=1e-5)
    assert dense.shape == (2, 4, 4, 10)


def test_conv_block_equals_reference_nchw_formulation():
    """Our channels-last block equals the official (B, C, H, W) CBlock written out with convs."""
    torch.manual_seed(0)
    blk = ConvBlock(8, mlp_ratio=2.0)
    x = torch.randn(2, 6, 6, 8)
    visible = (torch.rand(2, 6, 6, 1) > 0.5).float()
    ours = blk(x, DenseGrid(visible))

    def conv1x1(t, lin):
        return F.conv2d(t, lin.weight[:, :, None, None], lin.bias)

    def ln(t, norm):  # LayerNorm over channels of an NCHW map
        return norm(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    xc = x.permute(0, 3, 1, 2)
    m = visible.permute(0, 3, 1, 2)
    h = conv1x1(blk.dw(m * conv1x1(ln(xc, blk.norm1), blk.pw_in)), blk.pw_out)
    xc = xc + h
    xc = xc + conv1x1(F.gelu(conv1x1(ln(xc, blk.norm2), blk.mlp.fc1)), blk.mlp.fc2)
    assert torch.allclose(ours, xc.permute(0, 2, 3, 1), atol=1e-5)


def test_attention_equals_softmax_reference():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=4)
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / 2.0).softmax(dim=-1)  # head_dim 4 -> scale 1/2
    ref = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_transformer_block_shapes_and_norm_eps():
    blk = TransformerBlock(16, 4, 4.0)
    assert blk(torch.randn(3, 7, 16)).shape == (3, 7, 16)
    assert blk.norm1.eps == 1e-6 and blk.mlp.fc1.out_features == 64
    assert ConvBlock(8, 4.0).norm1.eps == 1e-5  # the official CBlock uses nn.LayerNorm defaults


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 4)
    out = dp.train()(x)
    per_sample = out.view(64, -1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(per_sample.min(dim=1).values == per_sample.max(dim=1).values)
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert torch.equal(dp.eval()(x), x)
