"""Query-sparse selection: per (batch, head, cube) which queries are computed and whom the others copy.

Semantics are `bsa_core.reference.select_queries` + the q_bar half of `pooled_cubes`: keep the cube
centre plus the keep-1 valid queries least cosine-similar to it (ties: lower slot first, as the
reference's stable sort), each dropped query copies the kept query it is most similar to (ties:
lower slot). One program owns one cube. The keep set is found without a sort: a 32-step bisection
on the cosine's order-preserving int32 key finds the keep-th smallest value, ties at that value are
taken in slot order with a cumulative count. Everything stays in registers; q is re-read per pass
over head_dim chunks (it is L1/L2 resident), so S up to 512 and D up to 256 fit. The similarity
matrix runs on the tensor cores in the input's 16-bit type (exact products, fp32 sums): measured on
an H100, the fp32 'ieee' dot took 18.9 ms of a 21 ms BSA call at 480p with 4x4x4 cubes.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .cube_index import keep_counts, kept_width
from .cube_tokens import _cube_tokens, _grid_args

_EPS = tl.constexpr(1e-12)  # torch.nn.functional.normalize's eps
_TILE_ELEMENTS = 8192
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # its 16-bit tl.dot is wrong: fp32 there


@triton.jit
def _order_key(x):
    """float32 -> int32 with the same order (-0.0 folded onto +0.0, as a float compare sees them)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _kth_smallest_key(key, cand, need):
    """Smallest int32 t with #{cand & key <= t} >= need (int32 min when need == 0)."""
    lo = tl.full([], -2147483649, tl.int64)  # count there is 0 < need, or need == 0 and lo + 1 wins
    hi = tl.full([], 2147483647, tl.int64)   # count there is every candidate >= need
    for _ in range(32):
        mid = (lo + hi) >> 1
        enough = tl.sum((cand & (key <= mid)).to(tl.int32), 0) >= need
        lo = tl.where(enough, lo, mid)
        hi = tl.where(enough, mid, hi)
    return hi


