"""Raster -> cube order in one pass, optionally with the pooled mean of each cube's valid rows.

x [B, H, L, D] holds the video tokens in raster order from row `n_prefix` on (prefix/suffix tokens
stay where they are, so the caller needs no slice copy). One program moves one cube of one (batch,
head): S rows gathered from the raster, written contiguously to [B, H, N, S, D] with padding slots
zeroed. With WITH_MEAN the same rows are summed in fp32, which gives k_bar for KV selection without a
second pass over K. `permute_qkv` does a call's three permutes in one launch, Q's as its mean alone where
the attention kernel reads Q's raster rows itself (keep_ratio 1).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .cube_tokens import _cube_tokens, _grid_args

_TILE_ELEMENTS = 8192  # rows x head_dim per loop step
# permute_qkv's warps a program: the pass is latency-bound (one 16 KB cube a program) and fewer warps leave room
# for more resident programs: Wan 480p means only 135 / 89 / 84 us at 4 / 2 / 1 warps, 720p 1,055 / 596 / 564 us
# (H200, ComfyUI's strides; bench/NOTES_speed.md, session 20)
_QKV_WARPS = 1


@triton.jit
def _permute_cube(X, Y, Mean, Mean16, cube, bh, n_cubes, n_prefix, n_heads, GT, GH, GW, NH, NW,
                  stride_xb, stride_xh, stride_xl, stride_xd,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                  CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, WITH_MEAN: tl.constexpr,
                  WITH_CUBES: tl.constexpr, WITH_MEAN16: tl.constexpr = False):
    """One cube of one (batch, head): copy its rows to cube order (WITH_CUBES) and/or store their mean in
    fp32 (WITH_MEAN, for selection) and in x's dtype (WITH_MEAN16, the pooled remainder's keys/values)."""
    tl.static_assert(D_PAD >= HEAD_DIM)
    S: tl.constexpr = CT * CH * CW
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
        if WITH_CUBES:
            tl.store(y_base + slots[:, None] * HEAD_DIM + offs_d[None, :], x,
                     mask=(slots < S)[:, None] & d_ok[None, :])
        if WITH_MEAN or WITH_MEAN16:
            acc += tl.sum(x.to(tl.float32), 0)
            n_rows += valid.to(tl.int32)
    if WITH_MEAN or WITH_MEAN16:
        mean = acc / tl.sum(n_rows, 0).to(tl.float32)
        if WITH_MEAN:
            tl.store(Mean + (bh * n_cubes + cube) * HEAD_DIM + offs_d, mean, mask=d_ok)
        if WITH_MEAN16:
            tl.store(Mean16 + (bh * n_cubes + cube) * HEAD_DIM + offs_d, mean.to(Mean16.dtype.element_ty), mask=d_ok)


@triton.jit
def _cube_permute_kernel(X, Y, Mean, n_prefix, n_heads, GT, GH, GW, NH, NW,
                         stride_xb, stride_xh, stride_xl, stride_xd,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                         CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, WITH_MEAN: tl.constexpr):
    _permute_cube(X, Y, Mean, Mean, tl.program_id(0), tl.program_id(1).to(tl.int64), tl.num_programs(0), n_prefix,
                  n_heads, GT, GH, GW, NH, NW, stride_xb, stride_xh, stride_xl, stride_xd, HEAD_DIM, D_PAD, BLOCK_S,
                  CT, CH, CW, WITH_MEAN, True)


@triton.jit
def _permute_qkv_kernel(Q, K, V, QC, KC, VC, QM, KM, KM16, VM16, n_prefix, n_heads, GT, GH, GW, NH, NW,
                        sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                        CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
                        Q_CUBES: tl.constexpr, Q_MEAN: tl.constexpr, POOLED: tl.constexpr, KV_CUBES: tl.constexpr):
    """Q, K and V in one launch (axis 2 picks the tensor): K to cubes (KV_CUBES) + fp32 mean, V to cubes
    (KV_CUBES), Q to cubes and/or its fp32 mean; with POOLED also K's and V's means in their own dtype for the
    pooled remainder."""
    cube = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_cubes = tl.num_programs(0)
    which = tl.program_id(2)
    if which == 0:
        _permute_cube(K, KC, KM, KM16, cube, bh, n_cubes, n_prefix, n_heads, GT, GH, GW, NH, NW, skb, skh, skl, skd,
                      HEAD_DIM, D_PAD, BLOCK_S, CT, CH, CW, True, KV_CUBES, POOLED)
    elif which == 1:
        _permute_cube(V, VC, VM16, VM16, cube, bh, n_cubes, n_prefix, n_heads, GT, GH, GW, NH, NW, svb, svh, svl,
                      svd, HEAD_DIM, D_PAD, BLOCK_S, CT, CH, CW, False, KV_CUBES, POOLED)
    else:
        _permute_cube(Q, QC, QM, QM, cube, bh, n_cubes, n_prefix, n_heads, GT, GH, GW, NH, NW, sqb, sqh, sql, sqd,
                      HEAD_DIM, D_PAD, BLOCK_S, CT, CH, CW, Q_MEAN, Q_CUBES)


@triton.jit
def _grad_permute_kernel(dO, O, dOC, Delta, n_prefix, n_heads, GT, GH, GW, NH, NW,
                         sgb, sgh, sgl, sgd, sob, soh, sol, sod,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                         CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr):
    """One cube of one (batch, head): dO's rows to cube order and delta = rowsum(dO * O) in fp32 per slot
    (0 on padding), O read once at its raster rows."""
    S: tl.constexpr = CT * CH * CW
    cube = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    slot_base = (bh * tl.num_programs(0) + cube) * S
    g_base = dO + (bh // n_heads) * sgb + (bh % n_heads) * sgh
    o_base = O + (bh // n_heads) * sob + (bh % n_heads) * soh
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    for s0 in range(0, S, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        token, valid = _cube_tokens(cube, slots, GT, GH, GW, NH, NW, CT, CH, CW)
        rows = (token + n_prefix).to(tl.int64)
        mask = valid[:, None] & d_ok[None, :]
        g = tl.load(g_base + rows[:, None] * sgl + offs_d[None, :] * sgd, mask=mask, other=0.0)
        o = tl.load(o_base + rows[:, None] * sol + offs_d[None, :] * sod, mask=mask, other=0.0)
        in_cube = slots < S
        tl.store(dOC + (slot_base + slots)[:, None] * HEAD_DIM + offs_d[None, :], g, mask=in_cube[:, None] & d_ok[None, :])
        tl.store(Delta + slot_base + slots, tl.sum(g.to(tl.float32) * o.to(tl.float32), 1), mask=in_cube)


def grad_permute(grad_out: torch.Tensor, out: torch.Tensor, layout, n_prefix: int = 0):
    """The backward's first pass when every query is kept: grad_out [B, H, L, D] to cubes [B, H, N, S, D] (its
    dtype, padding zero) and delta = rowsum(grad_out * out) per slot [B, H, N, S] fp32 (0 on padding), what the
    kernels need of the forward's output, without permuting out or building float32 copies (any strides)."""
    _check(grad_out, "grad_out", layout, n_prefix)
    if out.shape != grad_out.shape:
        raise ValueError(f"out must have grad_out's shape {tuple(grad_out.shape)}, got {tuple(out.shape)}")
    B, H, _, D = grad_out.shape
    cubes, _ = _outputs(grad_out, layout.num_cubes, layout.cube_volume, cubes=True, mean=False)
    delta = torch.empty(B, H, layout.num_cubes, layout.cube_volume, dtype=torch.float32, device=grad_out.device)
    _grad_permute_kernel[(layout.num_cubes, B * H)](
        grad_out, out, cubes, delta, n_prefix, H, *_grid_args(layout), *grad_out.stride(), *out.stride(),
        **_tile_args(layout, D))
    return cubes, delta


