"""Raster -> cube order in one pass, optionally with the pooled mean of each cube's valid rows.

x [B, H, L, D] holds the video tokens in raster order from row `n_prefix` on (prefix/suffix tokens
stay where they are, so the caller needs no slice copy). One program moves one cube of one (batch,
head): S rows gathered from the raster, written contiguously to [B, H, N, S, D] with padding slots
zeroed. With WITH_MEAN the same rows are summed in fp32, which gives k_bar for KV selection without a
second pass over K.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cube_index import _cube_tokens, _grid_args

_TILE_ELEMENTS = 8192  # rows x head_dim per loop step: ~64 fp32 registers a thread at 4 warps


@triton.jit
def _cube_permute_kernel(X, Y, Mean, n_prefix, n_heads, GT, GH, GW, NH, NW,
                         stride_xb, stride_xh, stride_xl, stride_xd,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                         CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, WITH_MEAN: tl.constexpr):
    tl.static_assert(D_PAD >= HEAD_DIM)
    S: tl.constexpr = CT * CH * CW
    cube = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_cubes = tl.num_programs(0)
    x_base = X + (bh // n_heads) * stride_xb + (bh % n_heads) * stride_xh
    y_base = Y + (bh * n_cubes + cube) * (S * HEAD_DIM)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    n_rows = tl.zeros([BLOCK_S], dtype=tl.int32)
    for s0 in range(0, S, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        token, valid = _cube_tokens(cube, slots, GT, GH, GW, NH, NW, CT, CH, CW)
        rows = (token + n_prefix).to(tl.int64)
        x = tl.load(x_base + rows[:, None] * stride_xl + offs_d[None, :] * stride_xd,
                    mask=valid[:, None] & d_ok[None, :], other=0.0)
        tl.store(y_base + slots[:, None] * HEAD_DIM + offs_d[None, :], x,
                 mask=(slots < S)[:, None] & d_ok[None, :])
        if WITH_MEAN:
            acc += tl.sum(x.to(tl.float32), 0)
            n_rows += valid.to(tl.int32)
    if WITH_MEAN:
        tl.store(Mean + (bh * n_cubes + cube) * HEAD_DIM + offs_d, acc / tl.sum(n_rows, 0).to(tl.float32), mask=d_ok)


def cube_permute(x: torch.Tensor, layout, n_prefix: int = 0, with_mean: bool = False):
    """x [B, H, L, D] (video rows n_prefix .. n_prefix + T*H*W in raster order, any strides) ->
    cubes [B, H, N, S, D] contiguous in x.dtype, padding zero; with_mean also returns the mean of
    each cube's valid rows [B, H, N, D] float32 (k_bar)."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, L, D], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if n_prefix < 0 or n_prefix + layout.num_tokens > x.shape[2]:
        raise ValueError(f"n_prefix={n_prefix}: x has {x.shape[2]} rows, the grid needs {layout.num_tokens}")
    B, H, _, D = x.shape
    N, S = layout.num_cubes, layout.cube_volume
    cubes = torch.empty(B, H, N, S, D, dtype=x.dtype, device=x.device)
    mean = torch.empty(B, H, N, D, dtype=torch.float32, device=x.device) if with_mean else cubes
    d_pad = triton.next_power_of_2(D)
    block_s = min(triton.next_power_of_2(S), max(1, _TILE_ELEMENTS // d_pad))
    _cube_permute_kernel[(N, B * H)](
        x, cubes, mean, n_prefix, H, *_grid_args(layout), *x.stride(),
        HEAD_DIM=D, D_PAD=d_pad, BLOCK_S=block_s, CT=layout.cube_size[0], CH=layout.cube_size[1],
        CW=layout.cube_size[2], WITH_MEAN=with_mean)
    return (cubes, mean) if with_mean else cubes
