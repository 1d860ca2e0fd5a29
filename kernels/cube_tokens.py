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


def cube_box_view(x, layout, n_prefix: int = 0):
    """x [B, H, L, D]'s video rows (n_prefix on) as a 5-D strided view [R, T', GH, GW, D] in which cube c of
    (batch, head) bh is the box [1, CT, CH, CW, D] at (bh % R, (bh // R) * GT + c_t * CT, c_h * CH, c_w * CW, 0):
    what a TMA descriptor reads a cube's K/V from without a permute (boxes past the grid read zeros, or along T
    the next batch's first frames: padding slots, masked either way). Batches stack along T when their stride is
    GT frames (R = H), batches and heads when the heads' stride is too (R = 1). Returns (view, R), or None for
    other strides."""
    B, H, _, D = x.shape
    GT, GH, GW = layout.grid
    sb, sh, sl, sd = x.stride()
    frame = GH * GW * sl
    if B == 1 or sb == GT * frame:
        shape, strides, heads_a_row = (H, B * GT), (sh, frame), H
    elif sh == GT * frame and sb == H * sh:
        shape, strides, heads_a_row = (1, B * H * GT), (B * H * GT * frame, frame), 1
    else:
        return None
    view = x.as_strided((*shape, GH, GW, D), (*strides, GW * sl, sl, sd), x.storage_offset() + n_prefix * sl)
    return view, heads_a_row
