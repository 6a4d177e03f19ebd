import pytest
import torch

import convmae
from convmae.masking import random_block_mask, upsample_mask, visible_cell_index


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.75), ((2, 2), 0.75), ((4, 4), 0.5), ((3, 5), 0.6), ((14, 14), 0.9)])
def test_exact_number_kept_per_image(grid, ratio):
    num_patches = grid[0] * grid[1]
    keep = int(num_patches * (1 - ratio))
    m = random_block_mask(8, grid, ratio, "cpu", torch.Generator().manual_seed(0))
    assert m.ids_keep.shape == (8, keep)
    assert m.mask.shape == (8, num_patches)
    assert torch.equal(m.mask.sum(dim=1), torch.full((8,), float(num_patches - keep)))
    # The kept ids are exactly the visible positions of the mask.
    assert torch.all(m.mask.gather(1, m.ids_keep) == 0)
    assert all(len(set(row.tolist())) == keep for row in m.ids_keep)


def test_ids_restore_unshuffles():
    m = random_block_mask(4, (4, 4), 0.75, "cpu", torch.Generator().manual_seed(1))
    grid_order = torch.arange(16).expand(4, 16)
    ids_shuffle = m.ids_restore.argsort(dim=1)
    assert torch.equal(ids_shuffle[:, : m.num_visible], m.ids_keep)  # [visible, masked] order
    shuffled = grid_order.gather(1, ids_shuffle)
    assert torch.equal(shuffled.gather(1, m.ids_restore), grid_order)


def test_same_seed_same_mask_and_different_seed_different_mask():
    a = random_block_mask(4, (14, 14), 0.75, "cpu", torch.Generator().manual_seed(7))
    b = random_block_mask(4, (14, 14), 0.75, "cpu", torch.Generator().manual_seed(7))
    c = random_block_mask(4, (14, 14), 0.75, "cpu", torch.Generator().manual_seed(8))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    assert not torch.equal(a.mask, c.mask)
    # Random per image, not one mask broadcast over the batch.
    assert len({tuple(row.tolist()) for row in a.mask}) == 4


def test_model_mask_reproducible_from_generator(tiny_model, images):
    model = tiny_model()
    x = images(batch=3)
    loss1, _, mask1 = model(x, generator=torch.Generator().manual_seed(3))
    loss2, _, mask2 = model(x, generator=torch.Generator().manual_seed(3))
    _, _, mask3 = model(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(mask1, mask2) and torch.equal(loss1, loss2)
    assert not torch.equal(mask1, mask3)


def test_invalid_mask_ratio():
    with pytest.raises(ValueError):
        random_block_mask(1, (2, 2), 1.0, "cpu")
    with pytest.raises(ValueError, match="no visible"):
        random_block_mask(1, (2, 2), 0.8, "cpu")  # int(4 * 0.2) == 0


def test_upsampled_mask_covers_whole_blocks():
    m = random_block_mask(2, (3, 4), 0.5, "cpu", torch.Generator().manual_seed(0))
    for cells in (4, 2):
        up = upsample_mask(m.mask, m.grid, cells)
        assert up.shape == (2, 3 * cells, 4 * cells)
        for b in range(2):
            for t in range(12):
                r, c = divmod(t, 4)
                block = up[b, r * cells : (r + 1) * cells, c * cells : (c + 1) * cells]
                assert torch.all(block == m.mask[b, t])


def test_visible_cell_index_selects_visible_cells_in_block_order():
    m = random_block_mask(2, (3, 4), 0.5, "cpu", torch.Generator().manual_seed(0))
    cells = 4
    idx = visible_cell_index(m.ids_keep, m.grid, cells)
    k = m.num_visible
    assert idx.shape == (2 * k * cells * cells,)
    flat_mask = upsample_mask(m.mask, m.grid, cells).reshape(-1)
    assert torch.all(flat_mask[idx] == 0)
    assert len(set(idx.tolist())) == idx.numel()
    # Row order is (image, kept token, cell row, cell col): check one cell explicitly.
    b, t, a, c = 1, 2, 3, 1
    row, col = divmod(int(m.ids_keep[b, t]), 4)
    expected = b * (12 * cells * cells) + (row * cells + a) * (4 * cells) + (col * cells + c)
    assert idx.view(2, k, cells, cells)[b, t, a, c] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_same_mask_for_cuda_inputs():
    cpu = random_block_mask(4, (14, 14), 0.75, "cpu", torch.Generator().manual_seed(5))
    gpu = random_block_mask(4, (14, 14), 0.75, "cuda", torch.Generator().manual_seed(5))
    assert gpu.mask.device.type == "cuda"
    assert torch.equal(cpu.mask, gpu.mask.cpu())
    model = convmae.build_model("convmae_tiny").cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    _, _, m1 = model(x, generator=torch.Generator().manual_seed(0))
    _, _, m2 = model(x.cpu().cuda(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(m1, m2)
