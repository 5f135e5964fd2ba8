"""Fixed 2-D sin-cos position tables and their resampling to another grid.

The tables are copied from MAE's `util/pos_embed.py` *as written*, quirk included:
the original builds `meshgrid(grid_w, grid_h)` and encodes the first half of the
channels from `grid[0]`, which is the **column** (w) coordinate, the second half from
the row. Released checkpoints store tables made this way, so any "fix" would make
converted weights disagree with their position tables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """[sin(pos * omega), cos(pos * omega)] with omega = 1 / 10000 ** (i / (D/2))."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> np.ndarray:
    """The MAE table: [(cls +) gh*gw, D] float32, row 0 all zeros when `cls_token`."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    grid = np.stack(np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32)))
    # grid[0] is the w (column) coordinate; the original names its encoding "emb_h".
    emb = np.concatenate([sincos_1d(embed_dim // 2, grid[0]), sincos_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb.astype(np.float32)


def sincos_init(grid_size: int | tuple[int, int]):
    """A Flax initializer for a [1, 1 + L, D] table: the cls row (zeros) and the grid."""

    def init(key, shape, dtype=jnp.float32):
        del key
        table = sincos_2d(shape[-1], grid_size, cls_token=True)
        return jnp.asarray(table, dtype).reshape(shape)

    return init


def interpolate_pos_embed(
    pos_embed: np.ndarray | jax.Array, new_grid: int | tuple[int, int], num_extra_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resample a [1, extra + gh*gw, D] table of `old_grid` (rows, columns; square when None) to
    another square (or given) grid.

    As MAE's `interpolate_pos_embed`: the extra (cls) rows are kept, the grid part is
    resized bicubically with align_corners=False (rows and columns each by their own
    factor, as torch's `F.interpolate(size=(gh, gw))`). Torch's bicubic (a = -0.75, no
    antialias) is what the original used, so it is the one computed here, for
    upsampling and downsampling alike.
    """
    pos_embed = np.asarray(pos_embed)
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    if old_grid is None:
        side = round(grid.shape[1] ** 0.5)
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != grid.shape[1]:
        raise ValueError(f"position table with {grid.shape[1]} grid rows is not a {old_grid[0]}x{old_grid[1]} grid")
    gh, gw = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    if (gh, gw) == tuple(old_grid):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(*old_grid, dim).astype(np.float64)
    rows = _bicubic_matrix(old_grid[0], gh)
    cols = _bicubic_matrix(old_grid[1], gw)
    resized = np.einsum("ih,jw,hwd->ijd", rows, cols, grid).reshape(1, gh * gw, dim)
    return np.concatenate([extra, resized.astype(pos_embed.dtype)], axis=1)


def _bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """[out, in] weights of torch's `F.interpolate(mode='bicubic', align_corners=False)`."""
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        base = int(np.floor(src))
        t = src - base
        for offset in range(-1, 3):
            x = abs(offset - t)
            if x <= 1:
                w = (a + 2) * x**3 - (a + 3) * x**2 + 1
            elif x < 2:
                w = a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
            else:
                w = 0.0
            weights[i, min(max(base + offset, 0), in_size - 1)] += w
    return weights
