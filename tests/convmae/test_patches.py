import pytest
import torch
import torch.nn.functional as F

from convmae import patchify, unpatchify
from convmae.patches import conv_as_linear, gather_blocks, split_cells


def test_patchify_pixel_order_is_row_col_channel():
    imgs = torch.randn(2, 3, 32, 48)
    x = patchify(imgs, 16)
    assert x.shape == (2, 6, 16 * 16 * 3)
    b, i, j, py, px, c = 1, 1, 2, 5, 11, 2
    token = i * 3 + j
    assert x[b, token, (py * 16 + px) * 3 + c] == imgs[b, c, i * 16 + py, j * 16 + px]


@pytest.mark.parametrize("shape,grid", [((2, 3, 64, 64), None), ((1, 3, 32, 80), (2, 5)), ((2, 1, 16, 16), None)])
def test_unpatchify_inverts_patchify(shape, grid):
    imgs = torch.randn(shape)
    assert torch.equal(unpatchify(patchify(imgs), 16, grid=grid, channels=shape[1]), imgs)


def test_patchify_rejects_bad_sizes():
    with pytest.raises(ValueError):
        patchify(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="square"):
        unpatchify(torch.randn(1, 6, 768))


def test_gather_blocks_reads_the_kept_tokens():
    x = torch.randn(2, 8, 12, 5)  # (B, H, W, C): 2x3 tokens of 4x4 cells
    ids = torch.tensor([[5, 0], [2, 4]])
    blocks = gather_blocks(x, ids, 4)
    assert blocks.shape == (2, 2, 4, 4, 5)
    for b in range(2):
        for k in range(2):
            r, c = divmod(int(ids[b, k]), 3)
            assert torch.equal(blocks[b, k], x[b, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4])


def test_split_cells_with_conv_as_linear_equals_strided_conv():
    blocks = torch.randn(3, 2, 4, 4, 6)  # (B, K, 4, 4, C)
    weight, bias = torch.randn(7, 6, 2, 2), torch.randn(7)
    patches = split_cells(blocks, 2)  # (B, K*4, 2*2*6)
    ours = F.linear(patches, conv_as_linear(weight), bias).view(3, 2, 2, 2, 7)
    ref = F.conv2d(blocks.reshape(6, 4, 4, 6).permute(0, 3, 1, 2), weight, bias, stride=2)  # (B*K, 7, 2, 2)
    assert torch.allclose(ours.reshape(6, 2, 2, 7), ref.permute(0, 2, 3, 1), atol=1e-5)
