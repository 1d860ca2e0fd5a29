"""Block-sparse flash-attention forward over BSA's kept queries and selected KV cubes.

K and V are in cube order (`cube_permute`): [B, H, N, S, D]. One program computes the kept queries of
GROUP consecutive query cubes of one (batch, head) against the union of their KV lists, a row seeing
only the KV cubes its own cube selected (per-row membership bits). GROUP packs enough cubes for a
64-row tile: 1 at keep_ratio 1, 2 at keep_ratio 0.5. Measured on an H200 (bench/kernel_variants.py,
bench/NOTES_speed.md), 64-row tiles with one KV cube per step beat 128-row tiles (two cubes, union or
per-pair lists) and two KV cubes per step at every density with Triton 3.6.

The loop is split by what it iterates, as in Triton's fused-attention tutorial: the selected cubes,
the extra keys (text / reference tokens every query attends), and the pooled keys (every cube a query
cube skipped, as its mean key with weight n_valid: the pooled remainder). Softmax runs in the log2
domain with the scale folded in (exp2), fp32 accumulators; rows that see no valid key give 0.

Queries come either from cube order (kept-query lists, keep_ratio < 1) or straight from the raster
[B, H, L, D] tensor through the cube -> token map (`raster`: every query kept, output written back
to the raster rows, so neither a Q permute nor an output scatter runs). On sm90 with Triton 3.6 the raster
path of 64-token cubes runs the Gluon kernel of `block_sparse_attention_hopper.py` instead (same contract:
`hopper_path_reason` says where it cannot), which can also read K and V from the raster (`raster_kv_reason`),
so that the call's permute only pools.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .cube_tokens import _cube_tokens, _grid_args, cube_box_view

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
log = logging.getLogger(__name__)

# num_warps x num_stages; block shapes follow the data. The autotuner's choice is cached on disk next to
# the compiled kernels (cache_results), so only the first run on a machine pays the timing runs.
_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3, 4)]


def shared_memory_budget(device: torch.device) -> int:
    """Bytes of shared memory one block may use on this device (227 KB on H100/H200, 163 KB on A100,
    99 KB on consumer Ampere/Ada/Blackwell cards). Configs over it are pruned before tuning."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


_device_facts_cache: dict = {}


def _device_facts(device: torch.device) -> tuple[int, int, int]:
    """(compute capability major, shared-memory budget, SM count) of a device, read once per process (the CPU,
    where the interpreter runs the kernel, has no budget and no SMs)."""
    if device.type != "cuda":
        return 0, 1 << 30, 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_facts_cache:
        _device_facts_cache[index] = (torch.cuda.get_device_capability(index)[0], shared_memory_budget(device),
                                      torch.cuda.get_device_properties(index).multi_processor_count)
    return _device_facts_cache[index]


HOPPER_TRITON = ("3.6",)  # Triton releases whose Gluon the Hopper kernel is built for: its API still moves
HOPPER_HEAD_DIMS = (64, 128)  # each with its own ring depth and register cap (_BUILD_BY_HEAD_DIM)


def hopper_path_reason(q: torch.Tensor, head_dim: int, cube_volume: int, group: int, has_extra: bool) -> str | None:
    """Why the Gluon Hopper kernel (`block_sparse_attention_hopper.py`) cannot run a raster call (None: it can).
    BSA_HOPPER_KERNEL=0 in the environment turns it off."""
    if os.environ.get("BSA_HOPPER_KERNEL", "1") == "0":
        return "BSA_HOPPER_KERNEL=0"
    if _INTERPRET or q.device.type != "cuda" or _device_facts(q.device)[0] != 9:
        return "not an sm90 GPU"
    if q.dtype not in (torch.float16, torch.bfloat16) or head_dim not in HOPPER_HEAD_DIMS:
        return f"{q.dtype} with head_dim {head_dim}"
    if cube_volume != 64 or group != 1 or has_extra:
        return "a cube volume other than 64, grouped cubes or extra keys"
    if not triton.__version__.startswith(HOPPER_TRITON):
        return f"Triton {triton.__version__}; the Gluon kernel is built for {', '.join(HOPPER_TRITON)}"
    return _hopper_module()[1]


def raster_kv_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, n_prefix: int = 0,
                     has_extra: bool = False) -> str | None:
    """Why the Gluon Hopper kernel cannot read this call's K and V straight from the raster [B, H, L, D], as 5-D
    TMA boxes of `cube_box_view` (None: it can, and the K/V permute is skipped): the kernel's own reasons, then
    strides the boxes cannot fold or that are not 16-byte multiples."""
    reason = hopper_path_reason(q, q.shape[-1], layout.cube_volume, 1, has_extra)
    if reason is not None:
        return reason
    if layout.num_cubes >= 1 << 20 or max(*layout.grid, *layout.cubes_per_axis, q.shape[1]) >= 1 << 16:
        return "a grid past the loader's packed 16-bit geometry"  # and its reciprocal divisions, exact below 2^20
    folds = []
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape or x.dtype != q.dtype or x.device != q.device:
            return f"{name} is not q's shape, dtype and device"
        element = x.element_size()
        folded = cube_box_view(x, layout, n_prefix)
        if folded is None or x.stride(-1) != 1:
            return f"{name}'s strides {x.stride()} fold into no 5-D view of the cubes"
        view, heads_a_row = folded
        if view.data_ptr() % 16 or any(stride * element % 16 for stride in view.stride()[:-1]):
            return f"{name} is not 16-byte aligned (tensor descriptors need it)"
        folds.append(heads_a_row)
    if folds[0] != folds[1]:  # the loader computes one box position for both
        return f"k's strides {k.stride()} and v's {v.stride()} fold into different 5-D views"
    return None


