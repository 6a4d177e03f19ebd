import torch

from convmae.blocks import ConvBlock
from convmae.masked_conv import DenseGrid, VisibleCells
from convmae.masking import random_block_mask, upsample_mask, visible_cell_index


def setup_block(cells=4, grid=(3, 3), dim=8, seed=0):
    torch.manual_seed(seed)
    blk = ConvBlock(dim, mlp_ratio=2.0)
    m = random_block_mask(2, grid, 0.6, "cpu", torch.Generator().manual_seed(seed))
    visible = (1 - upsample_mask(m.mask, grid, cells)).unsqueeze(-1)  # (B, H, W, 1)
    x = torch.randn(2, grid[0] * cells, grid[1] * cells, dim)
    return blk, m, visible, x


def test_masked_cells_do_not_reach_visible_cells():
    blk, _, visible, x = setup_block()
    noise = torch.randn_like(x) * (1 - visible)  # changes masked cells only
    out = blk(x, DenseGrid(visible))
    out_perturbed = blk(x + noise, DenseGrid(visible))
    assert torch.allclose(out * visible, out_perturbed * visible, atol=1e-6)
    # Without the mask the 5x5 depthwise conv does carry masked cells into visible ones.
    leaky = blk(x, DenseGrid()) - blk(x + noise, DenseGrid())
    assert (leaky * visible).abs().max() > 1e-3


def test_visible_cells_layout_equals_dense_masked_layout():
    cells, grid = 4, (3, 3)
    blk, m, visible, x = setup_block(cells, grid)
    index = visible_cell_index(m.ids_keep, grid, cells)
    rows = x.reshape(-1, x.shape[-1]).index_select(0, index).view(2, -1, x.shape[-1])  # (B, M, C)
    sparse = blk(rows, VisibleCells(index, 2, grid[0] * cells, grid[1] * cells))
    dense = blk(x, DenseGrid(visible))
    expected = dense.reshape(-1, x.shape[-1]).index_select(0, index).view_as(sparse)
    assert torch.allclose(sparse, expected, atol=1e-5)


def test_visible_cells_gradients_match_dense():
    cells, grid = 2, (4, 4)
    blk, m, visible, x = setup_block(cells, grid)
    index = visible_cell_index(m.ids_keep, grid, cells)
    rows = x.reshape(-1, x.shape[-1]).index_select(0, index).view(2, -1, x.shape[-1])
    blk(rows, VisibleCells(index, 2, grid[0] * cells, grid[1] * cells)).pow(2).sum().backward()
    sparse_grads = [p.grad.clone() for p in blk.parameters()]
    blk.zero_grad()
    dense = blk(x, DenseGrid(visible))
    (dense.pow(2) * visible).sum().backward()
    for g_sparse, p in zip(sparse_grads, blk.parameters()):
        assert torch.allclose(g_sparse, p.grad, atol=1e-4, rtol=1e-4)