def cube_permute(x: torch.Tensor, layout, n_prefix: int = 0, with_mean: bool = False):
    """x [B, H, L, D] (video rows n_prefix .. n_prefix + T*H*W in raster order, any strides) ->
    cubes [B, H, N, S, D] contiguous in x.dtype, padding zero; with_mean also returns the mean of
    each cube's valid rows [B, H, N, D] float32 (k_bar)."""
    _check(x, "x", layout, n_prefix)
    B, H, _, D = x.shape
    cubes, mean = _outputs(x, layout.num_cubes, layout.cube_volume, cubes=True, mean=with_mean)
    _cube_permute_kernel[(layout.num_cubes, B * H)](
        x, cubes, x if mean is None else mean, n_prefix, H, *_grid_args(layout), *x.stride(),
        **_tile_args(layout, D), WITH_MEAN=with_mean)
    return (cubes, mean) if with_mean else cubes


def _check(x, name, layout, n_prefix):
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, H, L, D], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if n_prefix < 0 or n_prefix + layout.num_tokens > x.shape[2]:
        raise ValueError(f"n_prefix={n_prefix}: {name} has {x.shape[2]} rows, the grid needs {layout.num_tokens}")


def _tile_args(layout, head_dim: int) -> dict:
    """The permute kernels' tile constexprs: rows per step bounded by _TILE_ELEMENTS, the cube's shape."""
    d_pad = triton.next_power_of_2(head_dim)
    return dict(HEAD_DIM=head_dim, D_PAD=d_pad,
                BLOCK_S=min(triton.next_power_of_2(layout.cube_volume), max(1, _TILE_ELEMENTS // d_pad)),
                CT=layout.cube_size[0], CH=layout.cube_size[1], CW=layout.cube_size[2])


class PermutedQKV(NamedTuple):
    q_cubes: torch.Tensor | None   # [B, H, N, S, D] (q_cubes=True) or None
    q_mean: torch.Tensor | None    # [B, H, N, D] fp32 (q_mean=True) or None
    k_cubes: torch.Tensor | None   # [B, H, N, S, D] (kv_cubes=True) or None
    k_mean: torch.Tensor           # [B, H, N, D] fp32 (selection)
    v_cubes: torch.Tensor | None   # likewise
    k_pooled: torch.Tensor | None  # [B, H, N, D] in x.dtype (pooled=True) or None
    v_pooled: torch.Tensor | None  # likewise


def permute_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, n_prefix: int = 0,
                q_cubes: bool = False, pooled: bool = True, q_mean: bool | None = None,
                kv_cubes: bool = True) -> PermutedQKV:
    """The three permutes of one BSA call in one launch. q, k, v [B, H, L, D] of one shape and dtype (any
    strides). Q is permuted with q_cubes and pooled (fp32 mean) with q_mean (default: when not permuted);
    K is permuted (kv_cubes: V too) and pooled (fp32); with `pooled` the means of K and V are also written in
    x.dtype for the pooled remainder. Without kv_cubes (the Hopper kernel reads K/V from the raster) only the
    means are written. A mean is the same bits whether or not the cubes are written (one code path)."""
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share shape and dtype, got {[(tuple(x.shape), x.dtype) for x in (q, k, v)]}")
    _check(q, "q", layout, n_prefix)
    B, H, _, D = q.shape
    N, S = layout.num_cubes, layout.cube_volume
    q_mean = not q_cubes if q_mean is None else q_mean
    qc, qm = _outputs(q, N, S, cubes=q_cubes, mean=q_mean)
    kc, km = _outputs(k, N, S, cubes=kv_cubes, mean=True)
    vc, _ = _outputs(v, N, S, cubes=kv_cubes, mean=False)
    k16, v16 = (torch.empty(B, H, N, D, dtype=q.dtype, device=q.device) if pooled else None for _ in range(2))
    _permute_qkv_kernel[(N, B * H, 3)](
        q, k, v, q if qc is None else qc, k if kc is None else kc, v if vc is None else vc, km if qm is None else qm,
        km, k if k16 is None else k16, v if v16 is None else v16, n_prefix, H, *_grid_args(layout), *q.stride(),
        *k.stride(), *v.stride(), **_tile_args(layout, D), Q_CUBES=q_cubes, Q_MEAN=q_mean, POOLED=pooled,
        KV_CUBES=kv_cubes, num_warps=_QKV_WARPS)
    return PermutedQKV(qc, qm, kc, km, vc, k16, v16)


def _outputs(x, N, S, cubes: bool, mean: bool):
    B, H, _, D = x.shape
    return (torch.empty(B, H, N, S, D, dtype=x.dtype, device=x.device) if cubes else None,
            torch.empty(B, H, N, D, dtype=torch.float32, device=x.device) if mean else None)
