import math

import torch

import convmae
from convmae.pos_embed import resize_pos_embed, sincos_2d


def mae_reference(dim, grid, row, col, k):
    """Entry k of MAE's get_2d_sincos_pos_embed for the token at (row, col): the first half of
    the vector encodes the column index (MAE meshgrid(grid_w, grid_h)), the second half the row;
    each half is [sin(pos * w), cos(pos * w)] with w_i = 1 / 10000 ** (i / (dim / 4))."""
    quarter = dim // 4
    half, i = divmod(k, quarter)  # which quarter, frequency index
    pos = col if half in (0, 1) else row
    angle = pos / 10000 ** (i / quarter)
    return math.sin(angle) if half in (0, 2) else math.cos(angle)


def test_sincos_matches_mae_layout():
    dim, grid = 16, 3
    table = sincos_2d(dim, grid)
    assert table.shape == (grid * grid, dim) and table.dtype == torch.float32
    for row in range(grid):
        for col in range(grid):
            for k in range(dim):
                assert abs(table[row * grid + col, k].item() - mae_reference(dim, grid, row, col, k)) < 1e-6


def test_model_uses_fixed_sincos_for_stage3_and_decoder():
    model = convmae.build_model("convmae_tiny")
    cfg = model.config
    assert not model.encoder.pos_embed.requires_grad and not model.decoder.pos_embed.requires_grad
    assert torch.equal(model.encoder.pos_embed[0], sincos_2d(cfg.embed_dims[2], cfg.grid_size))
    assert torch.equal(model.decoder.pos_embed[0], sincos_2d(cfg.decoder_embed_dim, cfg.grid_size))


def test_resize_keeps_same_grid_and_interpolates_rows_and_columns():
    table = sincos_2d(8, 4).unsqueeze(0)
    assert resize_pos_embed(table, (4, 4)) is table
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    coords = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1).unsqueeze(0)  # (1, 16, 2)
    resized = resize_pos_embed(coords, (8, 6)).view(8, 6, 2)
    row_channel, col_channel = resized[..., 0], resized[..., 1]
    assert torch.allclose(row_channel, row_channel[:, :1].expand(8, 6), atol=1e-5)  # constant along a row
    assert torch.allclose(col_channel, col_channel[:1, :].expand(8, 6), atol=1e-5)  # constant down a column
    assert torch.all(row_channel[1:, 0] >= row_channel[:-1, 0])
    assert torch.all(col_channel[0, 1:] >= col_channel[0, :-1])