_hopper_failure: dict = {}  # "reason": why the Gluon kernel failed to build here (the portable kernel runs since)


def _hopper_module():
    """(the Gluon kernel's module, None) or (None, why it cannot be used in this process)."""
    if _hopper_failure:
        return None, _hopper_failure["reason"]
    return _import_hopper()


@functools.lru_cache(maxsize=1)
def _import_hopper():
    try:
        from . import block_sparse_attention_hopper as hopper
    except Exception as error:  # no Gluon in this Triton, or one whose API moved
        return None, f"its module did not import ({type(error).__name__}: {error})"
    return hopper, None


def _is_cuda_fault(error: Exception) -> bool:
    """A CUDA error (sticky, from this or an earlier launch), as opposed to a kernel that did not build."""
    return isinstance(error, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(error)


def _shared_memory(block_m: int, block_n: int, head_dim: int, stages: int) -> int:
    """Rough bytes of shared memory: the 16-bit Q tile plus `stages` buffered K and V tiles of block_n keys
    and the layout conversion Triton adds around the dots (one K-sized tile). The loops' buffers are not
    live at once, so a kernel needs the largest loop's."""
    return 2 * head_dim * (block_m + block_n * (2 * stages + 1))


def _key_block(cube_volume: int, head_dim: int, block_m: int, budget: int) -> int:
    """Keys per tile: the whole cube (rounded up to a power of 2) up to 128 keys, less where one
    unpipelined K/V tile pair would not fit the device's shared memory (consumer cards, big cubes)."""
    block_n = min(128, max(16, triton.next_power_of_2(cube_volume)))
    while block_n > 16 and _shared_memory(block_m, block_n, head_dim, 1) > budget:
        block_n //= 2
    return block_n


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose buffers exceed the device's shared memory; 8 warps only pay on 128-row tiles."""
    block_m, head_dim = kwargs["BLOCK_M"], kwargs["HEAD_DIM"]
    block_n = max(kwargs["BLOCK_N"], kwargs["POOL_BLOCK"] if kwargs["HAS_REMAINDER"] else 0)
    budget = named_args["smem_budget"]
    kept = [c for c in configs if block_m >= 128 or c.num_warps == 4]
    fits = [c for c in kept if c.num_stages > 1
            and _shared_memory(block_m, block_n, head_dim, c.num_stages) <= budget]
    kept = fits or [c for c in kept if c.num_stages == 1]
    return kept[:1] if _INTERPRET else kept


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    if DOT_F32:  # Triton's interpreter gets 16-bit tl.dot wrong (3.8): multiply upcast operands
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _softmax_update(acc, l_i, m_i, s, v, DOT_F32: tl.constexpr):
    """One online-softmax step over one key block (logits s in the log2 domain, values v)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen no valid key yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_F32)
    return acc, l_i, m_new


@triton.jit
def _selected_cubes(acc, l_i, m_i, q, K_bh, V_bh, K_desc, V_desc, desc_row0, idx_ptr, bits_ptr, key_bias_ptr,
                    count, row_cube, qk_scale, offs_n, offs_d, CUBE: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HAS_BITS: tl.constexpr, USE_TMA: tl.constexpr, DOT_F32: tl.constexpr):
    """Online softmax over the `count` KV cubes of the table, one cube per step in BLOCK_N-key pieces
    (a cube larger than the tile the device's shared memory holds takes several); key_bias masks padding
    slots. HAS_BITS: row r sees entry j only when bit row_cube[r] of bits_ptr[j] is set.
    USE_TMA: K/V tiles through tensor descriptors over [B*H*N*CUBE, HEAD_DIM], rows desc_row0 + kv * CUBE."""
    PIECES_PER_CUBE: tl.constexpr = (CUBE + BLOCK_N - 1) // BLOCK_N
    for step in range(0, count * PIECES_PER_CUBE):  # one flat loop: one set of pipeline buffers
        j = step // PIECES_PER_CUBE
        piece = step % PIECES_PER_CUBE
        kv = tl.load(idx_ptr + j).to(tl.int64)
        cols = piece * BLOCK_N + offs_n
        key_ok = cols < CUBE
        rows = kv * CUBE + cols
        if USE_TMA:
            k = K_desc.load([(desc_row0 + kv * CUBE + piece * BLOCK_N).to(tl.int32), 0])
        else:
            k = tl.load(K_bh + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), DOT_F32)
        s = s * qk_scale + tl.load(key_bias_ptr + rows, mask=key_ok, other=float("-inf"))[None, :]
        if HAS_BITS:
            member = ((tl.load(bits_ptr + j) >> row_cube) & 1) != 0
            s = tl.where(member[:, None], s, float("-inf"))
        if USE_TMA:
            v = V_desc.load([(desc_row0 + kv * CUBE + piece * BLOCK_N).to(tl.int32), 0])
        else:
            v = tl.load(V_bh + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, DOT_F32)
    return acc, l_i, m_i


@triton.jit
def _extra_keys(acc, l_i, m_i, q, KE_bh, VE_bh, n_keys, qk_scale, offs_n, offs_d,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_F32: tl.constexpr):
    """Online softmax over the n_keys extra keys every query attends (text, reference latents)."""
    for start in range(0, n_keys, BLOCK_N):
        rows = (start + offs_n).to(tl.int64)
        key_ok = rows < n_keys
        kv_off = rows[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(KE_bh + kv_off, mask=key_ok[:, None], other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), DOT_F32)
        s = s * qk_scale + tl.where(key_ok, 0.0, float("-inf"))[None, :]
        v = tl.load(VE_bh + kv_off, mask=key_ok[:, None], other=0.0)
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, DOT_F32)
    return acc, l_i, m_i


@triton.jit
def _pooled_keys(acc, l_i, m_i, q, KBar_bh, VBar_bh, log2n_ptr, attended_bh, n_cubes, row_cube, first_cube, qk_scale,
                 offs_n, offs_d, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ROW_MASKS: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """Online softmax over one pooled key per KV cube (mean key and value; log2 weight log2n_ptr[c]), hidden where the row's query cube attends that cube exactly (attended_bh
    [N, N] bytes). ROW_MASKS: rows of different query cubes read their own mask rows; else one mask row
    (first_cube's) serves all."""
    for start in range(0, n_cubes, BLOCK_N):
        cols = (start + offs_n).to(tl.int64)
        key_ok = cols < n_cubes
        kv_off = cols[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(KBar_bh + kv_off, mask=key_ok[:, None], other=0.0).to(q.dtype)
        s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), DOT_F32)
        s = s * qk_scale + tl.load(log2n_ptr + cols, mask=key_ok, other=float("-inf"))[None, :]
        if ROW_MASKS:
            hidden = tl.load(attended_bh + (first_cube + row_cube).to(tl.int64)[:, None] * n_cubes + cols[None, :],
                             mask=key_ok[None, :], other=0)
        else:
            hidden = tl.load(attended_bh + first_cube.to(tl.int64) * n_cubes + cols, mask=key_ok, other=0)[None, :]
        s = tl.where(hidden != 0, float("-inf"), s)
        v = tl.load(VBar_bh + kv_off, mask=key_ok[:, None], other=0.0).to(q.dtype)
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, DOT_F32)
    return acc, l_i, m_i