@triton.jit
def _query_select_kernel(Q, Keep, Centre, QCount, QIndex, QSource, QBar, n_heads, GT, GH, GW, NH, NW,
                         stride_qb, stride_qh, stride_qn, stride_qs, stride_qd, KQ_WIDTH,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, S_PAD: tl.constexpr,
                         BLOCK_I: tl.constexpr, CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
                         DOT_F32: tl.constexpr):
    S: tl.constexpr = CT * CH * CW
    tl.static_assert(S_PAD >= S)
    tl.static_assert(S_PAD % BLOCK_I == 0)
    tl.static_assert((BLOCK_I >= 16) & (BLOCK_D >= 16) & (S_PAD >= 16))  # tl.dot tile minimum
    cube = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    row = bh * tl.num_programs(0) + cube
    q_base = Q + (bh // n_heads) * stride_qb + (bh % n_heads) * stride_qh + cube.to(tl.int64) * stride_qn
    slots = tl.arange(0, S_PAD)
    valid = _cube_tokens(cube, slots, GT, GH, GW, NH, NW, CT, CH, CW)[1]
    centre = tl.load(Centre + cube)
    keep = tl.load(Keep + cube).to(tl.int32)

    # cosine of every slot to the centre (padding rows load as zero)
    norm2 = tl.zeros([S_PAD], dtype=tl.float32)
    dot_c = tl.zeros([S_PAD], dtype=tl.float32)
    norm2_c = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, HEAD_DIM, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(q_base + slots[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                    mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        q_c = tl.load(q_base + centre * stride_qs + offs_d * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
        norm2 += tl.sum(q * q, 1)
        dot_c += tl.sum(q * q_c[None, :], 1)
        norm2_c += q_c * q_c
    inv_norm = 1.0 / tl.maximum(tl.sqrt(norm2), _EPS)
    cos = dot_c * inv_norm / tl.maximum(tl.sqrt(tl.sum(norm2_c, 0)), _EPS)

    # keep the centre and the keep-1 smallest cosines, ties in slot order
    cand = valid & (slots != centre)
    key = _order_key(cos)
    need = keep - 1
    t = _kth_smallest_key(key, cand, need)
    below = cand & (key < t)
    tied = cand & (key == t)
    tie_rank = tl.cumsum(tied.to(tl.int32), 0) - tied.to(tl.int32)
    kept = below | (tied & (tl.sum(below.to(tl.int32), 0) + tie_rank < need)) | (slots == centre)
    count = tl.sum(kept.to(tl.int32), 0)
    position = tl.cumsum(kept.to(tl.int32), 0) - kept.to(tl.int32)
    tl.store(QCount + row, count)
    qi_base = QIndex + row * KQ_WIDTH
    tl.store(qi_base + slots, tl.full([S_PAD], -1, tl.int32), mask=(slots >= count) & (slots < KQ_WIDTH))
    tl.store(qi_base + position, slots, mask=kept)

    # q_bar: mean of the kept queries, fp32
    for d0 in range(0, HEAD_DIM, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(q_base + slots[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                    mask=kept[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        tl.store(QBar + row * HEAD_DIM + offs_d, tl.sum(q, 0) / count.to(tl.float32), mask=d_ok)

    # source: argmax over kept j of q_i . q_j / |q_j| (row scale does not move the argmax); kept -> itself
    for i0 in range(0, S_PAD, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        row_valid = _cube_tokens(cube, rows, GT, GH, GW, NH, NW, CT, CH, CW)[1]
        sim = tl.zeros([BLOCK_I, S_PAD], dtype=tl.float32)
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < HEAD_DIM
            q_i = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                          mask=row_valid[:, None] & d_ok[None, :], other=0.0)
            q_j = tl.load(q_base + slots[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                          mask=kept[:, None] & d_ok[None, :], other=0.0)
            if DOT_F32:
                sim += tl.dot(q_i.to(tl.float32), tl.trans(q_j.to(tl.float32)), input_precision="ieee")
            else:  # 16-bit products are exact in the fp32 accumulator: tensor cores, same argmax
                sim += tl.dot(q_i, tl.trans(q_j))
        sim = tl.where(kept[None, :], sim * inv_norm[None, :], float("-inf"))
        best = tl.argmax(sim, 1, tie_break_left=True)
        is_kept = tl.sum((kept[None, :] & (slots[None, :] == rows[:, None])).to(tl.int32), 1) > 0
        best = tl.where(is_kept, rows, best)
        source = tl.sum((kept[None, :] & (slots[None, :] < best[:, None])).to(tl.int32), 1)
        tl.store(QSource + row * S + rows, tl.where(row_valid, source, -1), mask=rows < S)


def query_select(q_cubes: torch.Tensor, layout, keep_ratio: float):
    """q_cubes [B, H, N, S, D] (cube order, any strides) -> (q_count [B,H,N] int32,
    q_index [B,H,N,Kq] int32 ascending slots, -1 padded, Kq = the layout's largest keep count,
    q_source [B,H,N,S] int32, q_bar [B,H,N,D] float32)."""
    if q_cubes.dim() != 5 or q_cubes.shape[2:4] != (layout.num_cubes, layout.cube_volume):
        raise ValueError(f"q_cubes must be [B, H, {layout.num_cubes}, {layout.cube_volume}, D], "
                         f"got shape {tuple(q_cubes.shape)}")
    if q_cubes.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q_cubes must be float16, bfloat16 or float32, got {q_cubes.dtype}")
    if layout.centre_slot.device != q_cubes.device:
        raise ValueError(f"layout is on {layout.centre_slot.device}, q_cubes on {q_cubes.device}")
    if isinstance(keep_ratio, bool) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    B, H, N, S, D = q_cubes.shape
    keep = keep_counts(layout.n_valid, keep_ratio).to(torch.int32)
    width = kept_width(layout.grid, layout.cube_size, keep_ratio)
    dev = q_cubes.device
    q_count = torch.empty(B, H, N, dtype=torch.int32, device=dev)
    q_index = torch.empty(B, H, N, width, dtype=torch.int32, device=dev)
    q_source = torch.empty(B, H, N, S, dtype=torch.int32, device=dev)
    q_bar = torch.empty(B, H, N, D, dtype=torch.float32, device=dev)
    s_pad = max(16, triton.next_power_of_2(S))
    block_d = max(16, min(triton.next_power_of_2(D), _TILE_ELEMENTS // s_pad))
    block_i = max(16, min(s_pad, _TILE_ELEMENTS // s_pad))
    _query_select_kernel[(N, B * H)](
        q_cubes, keep, layout.centre_slot, q_count, q_index, q_source, q_bar, H, *_grid_args(layout),
        *q_cubes.stride(), width, HEAD_DIM=D, BLOCK_D=block_d, S_PAD=s_pad, BLOCK_I=block_i,
        CT=layout.cube_size[0], CH=layout.cube_size[1], CW=layout.cube_size[2],
        DOT_F32=q_cubes.dtype == torch.float32 or _INTERPRET, num_warps=4 if s_pad <= 128 else 8)
    return q_count, q_index, q_source, q_bar
