"""Backward of the block-sparse attention forward (`block_sparse_attention`, cube order).

Given the forward's kept-query rows (q_index), their outputs O, the upstream gradient dO and the forward's
log2-domain LSE, three kernels give every gradient of the one softmax each row ran over its selected KV
cubes, the extra keys and the pooled keys:

  dq   one program per (batch*head, query cube): the forward's three loops again, dQ += dS K;
  dkdv one program per (batch*head, KV cube): the query cubes that selected it (the transposed table),
       dV += P^T dO, dK += dS^T Q;
  dense-key programs per (batch*head, block of keys) over every query cube: the extra keys (seen by every
       row) and the pooled keys (seen by the rows whose cube skipped that cube).

P = exp2(S * log2e * scale + bias - LSE) is recomputed, dS = P * (dO . V - delta) with delta = rowsum(dO * O),
as in Triton's fused-attention tutorial (whose dK/dV loop forms S^T = K Q^T instead: measured slower here,
dK/dV 5.9 -> 8.2 ms at Wan 480p on an H200). Accumulators are fp32; gradients come back in fp32 (dK/dV of the
selected cubes in cube order, dQ per kept row, the pooled keys' gradients per cube mean: the caller
spreads those over the cube's keys and values, since k_bar is their mean).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .block_sparse_attention import _CONFIGS, _device_facts, _dot, _key_tables

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.44269504


def _tuned(*key: str):
    """Warps and pipeline stages picked per shape on the first call on a machine (the choice is cached on disk
    like the forward's; outputs are stored, so the tuning runs leave them right); configs that do not fit the
    device's shared memory drop out. The interpreter runs one config."""
    configs = [c for c in _CONFIGS if c.num_stages > 1]  # the forward's warps x stages, pipelined
    return triton.autotune(configs=configs[:1] if _INTERPRET else configs, key=list(key), cache_results=True)


@triton.jit
def _query_tile(Q, dO, Lse, Delta, q_index_ptr, bh, cube, N, KQ, offs_m, offs_d,
                CUBE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The kept rows of one query cube: q, dO [BLOCK_M, D], lse, delta [BLOCK_M], the rows' offset in the
    kept-row tensors, their slots and which rows are real. Cube order: the kernels re-read a query tile once
    per KV cube that it selected, and whole cubes load as contiguous tiles (raster rows measured slower)."""
    qi_off = (bh * N + cube) * KQ + offs_m
    slot = tl.load(q_index_ptr + qi_off, mask=offs_m < KQ, other=-1)
    live = slot >= 0
    q = tl.load(Q + ((bh * N + cube) * CUBE + slot)[:, None] * HEAD_DIM + offs_d[None, :], mask=live[:, None],
                other=0.0)
    do = tl.load(dO + qi_off[:, None] * HEAD_DIM + offs_d[None, :], mask=live[:, None], other=0.0)
    lse = tl.load(Lse + qi_off, mask=live, other=0.0)
    delta = tl.load(Delta + qi_off, mask=live, other=0.0)
    return q, do, tl.where(live & (lse > float("-inf")), lse, float("inf")), delta, qi_off, slot, live


@triton.jit
def _probs_and_dscores(q, do, k, v, lse, delta, bias, qk_scale, DOT_F32: tl.constexpr):
    """P [M, N] of the forward (0 on dead rows: their lse is +inf) and dS = P * (dO . V^T - delta); bias [N]."""
    s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), DOT_F32) * qk_scale + bias[None, :]
    p = tl.math.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), tl.zeros([q.shape[0], k.shape[0]], tl.float32), DOT_F32)
    return p, p * (dp - delta[:, None])


@triton.jit
def _dense_key_bias(Log2N, Attended, bh, N, cube, cols, ok, POOLED: tl.constexpr):
    """[BLOCK_N] log2 bias of a block of keys every row may see: extra keys 0 (-inf past the end); with
    POOLED the pooled cube means, log2 n_valid, -inf where the row's cube selected that cube."""
    if POOLED:
        hidden = tl.load(Attended + (bh * N + cube) * N + cols, mask=ok, other=1)
        return tl.where(ok & (hidden == 0), tl.load(Log2N + cols, mask=ok, other=0.0), float("-inf"))
    return tl.where(ok, 0.0, float("-inf"))


@triton.jit
def _dq_over_dense_keys(dq, q, do, lse, delta, KD, VD, Log2N, Attended, bh, cube, N, n_keys, qk_scale, offs_n,
                        offs_d, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, POOLED: tl.constexpr,
                        DOT_F32: tl.constexpr):
    """dQ += dS K over the n_keys extra keys or (POOLED) the pooled cube means, BLOCK_N keys a step."""
    for start in range(0, n_keys, BLOCK_N):
        cols = (start + offs_n).to(tl.int64)
        ok = cols < n_keys
        kv_off = bh * n_keys * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(KD + kv_off, mask=ok[:, None], other=0.0)
        v = tl.load(VD + kv_off, mask=ok[:, None], other=0.0)
        bias = _dense_key_bias(Log2N, Attended, bh, N, cube, cols, ok, POOLED)
        _, ds = _probs_and_dscores(q, do, k, v, lse, delta, bias, qk_scale, DOT_F32)
        dq = _dot(ds.to(k.dtype), k, dq, DOT_F32)
    return dq


@_tuned("N", "KQ", "E", "CUBE", "HEAD_DIM", "HAS_REMAINDER", "RASTER")
@triton.jit
def _bwd_dq_kernel(Q, K, V, dO, Lse, Delta, KE, VE, KBar, VBar, Log2N, Attended, DQ, q_index_ptr, tokens_ptr,
                   kv_count_ptr, kv_index_ptr, key_bias_ptr, qk_scale, N, KQ, KV_W, E, L, n_prefix,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CUBE: tl.constexpr,
                   HAS_EXTRA: tl.constexpr, HAS_REMAINDER: tl.constexpr, RASTER: tl.constexpr,
                   DOT_F32: tl.constexpr):
    """dQ of one query cube's kept rows."""
    bh = tl.program_id(1).to(tl.int64)
    cube = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q, do, lse, delta, row, slot, live = _query_tile(Q, dO, Lse, Delta, q_index_ptr, bh, cube, N, KQ, offs_m, offs_d,
                                                     CUBE, HEAD_DIM)
    kv_bh = bh * N * CUBE * HEAD_DIM
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    PIECES: tl.constexpr = (CUBE + BLOCK_N - 1) // BLOCK_N
    for step in range(0, tl.load(kv_count_ptr + bh * N + cube) * PIECES):  # one flat loop, as the forward's
        kv = tl.load(kv_index_ptr + (bh * N + cube) * KV_W + step // PIECES).to(tl.int64)
        cols = (step % PIECES) * BLOCK_N + offs_n
        ok = cols < CUBE
        rows = kv * CUBE + cols
        k = tl.load(K + kv_bh + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + kv_bh + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        bias = tl.load(key_bias_ptr + rows, mask=ok, other=float("-inf"))
        _, ds = _probs_and_dscores(q, do, k, v, lse, delta, bias, qk_scale, DOT_F32)
        dq = _dot(ds.to(k.dtype), k, dq, DOT_F32)
    if HAS_EXTRA:
        dq = _dq_over_dense_keys(dq, q, do, lse, delta, KE, VE, Log2N, Attended, bh, cube, N, E, qk_scale, offs_n,
                                 offs_d, BLOCK_N, HEAD_DIM, False, DOT_F32)
    if HAS_REMAINDER:
        dq = _dq_over_dense_keys(dq, q, do, lse, delta, KBar, VBar, Log2N, Attended, bh, cube, N, N, qk_scale, offs_n,
                                 offs_d, BLOCK_N, HEAD_DIM, True, DOT_F32)
    if RASTER:  # the row's raster row of [B, H, L, D]
        row = bh * L + n_prefix + tl.load(tokens_ptr + cube * CUBE + slot, mask=live, other=0)
    tl.store(DQ + row[:, None] * HEAD_DIM + offs_d[None, :], (dq * (qk_scale / 1.44269504)).to(DQ.dtype.element_ty),
             mask=live[:, None])


@_tuned("N", "KQ", "CUBE", "HEAD_DIM", "RASTER", "SPREAD")
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, dO, Lse, Delta, DK, DV, DKBar, DVBar, Log2N, q_index_ptr, tokens_ptr,
                     t_count_ptr, t_index_ptr, key_bias_ptr, qk_scale, N, KQ, T_W, L, n_prefix,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CUBE: tl.constexpr,
                     RASTER: tl.constexpr, SPREAD: tl.constexpr, DOT_F32: tl.constexpr):
    """One piece (BLOCK_N keys) of one KV cube against every query cube that selected it. RASTER: dK, dV are
    written at the keys' raster rows of [B, H, L, D]; SPREAD adds the cube's pooled-key gradients (DKBar,
    DVBar [B, H, N, D], from the dense-key kernel) over its valid keys, since k_bar is their mean."""
    bh = tl.program_id(1).to(tl.int64)
    kv = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = piece * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < CUBE
    rows = kv * CUBE + cols
    kv_off = bh * N * CUBE * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_off, mask=ok[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=ok[:, None], other=0.0)
    bias = tl.load(key_bias_ptr + rows, mask=ok, other=float("-inf"))
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    count = tl.load(t_count_ptr + bh * N + kv)
    for j in range(0, count):
        cube = tl.load(t_index_ptr + (bh * N + kv) * T_W + j).to(tl.int64)
        q, do, lse, delta, _, _, _ = _query_tile(Q, dO, Lse, Delta, q_index_ptr, bh, cube, N, KQ, offs_m, offs_d,
                                                 CUBE, HEAD_DIM)
        p, ds = _probs_and_dscores(q, do, k, v, lse, delta, bias, qk_scale, DOT_F32)
        dv = _dot(tl.trans(p).to(do.dtype), do, dv, DOT_F32)
        dk = _dot(tl.trans(ds).to(q.dtype), q, dk, DOT_F32)
    dk = dk * (qk_scale / 1.44269504)
    if SPREAD:  # 1 / n_valid of the cube's pooled-key gradient to each of its valid keys
        share = tl.where(bias == 0.0, tl.math.exp2(-tl.load(Log2N + kv)), 0.0)[:, None]
        dk += tl.load(DKBar + (bh * N + kv) * HEAD_DIM + offs_d)[None, :] * share
        dv += tl.load(DVBar + (bh * N + kv) * HEAD_DIM + offs_d)[None, :] * share
    if RASTER:
        token = tl.load(tokens_ptr + rows, mask=ok, other=-1)
        ok = ok & (token >= 0)
        kv_off = (bh * L + n_prefix + token)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=ok[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=ok[:, None])


@_tuned("N", "KQ", "n_keys", "CUBE", "HEAD_DIM", "POOLED")
@triton.jit
def _bwd_dense_keys_kernel(Q, dO, Lse, Delta, KD, VD, Log2N, Attended, DK, DV, q_index_ptr, qk_scale, N, KQ, n_keys,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CUBE: tl.constexpr,
                           POOLED: tl.constexpr, DOT_F32: tl.constexpr):
    """A block of keys every query cube may see: the extra keys (all rows) or, with POOLED, the pooled cube
    means (key c seen by the rows whose cube did not select c, log2 weight Log2N[c]), over one share of the
    query cubes (grid axis 2): the caller sums the shares' partial dK, dV [shares, B, H, n_keys, D]. A few
    blocks of keys per head would otherwise leave most SMs idle (96 programs at Wan 480p)."""
    bh = tl.program_id(1).to(tl.int64)
    share = tl.program_id(2)
    per_share = tl.cdiv(N, tl.num_programs(2))
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ok = cols < n_keys
    kv_off = bh * n_keys * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(KD + kv_off, mask=ok[:, None], other=0.0)
    v = tl.load(VD + kv_off, mask=ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for cube in range(share * per_share, tl.minimum(N, (share + 1) * per_share)):
        q, do, lse, delta, _, _, _ = _query_tile(Q, dO, Lse, Delta, q_index_ptr, bh, cube, N, KQ, offs_m, offs_d,
                                                 CUBE, HEAD_DIM)
        bias = _dense_key_bias(Log2N, Attended, bh, N, cube, cols, ok, POOLED)
        p, ds = _probs_and_dscores(q, do, k, v, lse, delta, bias, qk_scale, DOT_F32)
        dv = _dot(tl.trans(p).to(do.dtype), do, dv, DOT_F32)
        dk = _dot(tl.trans(ds).to(q.dtype), q, dk, DOT_F32)
    out_off = share * tl.num_programs(1) * n_keys * HEAD_DIM + kv_off
    tl.store(DK + out_off, dk * (qk_scale / 1.44269504), mask=ok[:, None])
    tl.store(DV + out_off, dv, mask=ok[:, None])


def block_sparse_attention_backward(q_cubes, k_cubes, v_cubes, q_index, kv_count, kv_index, slot_valid,
                                    out_kept, lse, grad_kept, scale: float | None = None, k_extra=None, v_extra=None,
                                    remainder=None, raster=None, delta=None):
    """Gradients of `block_sparse_attention(..., return_lse=True)` for the upstream gradient of its kept rows.

    q_cubes, k_cubes, v_cubes [B, H, N, S, D] and the tables as in the forward; out_kept, grad_kept
    [B, H, N, Kq, D] (grad_kept already holds the gradient of every dropped query copied from the row);
    lse [B, H, N, Kq] from the forward. remainder: (k_bar, v_bar, attended) as in the forward. delta
    [B, H, N, Kq] fp32: rowsum(grad_kept * out_kept) when already computed (`grad_permute`; out_kept may then
    be None).
    Returns (dq_kept [B,H,N,Kq,D], dk_cubes, dv_cubes [B,H,N,S,D], dk_extra, dv_extra [B,H,E,D] or None), fp32;
    dk_cubes, dv_cubes include the pooled keys' gradients, spread over each cube's valid keys (k_bar is their
    mean). raster = (layout, n_prefix, dq, dk, dv): where every slot is its own row (q_index[..., s] = s on
    valid slots, keep_ratio 1), the kernels write the video's raster rows of dq, dk, dv [B, H, L, D]
    (contiguous, any float dtype; other rows untouched) and those three are returned: no scatter, cast or
    gather runs after the kernels."""
    B, H, N, S, D = q_cubes.shape
    KQ = q_index.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dtype = torch.bfloat16 if q_cubes.dtype == torch.float32 else q_cubes.dtype
    q, k, v = (x.to(dtype).contiguous() for x in (q_cubes, k_cubes, v_cubes))
    do = grad_kept.to(dtype).contiguous()
    delta = (grad_kept.float() * out_kept.float()).sum(-1).contiguous() if delta is None else delta.contiguous()
    lse = lse.contiguous()
    q_index, kv_count, kv_index = (x.to(torch.int32).contiguous() for x in (q_index, kv_count, kv_index))
    tables = _key_tables(slot_valid.to(q.device))
    has_extra = k_extra is not None and k_extra.shape[-2] > 0
    ke, ve = ((x.to(dtype).contiguous() for x in (k_extra, v_extra)) if has_extra else (q, q))
    E = k_extra.shape[-2] if has_extra else 0
    if remainder is not None:
        k_bar, v_bar = (x.to(dtype).contiguous() for x in remainder[:2])
        attended = remainder[2].to(torch.bool).contiguous().view(torch.uint8)
    else:
        k_bar = v_bar = attended = q
    if raster is not None:
        layout, n_prefix, dq, dk, dv = raster
        if KQ != S or any(x.shape != dq.shape or not x.is_contiguous() for x in (dq, dk, dv)):
            raise ValueError("raster needs every slot as a row (Kq = S) and contiguous dq, dk, dv of one shape")
        tokens, L = layout.token_of_slot, dq.shape[2]
    else:
        dq = torch.zeros(B, H, N, KQ, D, dtype=torch.float32, device=q.device)  # dead rows stay 0
        dk = torch.empty(B, H, N, S, D, dtype=torch.float32, device=q.device)  # every row is stored
        dv = torch.empty_like(dk)
        tokens, L, n_prefix = q_index, 0, 0
    BLOCK_M = max(16, triton.next_power_of_2(KQ))
    BLOCK_N = min(64, max(16, triton.next_power_of_2(S)))
    qk_scale = scale * _LOG2E
    meta = dict(BLOCK_M=BLOCK_M, HEAD_DIM=D, CUBE=S, DOT_F32=_INTERPRET)

    def dense_keys(kd, vd, n_keys, pooled):
        key_blocks = triton.cdiv(n_keys, BLOCK_N)
        shares = _query_shares(key_blocks * B * H, N, q.device)
        dkd = torch.empty(shares, B, H, n_keys, D, dtype=torch.float32, device=q.device)  # every row is stored
        dvd = torch.empty_like(dkd)
        _bwd_dense_keys_kernel[(key_blocks, B * H, shares)](
            q, do, lse, delta, kd, vd, tables.log2_n, attended, dkd, dvd, q_index, qk_scale, N, KQ, n_keys,
            BLOCK_N=BLOCK_N, POOLED=pooled, **meta)
        return (dkd[0], dvd[0]) if shares == 1 else (dkd.sum(0), dvd.sum(0))

    # the pooled keys first: the dK/dV kernel spreads their gradients over each cube's keys
    dk_bar, dv_bar = dense_keys(k_bar, v_bar, N, True) if remainder is not None else (q, q)
    t_count, t_index = _transposed(kv_count, kv_index, N)
    _bwd_dkdv_kernel[(N, B * H, triton.cdiv(S, BLOCK_N))](
        q, k, v, do, lse, delta, dk, dv, dk_bar, dv_bar, tables.log2_n, q_index, tokens, t_count, t_index,
        tables.key_bias, qk_scale, N, KQ, t_index.shape[-1], L, n_prefix, BLOCK_N=BLOCK_N, RASTER=raster is not None,
        SPREAD=remainder is not None, **meta)
    _bwd_dq_kernel[(N, B * H)](q, k, v, do, lse, delta, ke, ve, k_bar, v_bar, tables.log2_n, attended, dq, q_index,
                               tokens, kv_count, kv_index, tables.key_bias, qk_scale, N, KQ, kv_index.shape[-1], E, L,
                               n_prefix, BLOCK_N=BLOCK_N, HAS_EXTRA=has_extra, HAS_REMAINDER=remainder is not None,
                               RASTER=raster is not None, **meta)
    dke, dve = dense_keys(ke, ve, E, False) if has_extra else (None, None)
    return dq, dk, dv, dke, dve


def _query_shares(programs: int, n_cubes: int, device: torch.device) -> int:
    """Into how many shares the dense-key kernel splits the query cubes: enough programs for about four per SM
    (the interpreter counts as 4 SMs, so the CPU tests run the split and its sum)."""
    sms = _device_facts(device)[2] or 4
    return max(1, min(n_cubes, -(-4 * sms // programs)))


def _transposed(kv_count: torch.Tensor, kv_index: torch.Tensor, N: int):
    """Per KV cube, the query cubes whose list holds it: (count [B,H,N], index [B,H,N,N] ascending, -1 pad).
    One scatter into an [B,H,N,N] mask (O(cubes^2) per head, like the pooled remainder's mask), then each
    entry's place in its column is its prefix count: no sort (argsort was 0.2 ms of a Wan 480p backward)."""
    B, H = kv_count.shape[:2]
    device = kv_index.device
    idx = kv_index.long()
    mask = torch.zeros(B, H, N, N + 1, dtype=torch.bool, device=device)
    mask.scatter_(-1, torch.where(idx >= 0, idx, N), True)
    mask_t = mask[..., :N].transpose(-1, -2)  # [B, H, KV cube, query cube]
    count = mask_t.sum(-1, dtype=torch.int32)
    # entries not in the list go to a dump column
    place = torch.where(mask_t, torch.cumsum(mask_t, -1, dtype=torch.int32) - 1, N).long()
    index = torch.full((B, H, N, N + 1), -1, dtype=torch.int32, device=device)
    index.scatter_(-1, place, torch.arange(N, dtype=torch.int32, device=device).expand(B, H, N, N))
    return count.contiguous(), index[..., :N].contiguous()
