"""Rules the kernels and bsa_core share, in a module that imports nothing else of the pack.

Cube slot -> raster token, computed in-kernel so that no index table is read (the definition is
`bsa_core.cubes.CubeLayout`: cubes raster over (nt, nh, nw), slots raster over (ct, ch, cw)), and the
number of queries a cube keeps at a keep ratio.
"""
import math

import torch
import triton
import triton.language as tl


def keep_counts(n_valid: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """ceil(r * n) per cube, at least 1; r*n is rounded first so 0.3 * 10 keeps 3, not 4."""
    raw = torch.round(n_valid.double() * keep_ratio * 1e6) / 1e6
    return torch.ceil(raw).clamp(min=1).long()


def kept_width(grid, cube_size, keep_ratio: float) -> int:
    """The widest kept-query list of a layout, keep_counts' rule as a Python int for its largest cube (the
    first one): output shapes need it where tensors are only faked (torch.compile) or a read-back would sync."""
    largest = math.prod(min(c, g) for c, g in zip(cube_size, grid))
    return max(1, math.ceil(round(largest * keep_ratio * 1e6) / 1e6))


@triton.jit
def _cube_tokens(cube, slots, GT, GH, GW, NH, NW,
                 CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr):
    """(raster token index, inside the grid) of `slots` of cube `cube`; invalid slots get garbage tokens."""
    c_t = cube // (NH * NW)
    c_h = (cube // NW) % NH
    c_w = cube % NW
    t = c_t * CT + slots // (CH * CW)
    h = c_h * CH + (slots // CW) % CH
    w = c_w * CW + slots % CW
    valid = (slots < CT * CH * CW) & (t < GT) & (h < GH) & (w < GW)
    return (t * GH + h) * GW + w, valid


def _grid_args(layout):
    """Runtime grid arguments of `_cube_tokens` for a CubeLayout: (GT, GH, GW, NH, NW)."""
    return (*layout.grid, *layout.cubes_per_axis[1:])
