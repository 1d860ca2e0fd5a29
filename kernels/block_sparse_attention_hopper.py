"""Hopper (sm90) fast path of the block-sparse attention forward, written in Gluon (Triton's explicit-layout
language: TMA, mbarriers, wgmma, warp specialisation).

Why: Triton 3.6 does not warp-specialise on Hopper, so the portable kernel (`block_sparse_attention.py`) runs
its 64 x 64 steps at ~390 TFLOP/s. Here a one-warp loader fills a ring of K/V tiles and their keys' additive
bias while four compute warps run the next step's Q K^T during the current step's softmax (FlashAttention-3's
schedule; `bench/gluon_probe.py` measured 528 TFLOP/s on a 14 %-kept list on an H200). The compute warps read
nothing from global memory inside the loop: every step, selected cube or block of pooled keys, is the same step.

Scope, else the portable kernel runs (`block_sparse_attention.hopper_path_reason`): keep_ratio 1 (Q and the
output through the raster rows), 64-token cubes, one cube per program, head_dim 64 or 128, fp16 / bf16, no
extra keys, an sm90 GPU and a Triton whose Gluon this was built against. Same contract as the portable raster
kernel: the selected cubes' exact keys (padding slots masked by key_bias), then, with a remainder, one pooled
key per cube the row's cube did not select, in one online softmax; the LSE (log2 domain) of every slot in cube
order.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

CUBE = 64  # query rows and keys per step: one 64-token cube
_NUM_WARPS = 4  # the compute warpgroup; the loader warp comes on top (its group padded to 4 warps: 256 threads)
# per head_dim: (K/V ring depth, registers a thread), the most programs per SM the build fits without spills
#   128: 3 stages (the probe's best), ~115 KB of shared memory, 128 registers: two programs per SM;
#   64: 4 stages, ~75 KB, 80 registers: three (H200, 480p fp16: 14-34 % faster than two at 128 registers)
_BUILD_BY_HEAD_DIM = {128: (3, 128), 64: (4, 80)}


@gluon.jit
def _cube_rows(cube, slots, GT, GH, GW, NH, NW, CT: gl.constexpr, CH: gl.constexpr, CW: gl.constexpr):
    """(raster token, inside the grid) of `slots` of `cube`: `kernels/cube_tokens.py`'s map, in Gluon."""
    c_t = cube // (NH * NW)
    c_h = (cube // NW) % NH
    c_w = cube % NW
    t = c_t * CT + slots // (CH * CW)
    h = c_h * CH + (slots // CW) % CH
    w = c_w * CW + slots % CW
    return (t * GH + h) * GW + w, (t < GT) & (h < GH) & (w < GW)


@gluon.jit
def _cube_tile(cube, n_prefix, stride_l, GT, GH, GW, NH, NW, HEAD_DIM: gl.constexpr, layout: gl.constexpr,
               CUBE: gl.constexpr, CT: gl.constexpr, CH: gl.constexpr, CW: gl.constexpr):
    """(element offsets, mask) of cube's [64, HEAD_DIM] raster tile in `layout`: rows past the grid masked."""
    slots = gl.arange(0, CUBE, layout=gl.SliceLayout(1, layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    token, valid = _cube_rows(cube, slots, GT, GH, GW, NH, NW, CT, CH, CW)
    rows = gl.expand_dims((token + n_prefix).to(gl.int64) * stride_l, 1)
    return rows + gl.expand_dims(dims, 0), gl.expand_dims(valid, 1) & gl.expand_dims(dims < HEAD_DIM, 0)


@gluon.jit
def _pooled_bias(block, log2n_ptr, attended_row_ptr, N, cols, CUBE: gl.constexpr):
    """Additive log2 bias of a block of pooled keys: their log2 weights, -inf where the row's cube attends that
    cube exactly or past the N cubes."""
    pooled = block * CUBE + cols
    ok = pooled < N
    weight = gl.load(log2n_ptr + pooled, mask=ok, other=float("-inf"))
    hidden = gl.load(attended_row_ptr + pooled, mask=ok, other=1)
    return gl.where(hidden != 0, float("-inf"), weight)


@gluon.jit
def _softmax_step(s, bias, m_i, l_i, qk_scale):
    """One online-softmax step in the log2 domain: (p, alpha, m, l)."""
    s = s * qk_scale + gl.expand_dims(bias, 0)
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet: 0, not NaN
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(s - gl.expand_dims(m_use, 1))
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _bias_row(bias_smem, slot):
    """Ring slot `slot` of the key biases as a plain [64] row (the TMA writes it as [1, 64])."""
    return bias_smem.index(slot)._reinterpret(gl.float32, [bias_smem.shape[2]], gl.SwizzledSharedLayout(1, 1, 1, [0]))


@gluon.jit
def _pipelined_step(j, acc, p_op, m_i, l_i, q_smem, k_smem, v_smem, bias_smem, ready, empty, qk_scale, s_zero,
                    orow: gl.constexpr, p_layout: gl.constexpr, bias_layout: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Step j's P V with step j + 1's Q K^T and softmax in flight beside it."""
    gl.thread_barrier()  # every compute warp is done with step j - 1's slot
    mbarrier.arrive(empty.index((j + NUM_STAGES - 1) % NUM_STAGES), pred=j >= 1)
    cur = j % NUM_STAGES
    nxt = (j + 1) % NUM_STAGES
    mbarrier.wait(ready.index(nxt), ((j + 1) // NUM_STAGES) & 1)
    s_tok = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    o_tok = warpgroup_mma(p_op, v_smem.index(cur), acc, is_async=True)
    bias = _bias_row(bias_smem, nxt).load(bias_layout)  # read while the tensor cores run
    s = warpgroup_mma_wait(1, deps=[s_tok])  # Q K^T of step j + 1 done; P V of step j may still run
    p, alpha, m_i, l_i = _softmax_step(s, bias, m_i, l_i, qk_scale)
    acc, p_op = warpgroup_mma_wait(0, deps=[o_tok, p_op])
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow), 1)
    return acc, gl.convert_layout(p.to(p_op.dtype), p_layout), m_i, l_i


@gluon.jit
def _loader(k_desc, v_desc, kbar_desc, vbar_desc, bias_desc, k_smem, v_smem, bias_smem, ready, empty, table_ptr,
            log2n_ptr, attended_row_ptr, count, n_steps, N, kv_row0, bh, CUBE: gl.constexpr,
            NUM_STAGES: gl.constexpr):
    """One warp: each step's K/V tiles and the additive log2 bias of its keys into the ring, so the compute warps
    never wait on a global load. Selected cubes: K/V and the cube's key-bias row (-inf on padding slots) by TMA.
    Then blocks of pooled keys: this head's means by TMA ([1, 64, D] blocks: rows past N arrive as zeros) and
    their bias computed here, its global loads issued before the slot is free."""
    kv_bytes: gl.constexpr = 2 * k_desc.block_type.nbytes
    for j in range(count):
        slot = j % NUM_STAGES
        kv = gl.load(table_ptr + j)
        mbarrier.wait(empty.index(slot), ((j // NUM_STAGES) & 1) ^ 1)  # a fresh barrier passes lap 0
        bar = ready.index(slot)
        mbarrier.expect(bar, kv_bytes + bias_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row0 + kv * CUBE, 0], bar, k_smem.index(slot))
        tma.async_copy_global_to_shared(v_desc, [kv_row0 + kv * CUBE, 0], bar, v_smem.index(slot))
        tma.async_copy_global_to_shared(bias_desc, [kv, 0], bar, bias_smem.index(slot))
    cols = gl.arange(0, CUBE, layout=gl.BlockedLayout([CUBE // 32], [32], [1], [0]))
    for j in range(count, n_steps):
        slot = j % NUM_STAGES
        bias = _pooled_bias(j - count, log2n_ptr, attended_row_ptr, N, cols, CUBE)
        mbarrier.wait(empty.index(slot), ((j // NUM_STAGES) & 1) ^ 1)
        _bias_row(bias_smem, slot).store(bias)
        gl.thread_barrier()  # every lane's bias is in shared memory before the arrive below releases the slot
        bar = ready.index(slot)
        mbarrier.expect(bar, kv_bytes)
        row = (j - count) * CUBE
        tma.async_copy_global_to_shared(kbar_desc, [bh, row, 0], bar, k_smem.index(slot)._reinterpret(
            kbar_desc.dtype, kbar_desc.block_type.shape, kbar_desc.layout))
        tma.async_copy_global_to_shared(vbar_desc, [bh, row, 0], bar, v_smem.index(slot)._reinterpret(
            vbar_desc.dtype, vbar_desc.block_type.shape, vbar_desc.layout))


@gluon.jit
def _compute(Q, Out, Lse, q_smem, k_smem, v_smem, bias_smem, ready, empty, n_steps, N, bh, b, h, cube, n_prefix,
             qk_scale, GT, GH, GW, NH, NW,
             stride_qb, stride_qh, stride_ql, stride_ob, stride_oh, stride_ol,
             HEAD_DIM: gl.constexpr, CUBE: gl.constexpr, CT: gl.constexpr, CH: gl.constexpr,
             CW: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Four warps: Q's raster rows into shared memory, the steps' Q K^T / softmax / P V (the next Q K^T in
    flight during the softmax), then the output rows and the LSE."""
    NUM_WARPS: gl.constexpr = gl.num_warps()
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [NUM_WARPS, 1],
                                               [1, 0])
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                      instr_shape=[16, CUBE, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    srow: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_rows, live = _cube_tile(cube, n_prefix, stride_ql, GT, GH, GW, NH, NW, HEAD_DIM, io_layout, CUBE, CT, CH, CW)
    q = gl.load(Q + b * stride_qb + h * stride_qh + q_rows, mask=live, other=0.0)
    q_smem.store(q)
    fence_async_shared()
    gl.thread_barrier()

    bias_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    m_i = gl.full([CUBE], float("-inf"), gl.float32, srow)
    l_i = gl.full([CUBE], 0.0, gl.float32, srow)
    acc = gl.zeros([CUBE, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([CUBE, CUBE], gl.float32, s_layout)
    if n_steps > 0:
        mbarrier.wait(ready.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
        p, alpha, m_i, l_i = _softmax_step(s, _bias_row(bias_smem, 0).load(bias_layout), m_i, l_i, qk_scale)
        p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
        for j in range(n_steps - 1):  # selected cubes and pooled blocks alike: the loader made them one kind
            acc, p_op, m_i, l_i = _pipelined_step(j, acc, p_op, m_i, l_i, q_smem, k_smem, v_smem, bias_smem, ready,
                                                  empty, qk_scale, s_zero, orow, p_layout, bias_layout, NUM_STAGES)
        acc = warpgroup_mma(p_op, v_smem.index((n_steps - 1) % NUM_STAGES), acc)

    l_safe = gl.where(l_i > 0.0, l_i, 1.0)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, orow), 1)
    # through Q's buffer (every Q K^T is done): 16-byte stores of whole rows instead of the MMA layout's 4-byte ones
    q_smem.store(out.to(Out.dtype.element_ty))
    gl.thread_barrier()
    o_rows, live = _cube_tile(cube, n_prefix, stride_ol, GT, GH, GW, NH, NW, HEAD_DIM, io_layout, CUBE, CT, CH, CW)
    gl.store(Out + b * stride_ob + h * stride_oh + o_rows, q_smem.load(io_layout), mask=live)
    lse = gl.where(l_i > 0.0, m_i + gl.log2(l_safe), float("-inf"))
    gl.store(Lse + (bh * N + cube) * CUBE + gl.arange(0, CUBE, layout=srow), lse)


@gluon.jit
def _hopper_block_sparse_fwd(Q, Out, Lse, k_desc, v_desc, kbar_desc, vbar_desc, bias_desc, log2n_ptr,
                             attended_ptr, order_ptr, count_ptr, index_ptr, qk_scale, H, N, KG, n_pool_steps,
                             n_prefix, GT, GH, GW, NH, NW, stride_qb, stride_qh, stride_ql, stride_ob, stride_oh,
                             stride_ol, HEAD_DIM: gl.constexpr, CUBE: gl.constexpr, CT: gl.constexpr,
                             CH: gl.constexpr, CW: gl.constexpr, NUM_STAGES: gl.constexpr):
    """One program per (batch * head, query cube), in order_ptr's order (heads by descending work)."""
    work = gl.load(order_ptr + gl.program_id(0)).to(gl.int64)
    bh = work // N
    cube = work % N
    b = bh // H
    h = bh % H
    count = gl.load(count_ptr + work)
    n_steps = count + n_pool_steps
    table_ptr = index_ptr + work * KG

    q_smem = gl.allocate_shared_memory(k_desc.dtype, [CUBE, HEAD_DIM], k_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES, CUBE, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES, CUBE, HEAD_DIM], v_desc.layout)
    bias_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, 1, CUBE], bias_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)

    gl.warp_specialize(
        [(_compute, (Q, Out, Lse, q_smem, k_smem, v_smem, bias_smem, ready, empty, n_steps, N, bh, b, h, cube,
                     n_prefix, qk_scale, GT, GH, GW, NH, NW, stride_qb, stride_qh, stride_ql, stride_ob, stride_oh,
                     stride_ol, HEAD_DIM, CUBE, CT, CH, CW, NUM_STAGES)),
         (_loader, (k_desc, v_desc, kbar_desc, vbar_desc, bias_desc, k_smem, v_smem, bias_smem, ready, empty,
                    table_ptr, log2n_ptr, attended_ptr + work * N, count, n_steps, N, (bh * N * CUBE).to(gl.int32),
                    bh.to(gl.int32), CUBE, NUM_STAGES))],
        [1], [40])


def hopper_block_sparse_attention(q, k_cubes, v_cubes, layout, kv_count, kv_index, out, lse, n_prefix, scale, order,
                                  key_bias, log2_n, remainder):
    """Launch the Gluon kernel (where `hopper_path_reason` gave none): q, out raster [B, H, L, D] (unit
    stride on D), k_cubes / v_cubes [B, H, N, 64, D] contiguous in q's dtype, kv_count [B, H, N] / kv_index
    [B, H, N, K] int32, lse [B, H, N, 64] fp32, order the launch order, key_bias [N, 64] / log2_n [N] fp32,
    remainder None or (k_bar, v_bar [B, H, N, D] contiguous in q's dtype, attended [B, H, N, N] uint8)."""
    B, H, N, _, D = k_cubes.shape
    element = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    smem_layout = gl.NVMMASharedLayout.get_default_for([CUBE, D], element)
    pooled_layout = gl.NVMMASharedLayout.get_default_for([1, CUBE, D], element)

    def rows(x):
        return TensorDescriptor.from_tensor(x.view(-1, D), [CUBE, D], smem_layout)

    def per_head(x):  # a head's last block reads zeros past its N rows, not the next head's
        return TensorDescriptor.from_tensor(x.view(B * H, -1, D), [1, CUBE, D], pooled_layout)

    k_desc, v_desc = rows(k_cubes), rows(v_cubes)
    bias_desc = TensorDescriptor.from_tensor(key_bias, [1, CUBE], gl.NVMMASharedLayout(0, 32))
    if remainder is None:
        kbar_desc, vbar_desc, attended, n_pool_steps = per_head(k_cubes), per_head(v_cubes), kv_count, 0
    else:
        k_bar, v_bar, attended = remainder
        kbar_desc, vbar_desc, n_pool_steps = per_head(k_bar), per_head(v_bar), -(-N // CUBE)
    stages, registers = _BUILD_BY_HEAD_DIM[D]
    _hopper_block_sparse_fwd[(B * H * N,)](
        q, out, lse, k_desc, v_desc, kbar_desc, vbar_desc, bias_desc, log2_n, attended, order, kv_count, kv_index,
        scale * 1.4426950408889634, H, N, kv_index.shape[-1], n_pool_steps, n_prefix, *layout.grid,
        *layout.cubes_per_axis[1:], q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        out.stride(2), HEAD_DIM=D, CUBE=CUBE, CT=layout.cube_size[0], CH=layout.cube_size[1],
        CW=layout.cube_size[2], NUM_STAGES=stages, num_warps=_NUM_WARPS, maxnreg=registers)

