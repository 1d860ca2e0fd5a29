"""Cube slot -> raster token, computed in-kernel so that no index table is read (the definition is
`bsa_core.cubes.CubeLayout`: cubes raster over (nt, nh, nw), slots raster over (ct, ch, cw)).
"""
import triton
import triton.language as tl


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
