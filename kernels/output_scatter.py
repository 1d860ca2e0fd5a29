"""Kept-query outputs -> raster output in one pass: every valid slot copies the row of its source.

out_kept [B, H, N, Kq, D] holds the attention output of each cube's kept queries (in q_index
order); q_source [B, H, N, S] names, per slot, the position in that list whose output the slot
takes (kept slots name themselves). One program writes one cube of one (batch, head) straight into
the video rows of a preallocated [B, H, L, D] output from row `n_prefix` on, so neither a cube-order
copy nor a permutation back is materialised.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cube_tokens import _cube_tokens, _grid_args

_TILE_ELEMENTS = 8192


@triton.jit
def _output_scatter_kernel(Src, QSource, Out, n_prefix, n_heads, GT, GH, GW, NH, NW,
                           stride_sb, stride_sh, stride_sn, stride_sk, stride_sd,
                           stride_ob, stride_oh, stride_ol, stride_od,
                           HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                           CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr):
    tl.static_assert(D_PAD >= HEAD_DIM)
    S: tl.constexpr = CT * CH * CW
    cube = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    src_base = Src + b * stride_sb + h * stride_sh + cube.to(tl.int64) * stride_sn
    out_base = Out + b * stride_ob + h * stride_oh
    qs_base = QSource + (bh * tl.num_programs(0) + cube) * S
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    for s0 in range(0, S, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        token, valid = _cube_tokens(cube, slots, GT, GH, GW, NH, NW, CT, CH, CW)
        source = tl.load(qs_base + slots, mask=valid, other=0).to(tl.int64)
        mask = valid[:, None] & d_ok[None, :]
        x = tl.load(src_base + source[:, None] * stride_sk + offs_d[None, :] * stride_sd, mask=mask)
        rows = (token + n_prefix).to(tl.int64)
        tl.store(out_base + rows[:, None] * stride_ol + offs_d[None, :] * stride_od,
                 x.to(Out.dtype.element_ty), mask=mask)


def output_scatter(out_kept: torch.Tensor, q_source: torch.Tensor, layout, out: torch.Tensor | None = None,
                   n_prefix: int = 0) -> torch.Tensor:
    """out_kept [B, H, N, Kq, D] (any strides), q_source [B, H, N, S] int32 -> out [B, H, L, D].

    Writes rows n_prefix .. n_prefix + T*H*W of `out` (allocated as [B, H, T*H*W, D] in
    out_kept.dtype when None; other rows are left untouched) and returns it."""
    if out_kept.dim() != 5 or out_kept.shape[2] != layout.num_cubes:
        raise ValueError(f"out_kept must be [B, H, {layout.num_cubes}, Kq, D], got shape {tuple(out_kept.shape)}")
    B, H, N, _, D = out_kept.shape
    S = layout.cube_volume
    if q_source.shape != (B, H, N, S) or q_source.dtype != torch.int32:
        raise ValueError(f"q_source must be int32 [{B}, {H}, {N}, {S}], got {q_source.dtype} {tuple(q_source.shape)}")
    if out is None:
        out = torch.empty(B, H, layout.num_tokens, D, dtype=out_kept.dtype, device=out_kept.device)
    if out.dim() != 4 or out.shape[:2] != (B, H) or out.shape[3] != D or n_prefix < 0 \
            or n_prefix + layout.num_tokens > out.shape[2]:
        raise ValueError(f"out must be [{B}, {H}, >= {n_prefix} + {layout.num_tokens}, {D}], got {tuple(out.shape)}")
    if not (out_kept.device == q_source.device == out.device):
        raise ValueError(f"out_kept ({out_kept.device}), q_source ({q_source.device}) and out ({out.device}) "
                         "must share a device")
    d_pad = triton.next_power_of_2(D)
    _output_scatter_kernel[(N, B * H)](
        out_kept, q_source.contiguous(), out, n_prefix, H, *_grid_args(layout), *out_kept.stride(), *out.stride(),
        HEAD_DIM=D, D_PAD=d_pad, BLOCK_S=min(triton.next_power_of_2(S), max(1, _TILE_ELEMENTS // d_pad)),
        CT=layout.cube_size[0], CH=layout.cube_size[1], CW=layout.cube_size[2])
    return out
