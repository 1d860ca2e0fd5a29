"""Block-sparse flash-attention forward over BSA's kept queries and selected KV cubes.

Inputs are in cube order (`CubeLayout.to_cubes`): q, k, v [B, H, N, S, D]. One program computes the
kept queries of GROUP consecutive query cubes of one (batch, head) against the union of their KV
lists; a query row only sees the KV cubes its own cube selected (per-row membership bits), so the
result is exact. Packing GROUP cubes turns 32 kept queries (64-token cube, r = 0.5) into an M = 64/128
MMA tile; the union costs extra MMA work where neighbouring cubes select different KV cubes.
Every query also attends the optional extra keys (text / reference tokens) [B, H, E, D].

Softmax runs in the log2 domain with the scale folded in (exp2), fp32 accumulators; rows that see no
valid key give 0. Launch order: heads by descending work (long rows start first), cube order inside a
head (programs in flight share one head's KV cubes, which then stay in L2).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# num_warps x num_stages; block shapes follow the data (kept queries per cube, cube volume). One stage is
# only for tiles whose pipelined K/V buffers do not fit shared memory (256-token cubes at head_dim 128).
# The autotuner's choice is cached on disk next to the compiled kernels (cache_results), so only the
# first ComfyUI run on a machine pays the timing runs.
_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3, 4)]
_SHARED_MEMORY_BUDGET = 227 * 1024  # bytes per block on H100; a config over it cannot launch (the autotuner
# also skips any config that still runs out, but it fails when every config does)


def _shared_memory(block_m: int, block_n: int, head_dim: int, stages: int) -> int:
    """Rough bytes of shared memory: 16-bit Q tile plus `stages` buffered K and V tiles."""
    return 2 * head_dim * (block_m + 2 * block_n * stages)


def _prune_configs(configs, named_args, **kwargs):
    # 8 warps only pay off on an M = 128 tile; the interpreter runs one config (it times nothing)
    block_m, block_n, head_dim = kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["HEAD_DIM"]
    kept = [c for c in configs if block_m >= 128 or c.num_warps == 4]
    fits = [c for c in kept if c.num_stages > 1 and _shared_memory(block_m, block_n, head_dim, c.num_stages)
            <= _SHARED_MEMORY_BUDGET]
    kept = fits or [c for c in kept if c.num_stages == 1]
    return kept[:1] if _INTERPRET else kept


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, K_desc, V_desc, row_base, idx_ptr, bits_ptr, bias_ptr, count,
                    row_cube, qk_scale, offs_n, offs_d, n_keys,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CUBE: tl.constexpr, KV_PER_ITER: tl.constexpr,
                    SPARSE: tl.constexpr, HAS_BITS: tl.constexpr, EVEN_N: tl.constexpr, USE_TMA: tl.constexpr,
                    DOT_F32: tl.constexpr, POOLED: tl.constexpr = False):
    """Online softmax over KV blocks; returns the running (acc, l_i, m_i).

    SPARSE: one step covers KV_PER_ITER table entries; entry j is KV cube idx_ptr[j] (CUBE tokens, key
    bias from bias_ptr masks padding slots), and with HAS_BITS row r only sees it when bit row_cube[r]
    of bits_ptr[j] is set. Otherwise: step j is extra keys [j * BLOCK_N, (j + 1) * BLOCK_N) of n_keys,
    seen by every row; with POOLED they are the n_keys pooled cube keys instead, key c with log2 bias
    bias_ptr[c], hidden from row r where bits_ptr[row_cube[r] * n_keys + c] is set (cubes the row's query
    cube attends exactly; without HAS_BITS every row of the tile is one cube's and one mask row is read).
    USE_TMA (sparse, one cube per step): K/V tiles come through tensor descriptors over
    [B*H*N*CUBE, HEAD_DIM], rows row_base + kv * CUBE.
    """
    if SPARSE:
        n_steps = tl.cdiv(count, KV_PER_ITER)
    else:
        n_steps = count
    for j in range(0, n_steps):
        if SPARSE:
            if KV_PER_ITER == 1:
                kv = tl.load(idx_ptr + j).to(tl.int64)
                rows = kv * CUBE + offs_n
                if EVEN_N:
                    col_bias = tl.load(bias_ptr + rows)
                else:
                    col_bias = tl.load(bias_ptr + rows, mask=offs_n < CUBE, other=float("-inf"))
                key_ok = offs_n < CUBE
            else:
                # column c belongs to table entry j * KV_PER_ITER + c // CUBE (a missing last one is masked)
                entry = j * KV_PER_ITER + offs_n // CUBE
                key_ok = entry < count
                kv = tl.load(idx_ptr + entry, mask=key_ok, other=0).to(tl.int64)
                rows = kv * CUBE + offs_n % CUBE
                col_bias = tl.load(bias_ptr + rows) + tl.where(key_ok, 0.0, float("-inf"))
        else:
            rows = (j * BLOCK_N + offs_n).to(tl.int64)
            key_ok = rows < n_keys
            if POOLED:
                col_bias = tl.load(bias_ptr + rows, mask=key_ok, other=float("-inf"))
            else:
                col_bias = tl.where(key_ok, 0.0, float("-inf"))
        kv_off = rows[:, None] * HEAD_DIM + offs_d[None, :]
        if USE_TMA:
            k = K_desc.load([(row_base + kv * CUBE).to(tl.int32), 0])
        elif SPARSE and EVEN_N:
            k = tl.load(K_bh + kv_off)
        else:
            k = tl.load(K_bh + kv_off, mask=key_ok[:, None], other=0.0)
        if DOT_F32:  # Triton's interpreter gets bf16 tl.dot wrong (3.8): multiply upcast operands
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            qk = tl.dot(q, tl.trans(k))
        s = qk * qk_scale + col_bias[None, :]
        if HAS_BITS:
            if SPARSE:
                if KV_PER_ITER == 1:
                    bits = tl.load(bits_ptr + j)
                    s = tl.where((((bits >> row_cube) & 1) != 0)[:, None], s, float("-inf"))
                else:
                    bits = tl.load(bits_ptr + entry, mask=key_ok, other=0)
                    s = tl.where(((bits[None, :] >> row_cube[:, None]) & 1) != 0, s, float("-inf"))
        if POOLED:
            if HAS_BITS:  # several query cubes in the tile: each row reads its own cube's mask row
                attended = tl.load(bits_ptr + row_cube.to(tl.int64)[:, None] * n_keys + rows[None, :],
                                   mask=key_ok[None, :], other=0)
            else:  # one query cube: one mask row for the whole tile
                attended = tl.load(bits_ptr + tl.max(row_cube, 0).to(tl.int64) * n_keys + rows,
                                   mask=key_ok, other=0)[None, :]
            s = tl.where(attended != 0, float("-inf"), s)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no valid key yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = V_desc.load([(row_base + kv * CUBE).to(tl.int32), 0])
        elif SPARSE and EVEN_N:
            v = tl.load(V_bh + kv_off)
        else:
            v = tl.load(V_bh + kv_off, mask=key_ok[:, None], other=0.0)
        if DOT_F32:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_CONFIGS, key=["BLOCK_M", "BLOCK_N", "HEAD_DIM", "GROUP", "KV_PER_ITER", "USE_TMA",
                                        "HAS_REMAINDER"],
                 prune_configs_by={"early_config_prune": _prune_configs}, cache_results=True)
@triton.jit
def _block_sparse_attn_fwd(Q, K, V, K_desc, V_desc, KE, VE, KBar, VBar, Log2N, Attended, Out, Lse, order_ptr,
                           q_index_ptr, grp_count_ptr, grp_index_ptr, grp_bits_ptr, key_bias_ptr, qk_scale,
                           H, N, KQ, NG, KG, E,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                           CUBE: tl.constexpr, GROUP: tl.constexpr, KV_PER_ITER: tl.constexpr,
                           HAS_EXTRA: tl.constexpr, HAS_REMAINDER: tl.constexpr, USE_TMA: tl.constexpr,
                           DOT_F32: tl.constexpr):
    tl.static_assert(BLOCK_N >= CUBE * KV_PER_ITER, "KV_PER_ITER cubes must fit one key block")
    tl.static_assert(not USE_TMA or (KV_PER_ITER == 1 and BLOCK_N == CUBE), "TMA loads one whole cube per step")
    tl.static_assert(KV_PER_ITER == 1 or BLOCK_N == CUBE * KV_PER_ITER, "packed cubes need a power-of-2 volume")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(GROUP <= 32, "membership bits are one int32 per block")
    # order_ptr: heads by descending total work, each head's groups in cube order (shared KV stays in L2)
    work = tl.load(order_ptr + tl.program_id(0)).to(tl.int64)
    bh = work // NG
    grp = work % NG

    # query rows: row r is kept query r % KQ of cube grp * GROUP + r // KQ
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_cube = offs_m // KQ
    cube = grp * GROUP + row_cube
    row_live = (row_cube < GROUP) & (cube < N)
    row_store = row_live
    qi_off = (bh * N + cube) * KQ + offs_m % KQ
    slot = tl.load(q_index_ptr + qi_off, mask=row_live, other=-1)
    row_live = row_live & (slot >= 0)
    q_off = ((bh * N + cube) * CUBE + slot)[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_live[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = qk_scale * 1.44269504  # log2(e): exp2 instead of exp

    kv_bh = bh * N * CUBE * HEAD_DIM
    table = (bh * NG + grp) * KG
    count = tl.load(grp_count_ptr + bh * NG + grp)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K + kv_bh, V + kv_bh, K_desc, V_desc, bh * N * CUBE,
                                    grp_index_ptr + table, grp_bits_ptr + table, key_bias_ptr, count,
                                    row_cube.to(tl.int32), qk_scale, offs_n, offs_d, 0, BLOCK_N, HEAD_DIM, CUBE,
                                    KV_PER_ITER, True, GROUP > 1, BLOCK_N == CUBE * KV_PER_ITER, USE_TMA, DOT_F32)
    if HAS_EXTRA:
        ext_bh = bh * E * HEAD_DIM
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, KE + ext_bh, VE + ext_bh, K_desc, V_desc, 0,
                                        grp_index_ptr, grp_bits_ptr, key_bias_ptr, tl.cdiv(E, BLOCK_N),
                                        row_cube.to(tl.int32), qk_scale, offs_n, offs_d, E, BLOCK_N, HEAD_DIM,
                                        CUBE, 1, False, False, False, False, DOT_F32)
    if HAS_REMAINDER:
        # every KV cube the row's cube did not select, as one pooled key: n * exp(q . k_bar) * v_bar
        pooled_bh = bh * N * HEAD_DIM
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, KBar + pooled_bh, VBar + pooled_bh, K_desc, V_desc, 0,
                                        grp_index_ptr, Attended + bh * N * N, Log2N, tl.cdiv(N, BLOCK_N),
                                        tl.where(row_store, cube, 0).to(tl.int32), qk_scale, offs_n, offs_d, N,
                                        BLOCK_N, HEAD_DIM, CUBE, 1, False, GROUP > 1, False, False, DOT_F32, True)

    # rows that saw no valid key (or are padding) write 0 and LSE -inf
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    o_off = qi_off[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(Out + o_off, out.to(Out.dtype.element_ty), mask=row_store[:, None])
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


class BlockSparsePlan(NamedTuple):
    """Launch tables derived from one selection: grouped union table, launch order, key bias."""
    group: int
    count: torch.Tensor     # [B, H, NG] int32
    index: torch.Tensor     # [B, H, NG, KG] int32 ascending, -1 pad
    bits: torch.Tensor      # [B, H, NG, KG] int32 membership bits (dummy when group == 1)
    order: torch.Tensor     # [B*H*NG] int32 launch order
    key_bias: torch.Tensor  # [N, S] fp32: 0 on real key slots, -inf on padding


def plan_block_sparse(kv_count: torch.Tensor, kv_index: torch.Tensor, slot_valid: torch.Tensor,
                      cubes_per_program: int = 2, schedule: str = "head") -> BlockSparsePlan:
    """Group `cubes_per_program` consecutive query cubes per program and fix the launch order."""
    group = int(cubes_per_program)
    if not 1 <= group <= 32:
        raise ValueError(f"cubes_per_program must be in [1, 32], got {cubes_per_program}")
    count, index, bits = _group_table(kv_count, kv_index, group)
    key_bias = torch.zeros(slot_valid.shape, dtype=torch.float32, device=kv_count.device)
    key_bias.masked_fill_(~slot_valid.to(kv_count.device), float("-inf"))
    return BlockSparsePlan(group, count, index, bits, _work_order(count, schedule), key_bias)


def _work_order(grp_count: torch.Tensor, schedule: str) -> torch.Tensor:
    """Launch order of the (batch*head, group) programs, as flat ids [B*H*NG] int32."""
    flat = grp_count.reshape(-1, grp_count.shape[-1]).long()
    if schedule == "lpt":
        return torch.argsort(flat.reshape(-1), descending=True).to(torch.int32)
    if schedule != "head":
        raise ValueError(f"schedule must be 'head' or 'lpt', got {schedule!r}")
    heads = torch.argsort(flat.sum(-1), descending=True)
    NG = flat.shape[-1]
    return (heads[:, None] * NG + torch.arange(NG, device=flat.device)).reshape(-1).to(torch.int32)


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


def block_sparse_attention(q_cubes: torch.Tensor, k_cubes: torch.Tensor, v_cubes: torch.Tensor,
                           q_index: torch.Tensor, kv_count: torch.Tensor, kv_index: torch.Tensor,
                           slot_valid: torch.Tensor, scale: float | None = None,
                           k_extra: torch.Tensor | None = None, v_extra: torch.Tensor | None = None,
                           cubes_per_program: int | None = None, kv_per_iter: int | None = None,
                           schedule: str = "head", use_tma: bool | None = None, plan: "BlockSparsePlan | None" = None,
                           return_lse: bool = False, remainder: tuple | None = None):
    """Attention of each cube's kept queries over its selected KV cubes (+ every extra key).

    q_cubes, k_cubes, v_cubes: [B, H, N, S, D] cube order, fp16/bf16 (fp32 is computed in bf16).
    q_index [B, H, N, Kq] kept slots (-1 pad); kv_count [B, H, N]; kv_index [B, H, N, Kkv] ascending
    KV cube ids (-1 pad); slot_valid [N, S] bool (padding key slots are never attended).
    k_extra, v_extra: [B, H, E, D] keys every query attends (E may be 0), or None.
    cubes_per_program: query cubes packed into one program (default: enough for a 64-row tile).
    kv_per_iter: KV cubes per inner step (1 or 2; default 1 where TMA runs, else 2 for one cube per program
    with a power-of-2 volume <= 64: measured on H100 at keep_ratio 1, one 64-key cube per step through TMA
    ran 340-352 TFLOP/s against 245-253 for two cubes per step without it).
    schedule: "head" (heads by descending work, cube order inside a head: neighbours share KV in L2)
    or "lpt" (all programs by descending work).
    use_tma: load K/V cubes through Hopper tensor descriptors (one cube per step); default: on where
    it can run (sm90+, compiled, kv_per_iter 1 or unset, power-of-2 cube volume).
    plan: a `plan_block_sparse` result for this selection, to build the grouped table once per call
    site instead of once per launch.
    remainder: (k_bar, v_bar, attended): k_bar, v_bar [B, H, N, D] mean key / value of every cube, attended
    [B, H, N, N] bool the same table as a dense mask (`BSASelection.to_dense`, O(cubes^2) per head). Each KV
    cube a query cube did not select joins its softmax as one key k_bar with weight n_valid and value
    v_bar (pooled remainder).
    Returns out_kept [B, H, N, Kq, D] in the input dtype (rows of -1 slots are 0), and with
    return_lse the log2-domain LSE [B, H, N, Kq] fp32.
    """
    if q_cubes.dim() != 5:
        raise ValueError(f"q_cubes must be [B, H, N, S, D], got shape {tuple(q_cubes.shape)}")
    B, H, N, S, D = q_cubes.shape
    for name, x in (("k_cubes", k_cubes), ("v_cubes", v_cubes)):
        if x.shape != q_cubes.shape or x.dtype != q_cubes.dtype or x.device != q_cubes.device:
            raise ValueError(f"{name} must match q_cubes ({tuple(q_cubes.shape)}, {q_cubes.dtype}), "
                             f"got {tuple(x.shape)}, {x.dtype}")
    if q_cubes.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q_cubes: dtype must be float16, bfloat16 or float32, got {q_cubes.dtype}")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"q_cubes: head_dim must be one of 16, 32, 64, 128, 256, got {D}")
    if q_index.dim() != 4 or q_index.shape[:3] != (B, H, N):
        raise ValueError(f"q_index must be [B, H, N, Kq] = [{B}, {H}, {N}, Kq], got {tuple(q_index.shape)}")
    if kv_count.shape != (B, H, N) or kv_index.dim() != 4 or kv_index.shape[:3] != (B, H, N):
        raise ValueError(f"kv_count/kv_index must be [B, H, N] / [B, H, N, K], got {tuple(kv_count.shape)}"
                         f" / {tuple(kv_index.shape)}")
    if slot_valid.shape != (N, S):
        raise ValueError(f"slot_valid must be [N, S] = [{N}, {S}], got {tuple(slot_valid.shape)}")
    for name, x in (("q_index", q_index), ("kv_count", kv_count), ("kv_index", kv_index)):
        if x.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")
    has_extra = k_extra is not None and k_extra.shape[-2] > 0
    if has_extra and (k_extra.shape != (B, H, k_extra.shape[2], D) or v_extra is None
                      or v_extra.shape != k_extra.shape):
        raise ValueError(f"k_extra/v_extra must both be [B, H, E, D], got {tuple(k_extra.shape)}, "
                         f"{None if v_extra is None else tuple(v_extra.shape)}")
    tensors = [q_cubes, k_cubes, v_cubes] + ([k_extra, v_extra] if has_extra else [])
    for name, x in zip(("q_cubes", "k_cubes", "v_cubes", "k_extra", "v_extra"), tensors):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    in_dtype = q_cubes.dtype
    if in_dtype == torch.float32:  # the MMA path is 16-bit: compute in bf16, return fp32
        tensors = [x.to(torch.bfloat16) for x in tensors]
    q, k, v = tensors[:3]
    ke, ve = (tensors[3], tensors[4]) if has_extra else (q, q)
    E = k_extra.shape[2] if has_extra else 0
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    KQ = q_index.shape[-1]
    if plan is None:
        plan = plan_block_sparse(kv_count, kv_index, slot_valid, min(32, max(1, 64 // max(KQ, 1))) if cubes_per_program
                                 is None else cubes_per_program, schedule)
    elif cubes_per_program is not None and cubes_per_program != plan.group:
        raise ValueError(f"plan was made for {plan.group} cubes per program, not {cubes_per_program}")
    group = plan.group
    NG, KG = plan.count.shape[-1], plan.index.shape[-1]

    if remainder is not None:
        k_bar, v_bar, attended = remainder
        if k_bar.shape != (B, H, N, D) or v_bar.shape != (B, H, N, D) or attended.shape != (B, H, N, N):
            raise ValueError(f"remainder must be (k_bar, v_bar, attended) of shapes [B, H, N, D] x 2 and "
                             f"[B, H, N, N] (B={B}, H={H}, N={N}, D={D}), got "
                             f"{[tuple(x.shape) for x in remainder]}")
        k_bar, v_bar = (x.to(q.dtype).contiguous() for x in (k_bar, v_bar))
        attended = attended.to(torch.bool).contiguous().view(torch.uint8)
        log2_n = torch.log2(slot_valid.to(q.device).sum(-1).float()).contiguous()
    else:
        k_bar = v_bar = log2_n = attended = q

    out = torch.empty(B, H, N, KQ, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, KQ, dtype=torch.float32, device=q.device)
    BLOCK_M = max(16, triton.next_power_of_2(group * KQ))
    pow2 = S == triton.next_power_of_2(S) and S >= 16
    if use_tma is None:
        use_tma = (kv_per_iter in (None, 1) and pow2 and not _INTERPRET and q.is_cuda
                   and torch.cuda.get_device_capability(q.device)[0] >= 9)
    if kv_per_iter is None:
        kv_per_iter = 2 if pow2 and S <= 64 and group == 1 and not use_tma else 1
    if kv_per_iter not in (1, 2) or (kv_per_iter == 2 and not pow2):
        raise ValueError(f"kv_per_iter must be 1, or 2 with a power-of-2 cube volume >= 16, got {kv_per_iter}")
    if use_tma and (kv_per_iter != 1 or not pow2 or _INTERPRET or torch.cuda.get_device_capability(q.device)[0] < 9):
        raise ValueError("use_tma needs a Hopper+ GPU, kv_per_iter=1 and a power-of-2 cube volume")
    BLOCK_N = max(16, triton.next_power_of_2(S)) * kv_per_iter
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        k_desc = TensorDescriptor.from_tensor(k.view(-1, D), [S, D])
        v_desc = TensorDescriptor.from_tensor(v.view(-1, D), [S, D])
    else:
        k_desc, v_desc = k, v
    grid = (B * H * NG,)
    _block_sparse_attn_fwd[grid](q, k, v, k_desc, v_desc, ke, ve, k_bar, v_bar, log2_n, attended, out, lse,
                                 plan.order, q_index.contiguous(), plan.count, plan.index, plan.bits, plan.key_bias,
                                 scale, H, N, KQ, NG, KG, E,
                                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=D, CUBE=S, GROUP=group,
                                 KV_PER_ITER=kv_per_iter, HAS_EXTRA=has_extra, HAS_REMAINDER=remainder is not None,
                                 USE_TMA=bool(use_tma), DOT_F32=_INTERPRET)
    out = out.to(in_dtype)
    return (out, lse) if return_lse else out


def scatter_kept(out_kept: torch.Tensor, q_source: torch.Tensor, slot_valid: torch.Tensor) -> torch.Tensor:
    """[B,H,N,Kq,D] kept outputs -> [B,H,N,S,D]: every slot copies its source (padding slots 0).
    Torch gather stand-in until the fused scatter kernel lands."""
    B, H, N, _, D = out_kept.shape
    S = q_source.shape[-1]
    src = q_source.clamp(min=0).long()[..., None].expand(B, H, N, S, D)
    return out_kept.gather(-2, src) * slot_valid.to(out_kept.device)[..., None].to(out_kept.dtype)