@triton.autotune(configs=_CONFIGS, key=["BLOCK_M", "BLOCK_N", "POOL_BLOCK", "HEAD_DIM", "GROUP", "USE_TMA",
                                        "HAS_REMAINDER", "RASTER", "smem_budget"],
                 prune_configs_by={"early_config_prune": _prune_configs}, cache_results=True)
@triton.jit
def _block_sparse_attn_fwd(Q, K, V, K_desc, V_desc, KE, VE, KBar, VBar, Log2N, Attended, Out, Lse, order_ptr,
                           q_index_ptr, grp_count_ptr, grp_index_ptr, grp_bits_ptr, key_bias_ptr, qk_scale,
                           H, N, KQ, NG, KG, E, n_prefix, GT, GH, GW, NH, NW,
                           stride_qb, stride_qh, stride_ql, stride_ob, stride_oh, stride_ol, smem_budget,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, POOL_BLOCK: tl.constexpr,
                           HEAD_DIM: tl.constexpr,
                           CUBE: tl.constexpr, CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
                           GROUP: tl.constexpr, PIECES: tl.constexpr, HAS_EXTRA: tl.constexpr,
                           HAS_REMAINDER: tl.constexpr, USE_TMA: tl.constexpr, RASTER: tl.constexpr,
                           STORE_LSE: tl.constexpr, DOT_F32: tl.constexpr):
    tl.static_assert(BLOCK_N >= 16 and BLOCK_M >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(not USE_TMA or CUBE % BLOCK_N == 0, "TMA loads whole pieces of a cube")
    tl.static_assert(GROUP <= 32, "membership bits are one int32 per table entry")
    tl.static_assert(PIECES == 1 or (RASTER and GROUP == 1), "a cube split over programs is a raster-mode cube")
    # order_ptr: heads by descending total work (long heads start first), each head's groups in cube order
    # (programs in flight share one head's KV cubes in L2); a cube split over PIECES programs keeps them adjacent
    pid = tl.program_id(0)
    work = tl.load(order_ptr + pid // PIECES).to(tl.int64)
    bh = work // NG
    grp = work % NG
    piece = pid % PIECES
    b = bh // H
    h = bh % H

    # row r of the tile: query r % rows_per_cube of cube grp * GROUP + r // rows_per_cube; in raster mode
    # a cube larger than the tile is split over PIECES programs (rows piece * BLOCK_M + r)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if RASTER:
        row_cube = offs_m // CUBE
        slot = piece * BLOCK_M + offs_m % CUBE
    else:
        row_cube = offs_m // KQ
        slot = offs_m % KQ
    cube = grp * GROUP + row_cube
    row_store = (row_cube < GROUP) & (cube < N)
    if RASTER:  # every query: slot -> raster token through the cube map
        token, valid = _cube_tokens(cube, slot, GT, GH, GW, NH, NW, CT, CH, CW)
        row_live = row_store & valid
        qi_off = (bh * N + cube) * KQ + slot  # the row's place in cube order (KQ = CUBE): where its LSE goes
        q_rows = (token + n_prefix).to(tl.int64)
        q = tl.load(Q + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_ql + offs_d[None, :],
                    mask=row_live[:, None], other=0.0)
    else:  # kept queries of cube-order Q [B, H, N, S, D]
        qi_off = (bh * N + cube) * KQ + slot
        q_slot = tl.load(q_index_ptr + qi_off, mask=row_store, other=-1)
        row_live = row_store & (q_slot >= 0)
        q = tl.load(Q + ((bh * N + cube) * CUBE + q_slot)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=row_live[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = qk_scale * 1.44269504  # log2(e): exp2 instead of exp
    row_cube = row_cube.to(tl.int32)

    kv_bh = bh * N * CUBE * HEAD_DIM
    table = (bh * NG + grp) * KG
    count = tl.load(grp_count_ptr + bh * NG + grp)
    acc, l_i, m_i = _selected_cubes(acc, l_i, m_i, q, K + kv_bh, V + kv_bh, K_desc, V_desc, bh * N * CUBE,
                                    grp_index_ptr + table, grp_bits_ptr + table, key_bias_ptr, count, row_cube,
                                    qk_scale, offs_n, offs_d, CUBE, BLOCK_N, HEAD_DIM, GROUP > 1, USE_TMA, DOT_F32)
    if HAS_EXTRA:
        acc, l_i, m_i = _extra_keys(acc, l_i, m_i, q, KE + bh * E * HEAD_DIM, VE + bh * E * HEAD_DIM, E, qk_scale,
                                    offs_n, offs_d, BLOCK_N, HEAD_DIM, DOT_F32)
    if HAS_REMAINDER:
        # every KV cube the row's cube did not select, as one pooled key: n * exp(q . k_bar) * v_bar
        acc, l_i, m_i = _pooled_keys(acc, l_i, m_i, q, KBar + bh * N * HEAD_DIM, VBar + bh * N * HEAD_DIM, Log2N,
                                     Attended + bh * N * N, N, tl.where(row_store, row_cube, 0), grp * GROUP,
                                     qk_scale, tl.arange(0, POOL_BLOCK), offs_d, POOL_BLOCK, HEAD_DIM, GROUP > 1,
                                     DOT_F32)

    # rows that saw no valid key (or are padding) write 0
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if RASTER:
        o_ptr = Out + b * stride_ob + h * stride_oh + q_rows[:, None] * stride_ol + offs_d[None, :]
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_live[:, None])
    else:
        tl.store(Out + qi_off[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_store[:, None])
    if STORE_LSE:  # log2-domain log-sum-exp per row, for the backward (-inf where nothing was seen)
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(Lse + qi_off, lse, mask=row_store)


def _group_table(kv_count: torch.Tensor, kv_index: torch.Tensor, group: int):
    """Union of the KV lists of `group` consecutive query cubes, with per-cube membership bits.

    kv_count [B,H,N], kv_index [B,H,N,K] ascending (-1 pad) -> (count [B,H,NG], index [B,H,NG,KG]
    ascending, bits [B,H,NG,KG] int32: bit g set when cube g of the group selected that KV cube).
    Cost O(B*H*N*K log) on the device: one short sort per group row, no O(N^2) table.
    """
    B, H, N, K = kv_index.shape
    if group == 1:
        return kv_count.contiguous(), kv_index.contiguous(), kv_index.new_zeros(1)
    if group == 2:
        return _pair_table(kv_index)
    NG = -(-N // group)
    pad = NG * group - N
    idx = kv_index.long()
    if pad:
        idx = torch.cat([idx, idx.new_full((B, H, pad, K), -1)], 2)
    sentinel = N * group + group  # sorts after every real key
    g = torch.arange(group, device=idx.device).view(1, 1, 1, group, 1)
    key = torch.where(idx >= 0, idx * group, sentinel).view(B, H, NG, group, K) + g
    key = torch.sort(key.view(B, H, NG, group * K), dim=-1).values
    cube = key // group
    bit = torch.where(key < sentinel, 1 << (key % group), 0)
    first = torch.ones_like(cube, dtype=torch.bool)
    first[..., 1:] = cube[..., 1:] != cube[..., :-1]
    first &= key < sentinel
    pos = torch.cumsum(first, -1) - 1
    count = first.sum(-1)
    KG = max(1, min(group * K, N))  # a static bound: no device -> host sync
    pos = torch.where(key < sentinel, pos, KG).clamp(max=KG)  # dump slot for padding
    index = torch.full((B, H, NG, KG + 1), -1, dtype=torch.long, device=idx.device)
    index.scatter_(-1, torch.where(first, pos, KG), torch.where(first, cube, -1))
    bits = torch.zeros((B, H, NG, KG + 1), dtype=torch.long, device=idx.device)
    bits.scatter_add_(-1, pos, bit)
    return (count.to(torch.int32).contiguous(), index[..., :KG].to(torch.int32).contiguous(),
            bits[..., :KG].to(torch.int32).contiguous())


def _pair_table(kv_index: torch.Tensor):
    """_group_table for 2 cubes without a sort: merge two ascending lists by rank (searchsorted).

    rank of x in the union = #(A < x) + #(B < x) - #(A and B < x); B's entries that are in A are dropped.
    """
    B, H, N, K = kv_index.shape
    idx = kv_index.int()
    if N % 2:
        idx = torch.cat([idx, idx.new_full((B, H, 1, K), -1)], 2)
    big = torch.iinfo(torch.int32).max
    idx = torch.where(idx >= 0, idx, big).view(B, H, -1, 2, K)
    a, b = idx[..., 0, :].contiguous(), idx[..., 1, :].contiguous()
    a_live, b_live = a != big, b != big
    pos_in_b = torch.searchsorted(b, a)  # #(B < a_i)
    pos_in_a = torch.searchsorted(a, b)  # #(A < b_j)
    a_in_b = (b.gather(-1, pos_in_b.clamp(max=K - 1)) == a) & a_live
    b_in_a = (a.gather(-1, pos_in_a.clamp(max=K - 1)) == b) & b_live
    i = torch.arange(K, device=idx.device)
    rank_a = i + pos_in_b - (torch.cumsum(a_in_b, -1) - a_in_b.long())
    rank_b = i + pos_in_a - (torch.cumsum(b_in_a, -1) - b_in_a.long())
    count = a_live.sum(-1) + b_live.sum(-1) - a_in_b.sum(-1)
    KG = max(1, min(2 * K, N))  # a static bound: no device -> host sync
    dump = KG  # padding and duplicates land past the end, then get cut
    rank_a = torch.where(a_live, rank_a, dump).clamp(max=dump)
    rank_b = torch.where(b_live & ~b_in_a, rank_b, dump).clamp(max=dump)
    index = torch.full((*a.shape[:-1], KG + 1), -1, dtype=torch.int32, device=idx.device)
    index.scatter_(-1, rank_a, torch.where(a_live, a, -1))
    index.scatter_(-1, rank_b, torch.where(b_live & ~b_in_a, b, -1))
    bits = torch.zeros((*a.shape[:-1], KG + 1), dtype=torch.int32, device=idx.device)
    bits.scatter_(-1, rank_a, torch.where(a_live, 1 + 2 * a_in_b.int(), 0))
    bits.scatter_(-1, rank_b, torch.where(b_live & ~b_in_a, 2, 0).int())
    index[..., dump] = -1
    return count.int().contiguous(), index[..., :KG].contiguous(), bits[..., :KG].contiguous()


class BlockSparsePlan(NamedTuple):
    """Launch tables derived from one selection: the grouped union table, its membership bits, the order."""
    group: int
    count: torch.Tensor     # [B, H, NG] int32
    index: torch.Tensor     # [B, H, NG, KG] int32 ascending, -1 pad
    bits: torch.Tensor      # [B, H, NG, KG] int32 membership bits (dummy when group == 1)
    order: torch.Tensor     # [B*H*NG] int32 launch order


def plan_block_sparse(kv_count: torch.Tensor, kv_index: torch.Tensor, cubes_per_program: int = 1) -> BlockSparsePlan:
    """Group `cubes_per_program` consecutive query cubes per program (union table + membership bits) and
    fix the launch order."""
    group = int(cubes_per_program)
    if not 1 <= group <= 32:
        raise ValueError(f"cubes_per_program must be in [1, 32], got {cubes_per_program}")
    count, index, bits = _group_table(kv_count, kv_index, group)
    return BlockSparsePlan(group, count, index, bits, _work_order(count))


def _work_order(grp_count: torch.Tensor) -> torch.Tensor:
    """Launch order of the (batch*head, group) programs as flat ids [B*H*NG] int32: heads by descending
    work (the last wave is short), cube order inside a head (neighbours share KV cubes in L2)."""
    flat = grp_count.reshape(-1, grp_count.shape[-1]).long()
    heads = torch.argsort(flat.sum(-1), descending=True)
    NG = flat.shape[-1]
    return (heads[:, None] * NG + torch.arange(NG, device=flat.device)).reshape(-1).to(torch.int32)


class _KeyTables(NamedTuple):
    key_bias: torch.Tensor  # [N, S] fp32: 0 on real key slots, -inf on padding
    log2_n: torch.Tensor    # [N] fp32: log2 of each cube's real key count (pooled key weight)
    slot_valid: torch.Tensor  # the mask they were built from: held, so its address cannot be reused by another


_key_tables_cache: dict = {}


def _key_tables(slot_valid: torch.Tensor) -> _KeyTables:
    """Per-layout constants, built once per (layout, device) instead of once per call."""
    key = (slot_valid.data_ptr(), tuple(slot_valid.shape), str(slot_valid.device))
    tables = _key_tables_cache.get(key)
    if tables is None:
        bias = torch.zeros(slot_valid.shape, dtype=torch.float32, device=slot_valid.device)
        bias.masked_fill_(~slot_valid, float("-inf"))
        tables = _KeyTables(bias, torch.log2(slot_valid.sum(-1).float()).contiguous(), slot_valid)
        if len(_key_tables_cache) > 64:
            _key_tables_cache.clear()
        _key_tables_cache[key] = tables
    return tables


HEAD_DIMS = (16, 32, 64, 128, 256)
POOL_BLOCK = 64  # pooled keys per step


def block_sparse_attention(q_cubes: torch.Tensor, k_cubes: torch.Tensor, v_cubes: torch.Tensor,
                           q_index: torch.Tensor, kv_count: torch.Tensor, kv_index: torch.Tensor,
                           slot_valid: torch.Tensor, scale: float | None = None,
                           k_extra: torch.Tensor | None = None, v_extra: torch.Tensor | None = None,
                           cubes_per_program: int | None = None, use_tma: bool | None = None,
                           plan: "BlockSparsePlan | None" = None, remainder: tuple | None = None,
                           pool_block: int | None = None, return_lse: bool = False):
    """Attention of each cube's kept queries over its selected KV cubes (+ every extra key).

    q_cubes, k_cubes, v_cubes: [B, H, N, S, D] cube order, fp16/bf16 (fp32 is computed in bf16).
    q_index [B, H, N, Kq] kept slots (-1 pad); kv_count [B, H, N]; kv_index [B, H, N, Kkv] ascending
    KV cube ids (-1 pad); slot_valid [N, S] bool (padding key slots are never attended).
    k_extra, v_extra: [B, H, E, D] keys every query attends (E may be 0), or None.
    cubes_per_program: query cubes per program (default: enough for a 64-row tile, at most 32).
    pool_block: pooled keys per online-softmax step (16..128, a power of 2; default POOL_BLOCK).
    use_tma: load K/V cubes through Hopper tensor descriptors (default: where it can run).
    plan: a `plan_block_sparse` result for this selection (built once per call site).
    remainder: (k_bar, v_bar, attended): k_bar, v_bar [B, H, N, D] mean key / value of every cube, attended
    [B, H, N, N] bool the same table as a dense mask. Each KV cube a query cube did not select joins its
    softmax as one key k_bar with weight n_valid and value v_bar (pooled remainder).
    Returns out_kept [B, H, N, Kq, D] in the input dtype (rows of -1 slots are 0), and with return_lse the
    log2-domain log-sum-exp of every kept row [B, H, N, Kq] fp32 (what the backward needs).
    """
    if q_cubes.dim() != 5:
        raise ValueError(f"q_cubes must be [B, H, N, S, D], got shape {tuple(q_cubes.shape)}")
    B, H, N, S, D = q_cubes.shape
    if q_index.dim() != 4 or q_index.shape[:3] != (B, H, N) or q_index.dtype != torch.int32:
        raise ValueError(f"q_index must be int32 [B, H, N, Kq] = [{B}, {H}, {N}, Kq], got {q_index.dtype} "
                         f"{tuple(q_index.shape)}")
    in_dtype = q_cubes.dtype
    if in_dtype == torch.float32:  # the MMA path is 16-bit: compute in bf16, return fp32
        q_cubes = q_cubes.to(torch.bfloat16)
    KQ = q_index.shape[-1]
    out = torch.empty(B, H, N, KQ, D, dtype=q_cubes.dtype, device=q_cubes.device)
    lse = torch.empty(B, H, N, KQ, dtype=torch.float32, device=q_cubes.device) if return_lse else None
    _launch(q_cubes, None, 0, out, k_cubes, v_cubes, q_index.contiguous(), KQ, kv_count, kv_index, slot_valid, scale,
            k_extra, v_extra, cubes_per_program, use_tma, plan, remainder, pool_block, None, lse, False)
    return (out.to(in_dtype), lse) if return_lse else out.to(in_dtype)


def block_sparse_attention_raster(q: torch.Tensor, k_cubes: torch.Tensor, v_cubes: torch.Tensor, layout,
                                  kv_count: torch.Tensor, kv_index: torch.Tensor, out: torch.Tensor,
                                  n_prefix: int = 0, scale: float | None = None,
                                  k_extra: torch.Tensor | None = None, v_extra: torch.Tensor | None = None,
                                  cubes_per_program: int | None = None, use_tma: bool | None = None,
                                  plan: "BlockSparsePlan | None" = None, remainder: tuple | None = None,
                                  pool_block: int | None = None, return_lse: bool = False,
                                  hopper_kernel: bool | None = None, selection_mask: torch.Tensor | None = None,
                                  kv_raster: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Every query kept (keep_ratio 1): Q rows are read from q [B, H, L, D] (raster video rows from
    n_prefix on, any strides) through `layout`'s cube map and written to the same rows of `out`
    [B, H, L, D] (any strides); other rows of `out` are left untouched. K/V tables as in
    block_sparse_attention. hopper_kernel: the Gluon kernel of `block_sparse_attention_hopper.py` (None: where
    `hopper_path_reason` allows; True: it or a ValueError; False: the portable kernel). selection_mask: the same
    selection as a [B, H, N, N] mask (`select_triton`'s), which the Gluon kernel's packed tiles take their list
    unions from where no remainder brings it (without it, it is rebuilt from the lists). kv_raster: (k, v) in q's
    raster layout instead of k_cubes / v_cubes (None), read by the Gluon kernel where `raster_kv_reason` allows
    (else a ValueError; should its build fail, K and V are permuted for the portable kernel). Returns out, and with
    return_lse the log2-domain log-sum-exp of every row in cube order [B, H, N, S] fp32 (slot order; a padding
    slot's is unspecified, the backward skips it), what the backward needs."""
    if q.dim() != 4 or out.shape != q.shape or out.dtype != q.dtype or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"q and out must be fp16/bf16 [B, H, L, D] of one shape and dtype, got {q.dtype} "
                         f"{tuple(q.shape)} and {out.dtype} {tuple(out.shape)}")
    if q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("q and out need a unit stride along head_dim")
    if n_prefix < 0 or n_prefix + layout.num_tokens > q.shape[2]:
        raise ValueError(f"n_prefix={n_prefix}: q has {q.shape[2]} rows, the grid needs {layout.num_tokens}")
    B, H = q.shape[:2]
    if kv_raster is not None:
        has_extra = k_extra is not None and k_extra.shape[-2] > 0
        reason = "hopper_kernel=False" if hopper_kernel is False else raster_kv_reason(q, *kv_raster, layout,
                                                                                        n_prefix, has_extra)
        if reason is not None:
            raise ValueError(f"kv_raster: the Gluon Hopper kernel cannot read K/V from the raster: {reason}")
    lse = (torch.empty(B, H, layout.num_cubes, layout.cube_volume, dtype=torch.float32, device=q.device)
           if return_lse else None)
    _launch(q, layout, n_prefix, out, k_cubes, v_cubes, None, layout.cube_volume, kv_count, kv_index,
            layout.slot_valid, scale, k_extra, v_extra, cubes_per_program, use_tma, plan, remainder, pool_block, layout,
            lse, hopper_kernel, selection_mask, kv_raster)
    return (out, lse) if return_lse else out


def _launch(q, layout, n_prefix, out, k_cubes, v_cubes, q_index, KQ, kv_count, kv_index, slot_valid, scale,
            k_extra, v_extra, cubes_per_program, use_tma, plan, remainder, pool_block, raster_layout, lse,
            hopper_kernel, selection_mask=None, kv_raster=None):
    """Validate the K/V side and the tables, build what the launch needs, launch."""
    if kv_raster is not None:  # checked by the caller (raster_kv_reason)
        B, H, N, S, D = *q.shape[:2], raster_layout.num_cubes, raster_layout.cube_volume, q.shape[-1]
    else:
        first = k_cubes if raster_layout is not None else q  # the shape every cube-order tensor must have
        if first.dim() != 5:
            raise ValueError(f"k_cubes must be [B, H, N, S, D], got shape {tuple(first.shape)}")
        B, H, N, S, D = first.shape
        for name, x in (("q_cubes", q), ("k_cubes", k_cubes), ("v_cubes", v_cubes))[int(raster_layout is not None):]:
            if x.shape != first.shape or x.device != first.device:
                raise ValueError(f"{name} must be [B, H, N, S, D] = {tuple(first.shape)} on {first.device}, "
                                 f"got {tuple(x.shape)} on {x.device}")
            if not x.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
    if raster_layout is not None and (q.shape[:2] != (B, H) or q.shape[3] != D):
        raise ValueError(f"q must be [{B}, {H}, L, {D}], got {tuple(q.shape)}")
    if D not in HEAD_DIMS:
        raise ValueError(f"k_cubes: head_dim must be one of {HEAD_DIMS}, got {D}")
    compute_dtype = q.dtype
    if kv_raster is None:
        k_cubes, v_cubes = (x.to(compute_dtype) for x in (k_cubes, v_cubes))
    if kv_count.shape != (B, H, N) or kv_index.dim() != 4 or kv_index.shape[:3] != (B, H, N):
        raise ValueError(f"kv_count/kv_index must be [B, H, N] / [B, H, N, K], got {tuple(kv_count.shape)}"
                         f" / {tuple(kv_index.shape)}")
    for name, x in (("kv_count", kv_count), ("kv_index", kv_index)):
        if x.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")
    if slot_valid.shape != (N, S):
        raise ValueError(f"slot_valid must be [N, S] = [{N}, {S}], got {tuple(slot_valid.shape)}")
    has_extra = k_extra is not None and k_extra.shape[-2] > 0
    if has_extra:
        if k_extra.shape != (B, H, k_extra.shape[2], D) or v_extra is None or v_extra.shape != k_extra.shape:
            raise ValueError(f"k_extra/v_extra must both be [B, H, E, D], got {tuple(k_extra.shape)}, "
                             f"{None if v_extra is None else tuple(v_extra.shape)}")
        k_extra, v_extra = (x.to(compute_dtype).contiguous() for x in (k_extra, v_extra))
    E = k_extra.shape[2] if has_extra else 0
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    if plan is None:
        group = cubes_per_program or min(32, max(1, 64 // max(KQ, 1)))  # rows of a 64-row tile
        plan = plan_block_sparse(kv_count, kv_index, group)
    elif cubes_per_program is not None and cubes_per_program != plan.group:
        raise ValueError(f"plan was made for {plan.group} cubes per program, not {cubes_per_program}")
    NG, KG = plan.count.shape[-1], plan.index.shape[-1]
    tables = _key_tables(slot_valid.to(q.device))

    if remainder is not None:
        k_bar, v_bar, selection_mask = remainder  # the remainder's mask is the selection's
        if k_bar.shape != (B, H, N, D) or v_bar.shape != (B, H, N, D) or selection_mask.shape != (B, H, N, N):
            raise ValueError(f"remainder must be (k_bar, v_bar, attended) of shapes [B, H, N, D] x 2 and "
                             f"[B, H, N, N] (B={B}, H={H}, N={N}, D={D}), got "
                             f"{[tuple(x.shape) for x in remainder]}")
        k_bar, v_bar = (x.to(compute_dtype).contiguous() for x in (k_bar, v_bar))
    else:
        k_bar = v_bar = k_cubes
        if selection_mask is not None and selection_mask.shape != (B, H, N, N):
            raise ValueError(f"selection_mask must be [B, H, N, N] = {(B, H, N, N)}, got {tuple(selection_mask.shape)}")
    if selection_mask is not None:
        selection_mask = selection_mask.to(torch.bool).contiguous().view(torch.uint8)
    attended = selection_mask if remainder is not None else k_cubes  # the portable kernel reads it with a remainder

    hopper_reason = (hopper_path_reason(q, D, S, plan.group, has_extra) if raster_layout is not None
                     else "kept-query lists (keep_ratio < 1)")
    tma_bases = ((k_cubes, v_cubes) if kv_raster is None else ()) + ((k_bar, v_bar) if remainder is not None else ())
    if hopper_reason is None and any(x.data_ptr() % 16 for x in tma_bases):
        hopper_reason = "K/V not 16-byte aligned (tensor descriptors need it)"
    if hopper_kernel and hopper_reason:
        raise ValueError(f"hopper_kernel=True, but the Gluon Hopper kernel cannot run this call: {hopper_reason}")
    if hopper_kernel is not False and hopper_reason is None:
        hopper_lse = lse if lse is not None else torch.empty(B, H, N, S, dtype=torch.float32, device=q.device)
        try:
            _hopper_module()[0].hopper_block_sparse_attention(
                q, *(kv_raster or (k_cubes, v_cubes)), raster_layout, plan.count, plan.index, out, hopper_lse,
                n_prefix, scale, plan.order, tables.key_bias, tables.log2_n,
                (k_bar, v_bar) if remainder is not None else None, selection_mask)
            return
        except Exception as error:  # a Gluon build this Triton, driver or platform cannot do
            if hopper_kernel or _is_cuda_fault(error):
                raise
            _hopper_failure["reason"] = f"its build failed ({type(error).__name__}: {error})"
            log.warning("BSA: the Gluon Hopper attention kernel failed to build, the portable Triton kernel runs "
                        "from now on: %s: %s", type(error).__name__, error)
    if kv_raster is not None:  # the Gluon kernel did not run: the portable one reads K/V in cube order
        from .cube_permute import cube_permute

        k_cubes, v_cubes = (cube_permute(x, raster_layout, n_prefix) for x in kv_raster)
        if remainder is None:
            k_bar = v_bar = attended = k_cubes

    rows = plan.group * KQ
    # raster mode splits a cube of more than 64 queries over programs: 64-row tiles measured fastest
    pieces = -(-rows // 64) if raster_layout is not None and plan.group == 1 and rows > 64 else 1
    BLOCK_M = max(16, triton.next_power_of_2(-(-rows // pieces)))
    major, budget, _ = _device_facts(q.device)
    BLOCK_N = _key_block(S, D, BLOCK_M, budget)
    pow2 = S == triton.next_power_of_2(S) and S >= 16
    on_hopper = not _INTERPRET and major >= 9
    if use_tma is None:
        use_tma = pow2 and on_hopper
    if use_tma and not (pow2 and on_hopper):
        raise ValueError("use_tma needs a Hopper+ GPU and a power-of-2 cube volume >= 16")
    pool_block = POOL_BLOCK if pool_block is None else int(pool_block)
    if pool_block not in (16, 32, 64, 128):
        raise ValueError(f"pool_block must be 16, 32, 64 or 128, got {pool_block}")
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        k_desc = TensorDescriptor.from_tensor(k_cubes.view(-1, D), [BLOCK_N, D])
        v_desc = TensorDescriptor.from_tensor(v_cubes.view(-1, D), [BLOCK_N, D])
    else:
        k_desc, v_desc = k_cubes, v_cubes
    grid_args = _grid_args(raster_layout) if raster_layout is not None else (1, 1, 1, 1, 1)
    cube = raster_layout.cube_size if raster_layout is not None else (1, 1, S)
    q_strides = (q.stride(0), q.stride(1), q.stride(2)) if raster_layout is not None else (0, 0, 0)
    o_strides = (out.stride(0), out.stride(1), out.stride(2)) if raster_layout is not None else (0, 0, 0)
    _block_sparse_attn_fwd[(B * H * NG * pieces,)](
        q, k_cubes, v_cubes, k_desc, v_desc, k_extra if has_extra else k_cubes, v_extra if has_extra else v_cubes,
        k_bar, v_bar, tables.log2_n, attended, out, out if lse is None else lse, plan.order,
        q_index if q_index is not None else plan.count, plan.count, plan.index, plan.bits, tables.key_bias, scale,
        H, N, KQ, NG, KG, E, n_prefix, *grid_args, *q_strides, *o_strides, budget,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, POOL_BLOCK=pool_block, HEAD_DIM=D, CUBE=S, CT=cube[0], CH=cube[1], CW=cube[2], GROUP=plan.group,
        PIECES=pieces, HAS_EXTRA=has_extra,
        HAS_REMAINDER=remainder is not None, USE_TMA=bool(use_tma), RASTER=raster_layout is not None,
        STORE_LSE=lse is not None, DOT_F32=_INTERPRET)
