"""Hopper (sm90) fast path of the block-sparse attention forward, written in Gluon (Triton's explicit-layout
language: TMA, mbarriers, wgmma, warp specialisation).

Why: Triton 3.6 does not warp-specialise on Hopper, so the portable kernel (`block_sparse_attention.py`) runs
its 64 x 64 steps at ~390 TFLOP/s. Here a one-warp loader fills a ring of K/V tiles and their keys' additive
bias while four compute warps run the next step's Q K^T during the current step's softmax (FlashAttention-3's
schedule; `bench/gluon_probe.py` measured 528 TFLOP/s on a 14 %-kept list on an H200). The compute warps read
nothing from global memory inside the loop but a packed tile's union entry (4 bytes a step): every step, selected
cube or block of pooled keys, is the same step.

Scope, else the portable kernel runs (`block_sparse_attention.hopper_path_reason`): keep_ratio 1 (Q and the
output through the raster rows), 64-token cubes, head_dim 64 or 128, fp16 / bf16, no extra keys, an sm90 GPU and
a Triton whose Gluon this was built against. Same contract as the portable raster kernel: the selected cubes'
exact keys (padding slots masked by key_bias), then, with a remainder, one pooled key per cube the row's cube did
not select, in one online softmax; the LSE (log2 domain) of every valid slot in cube order. A program runs a cube
or a tile of partial cubes (`packed_tiles.py`: up to four cubes of <= 32 rows share the 64 rows), which runs the
union of its members' lists and masks each row to its own member's keys. K/V come in cube order, or straight from
the raster as 5-D boxes (`cube_tokens.cube_box_view`; `block_sparse_attention.raster_kv_reason` says where).
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

from .cube_tokens import cube_box_view
from .packed_tiles import MAX_MEMBERS, packed_tiles, packed_union

CUBE = 64  # query rows and keys per step: one 64-token cube
_NUM_WARPS = 4  # the compute warpgroup; the loader warp comes on top (its group padded to 4 warps: 256 threads)
# per head_dim: (K/V ring depth, registers a thread, Q K^T's A operand from registers), the most programs per SM
# the build fits without spills
#   128: 3 stages (the probe's best), ~115 KB of shared memory, 128 registers: two programs per SM; Q in registers
#        (the compute warps raise their own cap past 200, setmaxnreg) halves the shared-memory reads of a Q K^T, which
#        with both operands in shared memory needs 128 B a clock, all an SM has (H200, session 16: 0.6-7 % faster)
#   64: 4 stages, ~75 KB, 80 registers: three (H200, 480p fp16: 14-34 % faster than two at 128 registers); Q stays
#        in shared memory (in registers it spills at 80)
_BUILD_BY_HEAD_DIM = {128: (3, 128, True), 64: (4, 80, False)}
# the loader warp's register cap (setmaxnreg): what it gives up goes to the compute warps; at 40 the head_dim 64
# build spilled in the packed tiles' step loop, at 32 neither build spills (tools/gluon_build_check.py)
_LOADER_REGISTERS = gl.constexpr(32)


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
def _tile_rows(tile, n_prefix, stride_l, row_token_ptr, GT, GH, GW, NH, NW, HEAD_DIM: gl.constexpr,
               layout: gl.constexpr, CUBE: gl.constexpr, CT: gl.constexpr, CH: gl.constexpr, CW: gl.constexpr,
               PACKED: gl.constexpr):
    """(element offsets, mask) of a tile's [64, HEAD_DIM] raster rows in `layout`: a cube's, rows past the grid
    masked, or a packed tile's from its row table (-1: a padding row)."""
    slots = gl.arange(0, CUBE, layout=gl.SliceLayout(1, layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    if PACKED:
        token = gl.load(row_token_ptr + tile * CUBE + slots)
        valid = token >= 0
    else:
        token, valid = _cube_rows(tile, slots, GT, GH, GW, NH, NW, CT, CH, CW)
    rows = gl.expand_dims((token + n_prefix).to(gl.int64) * stride_l, 1)
    return rows + gl.expand_dims(dims, 0), gl.expand_dims(valid, 1) & gl.expand_dims(dims < HEAD_DIM, 0)


@gluon.jit
def _with_members(weight, bits):
    """A packed tile's ring entry for a pooled key: its log2 weight with, in its low 4 mantissa bits, which members'
    rows see the key (bit g: member g); -inf where none does. Bits cleared, the weight moves by < 16 ulp."""
    code = (weight.to(gl.int32, bitcast=True) & -16) | bits
    return gl.where(bits != 0, code.to(gl.float32, bitcast=True), float("-inf"))


@gluon.jit
def _pooled_bias(block, log2n_ptr, attended_ptr, members_ptr, bh, tile, N, cols, CUBE: gl.constexpr,
                 PACKED: gl.constexpr, MEMBERS: gl.constexpr):
    """Additive log2 bias of a block of pooled keys: their log2 weights, hidden (-inf) past the N cubes and where
    the row's cube attends that cube exactly; for a packed tile, hidden per member (`_with_members`)."""
    pooled = block * CUBE + cols
    ok = pooled < N
    weight = gl.load(log2n_ptr + pooled, mask=ok, other=float("-inf"))
    head = attended_ptr + bh * N * N
    if PACKED:
        bits = gl.zeros_like(pooled)
        for g in gl.static_range(MEMBERS):
            member = gl.load(members_ptr + tile * MEMBERS + g)
            hidden = gl.load(head + gl.maximum(member, 0) * N + pooled, mask=ok & (member >= 0), other=1)
            bits |= (hidden == 0).to(gl.int32) << g
        return _with_members(weight, bits)
    else:
        hidden = gl.load(head + tile * N + pooled, mask=ok, other=1)
        return gl.where(hidden != 0, float("-inf"), weight)


@gluon.jit
def _step_bias(ring_row, row_bit, table_ptr, step, count, PACKED: gl.constexpr):
    """Step `step`'s additive log2 bias, broadcastable to the [64 rows, 64 keys] scores: the ring's key biases; for
    a packed tile masked to the members that see them (row_bit: 1 << the row's member; a padding row's member,
    NO_MEMBER, is no bit of an entry). A selected cube is seen by the same members for all its keys (its union
    entry's high byte): a per-row mask, one add an element (H200, session 16: 1-4 % faster than testing every
    element's bits). A block of pooled keys carries its bits per key (`_with_members`)."""
    if PACKED:
        if step < count:
            bits = gl.load(table_ptr + step) >> 24
            hidden = gl.where((bits & row_bit) != 0, 0.0, float("-inf"))
            bias = gl.expand_dims(ring_row, 0) + gl.expand_dims(hidden, 1)
        else:
            code = ring_row.to(gl.int32, bitcast=True)
            weight = (code & -16).to(gl.float32, bitcast=True)
            sees = (gl.expand_dims(code, 0) & gl.expand_dims(row_bit, 1)) != 0
            bias = gl.where(sees, gl.expand_dims(weight, 0), float("-inf"))
    else:
        bias = gl.expand_dims(ring_row, 0)
    return bias


@gluon.jit
def _softmax_step(s, bias, m_i, l_i, qk_scale):
    """One online-softmax step in the log2 domain: (p, alpha, m, l)."""
    s = s * qk_scale + bias
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
def _pipelined_step(j, acc, p_op, m_i, l_i, q_op, k_smem, v_smem, bias_smem, ready, empty, qk_scale, s_zero,
                    row_bit, table_ptr, count, orow: gl.constexpr, p_layout: gl.constexpr,
                    bias_layout: gl.constexpr, NUM_STAGES: gl.constexpr, PACKED: gl.constexpr,
                    Q_IN_REGISTERS: gl.constexpr):
    """Step j's P V with step j + 1's Q K^T and softmax in flight beside it (q_op: Q in registers or shared
    memory)."""
    gl.thread_barrier()  # every compute warp is done with step j - 1's slot
    mbarrier.arrive(empty.index((j + NUM_STAGES - 1) % NUM_STAGES), pred=j >= 1)
    cur = j % NUM_STAGES
    nxt = (j + 1) % NUM_STAGES
    mbarrier.wait(ready.index(nxt), ((j + 1) // NUM_STAGES) & 1)
    s_tok = warpgroup_mma(q_op, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    o_tok = warpgroup_mma(p_op, v_smem.index(cur), acc, is_async=True)
    bias = _step_bias(_bias_row(bias_smem, nxt).load(bias_layout), row_bit, table_ptr, j + 1, count,
                      PACKED)  # while the MMAs run
    if Q_IN_REGISTERS:  # Q K^T of step j + 1 done; P V of step j may still run
        s, q_op = warpgroup_mma_wait(1, deps=[s_tok, q_op])
    else:
        s = warpgroup_mma_wait(1, deps=[s_tok])
    p, alpha, m_i, l_i = _softmax_step(s, bias, m_i, l_i, qk_scale)
    acc, p_op = warpgroup_mma_wait(0, deps=[o_tok, p_op])
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow), 1)
    return acc, gl.convert_layout(p.to(p_op.dtype), p_layout), m_i, l_i, q_op


@gluon.jit
def _loader(k_desc, v_desc, kbar_desc, vbar_desc, bias_desc, k_smem, v_smem, bias_smem, ready, empty, table_ptr,
            log2n_ptr, attended_ptr, members_ptr, count, n_steps, N, kv_row0, bh, tile, raster_grid, raster_rows,
            CUBE: gl.constexpr, NUM_STAGES: gl.constexpr, PACKED: gl.constexpr, MEMBERS: gl.constexpr,
            CT: gl.constexpr, CH: gl.constexpr, CW: gl.constexpr, KV_RASTER: gl.constexpr,
            HAS_REMAINDER: gl.constexpr):
    """One warp: each step's K/V tiles and the additive log2 bias of its keys into the ring, so the compute warps
    never wait on a global load. Selected cubes: K/V and the cube's key-bias row (-inf on padding slots) by TMA
    (a packed tile's union entry carries its members' bits above the cube: `_step_bias` reads them). Then blocks
    of pooled keys: this head's means by TMA ([1, 64, D] blocks: rows past N arrive as zeros) and their bias
    computed here, issuing its global loads before the slot is free."""
    kv_bytes: gl.constexpr = 2 * k_desc.block_type.nbytes
    cols = gl.arange(0, CUBE, layout=gl.BlockedLayout([CUBE // 32], [32], [1], [0]))
    if KV_RASTER:  # K/V straight from the raster: a cube is a [1, CT, CH, CW, D] box of the 5-D view
        NW = raster_grid & 0xFFFF
        NHW = (raster_grid >> 16) * NW
        inv_nw = 1.0 / NW.to(gl.float32)
        inv_nhw = 1.0 / NHW.to(gl.float32)
        outer = bh % (raster_rows >> 16)
        row_t = (bh // (raster_rows >> 16)) * (raster_rows & 0xFFFF)
    for j in range(count):
        slot = j % NUM_STAGES
        kv = gl.load(table_ptr + j) & 0xFFFFFF
        bar = ready.index(slot)
        mbarrier.wait(empty.index(slot), ((j // NUM_STAGES) & 1) ^ 1)  # a fresh barrier passes lap 0
        mbarrier.expect(bar, kv_bytes + bias_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(bias_desc, [kv, 0], bar, bias_smem.index(slot))
        if KV_RASTER:
            # the cube's (t, h, w) by reciprocal multiplies, not integer divisions (~20 instructions each on the
            # loader warp, which shares a scheduler with compute warps); exact below 2^20 cubes
            c_t = ((kv.to(gl.float32) + 0.5) * inv_nhw).to(gl.int32)
            c_hw = kv - c_t * NHW
            c_h = ((c_hw.to(gl.float32) + 0.5) * inv_nw).to(gl.int32)
            box = [outer, row_t + c_t * CT, c_h * CH, (c_hw - c_h * NW) * CW, 0]
            tma.async_copy_global_to_shared(k_desc, box, bar, k_smem.index(slot)._reinterpret(
                k_desc.dtype, k_desc.block_type.shape, k_desc.layout))
            tma.async_copy_global_to_shared(v_desc, box, bar, v_smem.index(slot)._reinterpret(
                v_desc.dtype, v_desc.block_type.shape, v_desc.layout))
        else:
            tma.async_copy_global_to_shared(k_desc, [kv_row0 + kv * CUBE, 0], bar, k_smem.index(slot))
            tma.async_copy_global_to_shared(v_desc, [kv_row0 + kv * CUBE, 0], bar, v_smem.index(slot))
    if HAS_REMAINDER:
        _pooled_loads(kbar_desc, vbar_desc, k_smem, v_smem, bias_smem, ready, empty, log2n_ptr, attended_ptr,
                      members_ptr, count, n_steps, N, bh, tile, cols, kv_bytes, CUBE, NUM_STAGES, PACKED, MEMBERS)


@gluon.jit
def _pooled_loads(kbar_desc, vbar_desc, k_smem, v_smem, bias_smem, ready, empty, log2n_ptr, attended_ptr, members_ptr,
                  count, n_steps, N, bh, tile, cols, kv_bytes: gl.constexpr, CUBE: gl.constexpr,
                  NUM_STAGES: gl.constexpr, PACKED: gl.constexpr, MEMBERS: gl.constexpr):
    """The loader's steps after the selected cubes: blocks of pooled keys (this head's means) by TMA, their bias
    computed here."""
    for j in range(count, n_steps):
        slot = j % NUM_STAGES
        bias = _pooled_bias(j - count, log2n_ptr, attended_ptr, members_ptr, bh, tile, N, cols, CUBE, PACKED, MEMBERS)
        mbarrier.wait(empty.index(slot), ((j // NUM_STAGES) & 1) ^ 1)
        _bias_row(bias_smem, slot).store(bias)
        gl.thread_barrier()  # every lane's bias is in shared memory before the expect below can complete
        bar = ready.index(slot)
        mbarrier.expect(bar, kv_bytes)
        row = (j - count) * CUBE
        tma.async_copy_global_to_shared(kbar_desc, [bh, row, 0], bar, k_smem.index(slot)._reinterpret(
            kbar_desc.dtype, kbar_desc.block_type.shape, kbar_desc.layout))
        tma.async_copy_global_to_shared(vbar_desc, [bh, row, 0], bar, v_smem.index(slot)._reinterpret(
            vbar_desc.dtype, vbar_desc.block_type.shape, vbar_desc.layout))


@gluon.jit
def _compute(Q, Out, Lse, q_smem, k_smem, v_smem, bias_smem, ready, empty, table_ptr, count, n_steps, N, bh, b, h,
             tile, n_prefix, qk_scale, key_bias_ptr, members_ptr, row_token_ptr, row_slot_ptr, row_member_ptr, GT, GH,
             GW, NH, NW, stride_qb, stride_qh, stride_ql, stride_ob, stride_oh, stride_ol,
             HEAD_DIM: gl.constexpr, CUBE: gl.constexpr, CT: gl.constexpr, CH: gl.constexpr,
             CW: gl.constexpr, NUM_STAGES: gl.constexpr, PACKED: gl.constexpr, MEMBERS: gl.constexpr,
             Q_IN_REGISTERS: gl.constexpr):
    """Four warps: the tile's raster rows of Q into shared memory, the steps' Q K^T / softmax / P V (the next Q K^T
    in flight during the softmax), then the output rows and the LSE."""
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

    q_rows, live = _tile_rows(tile, n_prefix, stride_ql, row_token_ptr, GT, GH, GW, NH, NW, HEAD_DIM, io_layout, CUBE,
                              CT, CH, CW, PACKED)
    q = gl.load(Q + b * stride_qb + h * stride_qh + q_rows, mask=live, other=0.0)
    q_smem.store(q)
    fence_async_shared()
    gl.thread_barrier()
    if Q_IN_REGISTERS:
        q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
    else:
        q_op = q_smem

    rows = gl.arange(0, CUBE, layout=srow)
    if PACKED:
        row_bit = 1 << gl.load(row_member_ptr + tile * CUBE + rows)
    else:
        row_bit = rows  # unused: every row of a cube sees the ring's biases
    bias_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    m_i = gl.full([CUBE], float("-inf"), gl.float32, srow)
    l_i = gl.full([CUBE], 0.0, gl.float32, srow)
    acc = gl.zeros([CUBE, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([CUBE, CUBE], gl.float32, s_layout)
    if n_steps > 0:
        mbarrier.wait(ready.index(0), 0)
        s = warpgroup_mma(q_op, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
        bias = _step_bias(_bias_row(bias_smem, 0).load(bias_layout), row_bit, table_ptr, 0, count, PACKED)
        p, alpha, m_i, l_i = _softmax_step(s, bias, m_i, l_i, qk_scale)
        p_op = gl.convert_layout(p.to(Q.dtype.element_ty), p_layout)
        for j in range(n_steps - 1):  # selected cubes and pooled blocks alike: the loader made them one kind
            acc, p_op, m_i, l_i, q_op = _pipelined_step(j, acc, p_op, m_i, l_i, q_op, k_smem, v_smem, bias_smem,
                                                        ready, empty, qk_scale, s_zero, row_bit, table_ptr,
                                                        count, orow, p_layout, bias_layout, NUM_STAGES, PACKED,
                                                        Q_IN_REGISTERS)
        acc = warpgroup_mma(p_op, v_smem.index((n_steps - 1) % NUM_STAGES), acc)

    l_safe = gl.where(l_i > 0.0, l_i, 1.0)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, orow), 1)
    # through Q's buffer (every Q K^T is done): 16-byte stores of whole rows instead of the MMA layout's 4-byte ones
    q_smem.store(out.to(Out.dtype.element_ty))
    gl.thread_barrier()
    o_rows, live = _tile_rows(tile, n_prefix, stride_ol, row_token_ptr, GT, GH, GW, NH, NW, HEAD_DIM, io_layout, CUBE,
                              CT, CH, CW, PACKED)
    gl.store(Out + b * stride_ob + h * stride_oh + o_rows, q_smem.load(io_layout), mask=live)
    lse = gl.where(l_i > 0.0, m_i + gl.log2(l_safe), float("-inf"))
    if PACKED:  # each row's LSE to its own cube's slot; the members' padding slots -inf (the backward skips them)
        slot = gl.load(row_slot_ptr + tile * CUBE + rows)
        gl.store(Lse + bh * N * CUBE + slot, lse, mask=slot >= 0)
        for g in gl.static_range(MEMBERS):
            member = gl.load(members_ptr + tile * MEMBERS + g)
            padding = gl.load(key_bias_ptr + gl.maximum(member, 0) * CUBE + rows) != 0.0
            gl.store(Lse + (bh * N + member) * CUBE + rows, gl.full_like(lse, float("-inf")),
                     mask=padding & (member >= 0))
    else:
        gl.store(Lse + (bh * N + tile) * CUBE + rows, lse)


@gluon.jit
def _compute_partition(is_packed, Q, Out, Lse, q_smem, k_smem, v_smem, bias_smem, ready, empty, table_ptr, count,
                       n_steps, N, bh, b, h, tile, n_prefix, qk_scale, key_bias_ptr, members_ptr, row_token_ptr,
                       row_slot_ptr, row_member_ptr, GT, GH, GW, NH, NW, stride_qb, stride_qh, stride_ql, stride_ob,
                       stride_oh, stride_ol, HEAD_DIM: gl.constexpr, CUBE: gl.constexpr, CT: gl.constexpr,
                       CH: gl.constexpr, CW: gl.constexpr, NUM_STAGES: gl.constexpr, MEMBERS: gl.constexpr,
                       Q_IN_REGISTERS: gl.constexpr):
    """The compute warps of a cube or of a packed tile: one branch per program, none inside the step loop."""
    if is_packed:
        _compute(Q, Out, Lse, q_smem, k_smem, v_smem, bias_smem, ready, empty, table_ptr, count, n_steps, N, bh, b, h,
                 tile, n_prefix, qk_scale, key_bias_ptr, members_ptr, row_token_ptr, row_slot_ptr, row_member_ptr, GT,
                 GH, GW, NH, NW, stride_qb, stride_qh, stride_ql, stride_ob, stride_oh, stride_ol, HEAD_DIM, CUBE, CT,
                 CH, CW, NUM_STAGES, True, MEMBERS, Q_IN_REGISTERS)
    else:
        _compute(Q, Out, Lse, q_smem, k_smem, v_smem, bias_smem, ready, empty, table_ptr, count, n_steps, N, bh, b, h,
                 tile, n_prefix, qk_scale, key_bias_ptr, members_ptr, row_token_ptr, row_slot_ptr, row_member_ptr, GT,
                 GH, GW, NH, NW, stride_qb, stride_qh, stride_ql, stride_ob, stride_oh, stride_ol, HEAD_DIM, CUBE, CT,
                 CH, CW, NUM_STAGES, False, MEMBERS, Q_IN_REGISTERS)


@gluon.jit
def _step_count(count, N, CUBE: gl.constexpr, HAS_REMAINDER: gl.constexpr):
    """A tile's steps: its selected cubes, then with a remainder ceil(N / 64) blocks of pooled keys."""
    if HAS_REMAINDER:
        return count + (N + CUBE - 1) // CUBE
    return count


@gluon.jit
def _loader_partition(k_desc, v_desc, kbar_desc, vbar_desc, bias_desc, k_smem, v_smem, bias_smem, ready, empty,
                      table_ptr, log2n_ptr, attended_ptr, members_ptr, count, N, bh, signed_tile, raster_grid,
                      raster_rows, CUBE: gl.constexpr, NUM_STAGES: gl.constexpr, MEMBERS: gl.constexpr,
                      CT: gl.constexpr, CH: gl.constexpr, CW: gl.constexpr, KV_RASTER: gl.constexpr,
                      HAS_REMAINDER: gl.constexpr):
    """The loader warp of a cube (signed_tile >= 0) or of packed tile -1 - signed_tile. Its arguments reach it
    through shared memory, where two programs per SM leave a few bytes spare at head_dim 128: hence the sign for
    the kind, the step count (`_step_count`, as the kernel's) and K/V row offset computed here and the raster
    geometry packed in pairs of 16 bits (raster_grid: NW | NH << 16; raster_rows: GT | R << 16, R the heads
    `cube_tokens.cube_box_view` puts side by side)."""
    kv_row0 = bh * N * CUBE
    n_steps = _step_count(count, N, CUBE, HAS_REMAINDER)
    if signed_tile < 0:
        tile = -1 - signed_tile
        _loader(k_desc, v_desc, kbar_desc, vbar_desc, bias_desc, k_smem, v_smem, bias_smem, ready, empty, table_ptr,
                log2n_ptr, attended_ptr, members_ptr, count, n_steps, N, kv_row0, bh, tile, raster_grid, raster_rows,
                CUBE, NUM_STAGES, True, MEMBERS, CT, CH, CW, KV_RASTER, HAS_REMAINDER)
    else:
        _loader(k_desc, v_desc, kbar_desc, vbar_desc, bias_desc, k_smem, v_smem, bias_smem, ready, empty, table_ptr,
                log2n_ptr, attended_ptr, members_ptr, count, n_steps, N, kv_row0, bh, signed_tile, raster_grid,
                raster_rows, CUBE, NUM_STAGES, False, MEMBERS, CT, CH, CW, KV_RASTER, HAS_REMAINDER)


@gluon.jit
def _hopper_block_sparse_fwd(Q, Out, Lse, k_desc, v_desc, kbar_desc, vbar_desc, bias_desc, key_bias_ptr, log2n_ptr,
                             attended_ptr, order_ptr, tiles_ptr, members_ptr, row_token_ptr, row_slot_ptr,
                             row_member_ptr, count_ptr, index_ptr, ucount_ptr, uindex_ptr, qk_scale, H, N, BH,
                             n_singles, n_packed, KG, KU, raster_grid, raster_rows,
                             n_prefix, GT, GH, GW, NH, NW, stride_qb, stride_qh, stride_ql, stride_ob, stride_oh,
                             stride_ol, HEAD_DIM: gl.constexpr, CUBE: gl.constexpr, CT: gl.constexpr,
                             CH: gl.constexpr, CW: gl.constexpr, NUM_STAGES: gl.constexpr, MEMBERS: gl.constexpr,
                             Q_IN_REGISTERS: gl.constexpr, TILE_LAYOUT: gl.constexpr, KV_RASTER: gl.constexpr,
                             HAS_REMAINDER: gl.constexpr):
    """One launch: first a program per (batch * head, packed tile) (count / index: its members' union,
    `packed_tiles.packed_union`, KU wide), then one per (batch * head, cube that runs alone) (tiles_ptr's cubes;
    the selection's lists, KG wide); heads in order_ptr's order (descending work), tiles in cube order. The packed
    tiles come first: their unions make them the longer programs. One launch against one per kind (H200, session
    15): 0.5-15 % faster at 480p (no tail between launches, one launch fewer), within -1 / +6 % at 720p."""
    pid = gl.program_id(0)
    first_single = BH * n_packed
    is_packed = pid < first_single
    if is_packed:
        n_tiles = n_packed
        i = pid
    else:
        n_tiles = n_singles
        i = pid - first_single
    bh = (gl.load(order_ptr + (i // n_tiles) * N) // N).to(gl.int64)
    b = bh // H
    h = bh % H
    t = i % n_tiles
    if is_packed:
        tile = t
        work = bh * n_packed + t
        count = gl.load(ucount_ptr + work)
        table_ptr = uindex_ptr + work * KU
    else:
        tile = gl.load(tiles_ptr + t)
        work = bh * N + tile
        count = gl.load(count_ptr + work)
        table_ptr = index_ptr + work * KG
    n_steps = _step_count(count, N, CUBE, HAS_REMAINDER)

    q_smem = gl.allocate_shared_memory(k_desc.dtype, [CUBE, HEAD_DIM], TILE_LAYOUT)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES, CUBE, HEAD_DIM], TILE_LAYOUT)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES, CUBE, HEAD_DIM], TILE_LAYOUT)
    bias_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, 1, CUBE], bias_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)

    gl.warp_specialize(
        [(_compute_partition, (is_packed, Q, Out, Lse, q_smem, k_smem, v_smem, bias_smem, ready, empty, table_ptr,
                               count, n_steps, N, bh, b, h, tile, n_prefix, qk_scale, key_bias_ptr, members_ptr,
                               row_token_ptr, row_slot_ptr, row_member_ptr, GT, GH, GW, NH, NW, stride_qb, stride_qh,
                               stride_ql, stride_ob, stride_oh, stride_ol, HEAD_DIM, CUBE, CT, CH, CW, NUM_STAGES,
                               MEMBERS, Q_IN_REGISTERS)),
         (_loader_partition, (k_desc, v_desc, kbar_desc, vbar_desc, bias_desc, k_smem, v_smem, bias_smem, ready,
                              empty, table_ptr, log2n_ptr, attended_ptr, members_ptr, count, N, bh.to(gl.int32),
                              gl.where(is_packed, -1 - tile, tile), raster_grid, raster_rows, CUBE, NUM_STAGES,
                              MEMBERS, CT, CH, CW, KV_RASTER, HAS_REMAINDER))],
        [1], [_LOADER_REGISTERS])


def _dense_mask(kv_count: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
    """The selection as a [B, H, N, N] uint8 mask (what the packed tiles' unions are built from) where the caller
    brought none."""
    B, H, N, _ = kv_index.shape
    mask = torch.zeros(B, H, N, N + 1, dtype=torch.uint8, device=kv_index.device)
    mask.scatter_(-1, torch.where(kv_index >= 0, kv_index, N).long(), 1)  # -1 padding lands in the dropped column
    return mask[..., :N].contiguous()


def hopper_block_sparse_attention(q, k_cubes, v_cubes, layout, kv_count, kv_index, out, lse, n_prefix, scale, order,
                                  key_bias, log2_n, remainder, selection_mask=None):
    """Launch the Gluon kernel (where `hopper_path_reason` gave none): q, out raster [B, H, L, D] (unit
    stride on D), k_cubes / v_cubes [B, H, N, 64, D] contiguous in q's dtype, or K / V themselves in the raster
    [B, H, L, D] (rows from n_prefix on, strides `cube_tokens.cube_box_view` folds; `raster_kv_reason`), kv_count
    [B, H, N] / kv_index [B, H, N, K] int32, lse [B, H, N, 64] fp32 (padding slots' values unspecified), order the
    launch order, key_bias [N, 64] / log2_n [N] fp32, remainder None or (k_bar, v_bar) [B, H, N, D] contiguous in
    q's dtype, selection_mask None or the same selection as the lists as a [B, H, N, N] uint8 mask (the pooled
    keys' hiding and the packed tiles' unions read it; rebuilt from the lists where needed and not given)."""
    B, H, L, D = q.shape
    N = layout.num_cubes
    element = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    smem_layout = gl.NVMMASharedLayout.get_default_for([CUBE, D], element)
    pooled_layout = gl.NVMMASharedLayout.get_default_for([1, CUBE, D], element)
    kv_raster = k_cubes.dim() == 4
    if kv_raster:
        box = [1, *layout.cube_size, D]
        box_layout = gl.NVMMASharedLayout.get_default_for(box, element)
        (k_view, heads_a_row), (v_view, _) = (cube_box_view(x, layout, n_prefix) for x in (k_cubes, v_cubes))
        k_desc, v_desc = (TensorDescriptor.from_tensor(x, box, box_layout) for x in (k_view, v_view))
        raster_grid = layout.cubes_per_axis[2] | layout.cubes_per_axis[1] << 16
        raster_rows = layout.grid[0] | heads_a_row << 16
    else:
        k_desc, v_desc = (TensorDescriptor.from_tensor(x.view(-1, D), [CUBE, D], smem_layout)
                          for x in (k_cubes, v_cubes))
        raster_grid = raster_rows = 0
    bias_desc = TensorDescriptor.from_tensor(key_bias, [1, CUBE], gl.NVMMASharedLayout(0, 32))
    tiles = packed_tiles(layout)
    if remainder is None:
        kbar_desc, vbar_desc = k_desc, v_desc  # unused: no pooled steps
    else:  # per head: a head's last block reads zeros past its N rows, not the next head's
        kbar_desc, vbar_desc = (TensorDescriptor.from_tensor(x.view(B * H, -1, D), [1, CUBE, D], pooled_layout)
                                for x in remainder)
    attended = selection_mask
    if attended is None:
        attended = _dense_mask(kv_count, kv_index) if tiles.num_packed or remainder is not None else kv_count
    stages, registers, q_in_registers = _BUILD_BY_HEAD_DIM[D]
    P, NS = tiles.num_packed, tiles.singles.numel()
    if P:
        ucount, uindex = packed_union(attended, tiles.members, min(N, MAX_MEMBERS * kv_index.shape[-1]))
    else:
        ucount, uindex = kv_count, kv_index
    _hopper_block_sparse_fwd[(B * H * (P + NS),)](
        q, out, lse, k_desc, v_desc, kbar_desc, vbar_desc, bias_desc, key_bias, log2_n, attended, order,
        tiles.singles, tiles.members, tiles.row_token, tiles.row_slot, tiles.row_member, kv_count, kv_index, ucount,
        uindex, scale * 1.4426950408889634, H, N, B * H, NS, P, kv_index.shape[-1], uindex.shape[-1], raster_grid,
        raster_rows, n_prefix, *layout.grid, *layout.cubes_per_axis[1:], q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2), HEAD_DIM=D, CUBE=CUBE, CT=layout.cube_size[0],
        CH=layout.cube_size[1], CW=layout.cube_size[2], NUM_STAGES=stages, MEMBERS=MAX_MEMBERS,
        Q_IN_REGISTERS=q_in_registers, TILE_LAYOUT=smem_layout, KV_RASTER=kv_raster,
        HAS_REMAINDER=remainder is not None, num_warps=_NUM_WARPS, maxnreg=registers)
