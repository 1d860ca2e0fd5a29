"""KV-sparse selection: per (batch, head, query cube) the KV cubes its kept queries attend.

Semantics are `bsa_core.reference.block_logits` + `select_kv` + `mask_to_index`:
z = q_bar . k_bar * scale + log(n_valid), mass = softmax(z) over the row, then
- cumulative: block j is kept iff the mass of the blocks strictly ahead of it in (mass desc, index
  asc) order is < p (the crossing block is kept); p >= 1 keeps everything;
- statistical: z >= mean + lambda * std (population std);
- always the own cube, and the top min_blocks by mass (ties: lower index).
No sort: the kept (mass desc, index asc) prefix ends at the smallest mass t with
"mass above t < p  or  #blocks above t < min_blocks"; both sides only change at block masses and are
monotone in t (a fixed-shape fp32 sum of a shrinking set of non-negative terms only shrinks), so a
30-step bisection over the non-negative float32 bit patterns [0, 1] finds t exactly. Blocks tied at t
are then taken in index order with a cumulative count.

Two launches: block logits as a small fp32 GEMM into a [G, N, N] scratch, then one program per row
that keeps the row (N <= a few thousand cubes) in registers and writes the compacted index list over
the row of logits it read. The scratch is bounded by processing heads in groups.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_SCRATCH_ELEMENTS = 1 << 27  # logits buffered at once (512 MiB of fp32): Wan 720p's 40 x 1440^2 fit, no host sync
_ABOVE_ONE = tl.constexpr(0x3F800001)  # bit pattern of the float just above 1.0: no mass lies above it
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# the logits GEMM is small (N^2 * D per head); the tile is tuned per head_dim. 64 / 128 tiles: H200, 720p, 0.79 ms
# where 32 / 64 tiles took 0.85; four configs, not eight: the first call compiles them (6.4 s cold, not 10.8)
_LOGIT_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4 if m * n <= 64 * 64 else 8)
                  for m in (64, 128) for n in (64, 128)]


def _prune_logit_configs(configs, named_args, **kwargs):
    # the interpreter times nothing: one config there
    return configs[:1] if _INTERPRET else configs


@triton.autotune(configs=_LOGIT_CONFIGS, key=["HEAD_DIM"], cache_results=True,
                 prune_configs_by={"early_config_prune": _prune_logit_configs})
@triton.jit
def _block_logits_kernel(QBar, KBar, LogN, Z, N, scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Z[g, m, n] = q_bar[g, m] . k_bar[g, n] * scale + log_n[n] at fp32 accuracy: three tf32 products
    (tf32x3) on the tensor cores, plain fp32 ("ieee") in the interpreter."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(2).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, HEAD_DIM, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(QBar + (g * N + rows[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=(rows < N)[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(KBar + (g * N + cols[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=(cols < N)[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    z = acc * scale + tl.load(LogN + cols, mask=cols < N, other=0.0)[None, :]
    tl.store(Z + (g * N + rows[:, None]) * N + cols[None, :], z, mask=(rows < N)[:, None] & (cols < N)[None, :])


@triton.jit
def _mass_cut(mass, p, min_blocks, CUMULATIVE: tl.constexpr):
    """Smallest float t >= 0 with #(mass > t) < min_blocks, or (CUMULATIVE) sum(mass > t) < p."""
    lo = tl.full([], -1, tl.int32)  # below 0.0: the predicate is taken as false there
    hi = tl.full([], _ABOVE_ONE, tl.int32)  # nothing above: true
    for _ in range(30):  # hi - lo < 2^30
        mid = (lo + hi) >> 1
        above = mass > mid.to(tl.float32, bitcast=True)
        done = tl.sum(above.to(tl.int32), 0) < min_blocks
        if CUMULATIVE:
            done = done | (tl.sum(tl.where(above, mass, 0.0), 0) < p)
        lo = tl.where(done, lo, mid)
        hi = tl.where(done, mid, hi)
    return hi.to(tl.float32, bitcast=True)


@triton.jit
def _ranked_prefix(mass, ok, p, min_blocks, CUMULATIVE: tl.constexpr):
    """Blocks of the (mass desc, index asc) prefix: the first min_blocks, and (CUMULATIVE) every block
    while the mass ranked before it is short of p."""
    t = _mass_cut(mass, p, min_blocks, CUMULATIVE)
    above = mass > t
    tied = ok & (mass == t)
    tie_rank = tl.cumsum(tied.to(tl.int32), 0) - tied.to(tl.int32)
    keep = above | (tied & (tl.sum(above.to(tl.int32), 0) + tie_rank < min_blocks))
    if CUMULATIVE:
        keep |= tied & (tl.sum(tl.where(above, mass, 0.0), 0) + tie_rank.to(tl.float32) * t < p)
    return keep


@triton.jit
def _mass(z):
    """Block masses of a row: the softmax of its logits."""
    e = tl.exp(z - tl.max(z, 0))
    return e / tl.sum(e, 0)


@triton.jit
def _kv_select_kernel(Z, Index, Count, Mask, N, p, stat_lambda, min_blocks,
                      N_PAD: tl.constexpr, CUMULATIVE: tl.constexpr, WRITE_MASK: tl.constexpr):
    """One row of block logits -> count and ascending kept KV cubes, written over the row it read (and
    with WRITE_MASK the row as N bytes, 1 = kept: the pooled remainder reads that)."""
    tl.static_assert(N_PAD >= 16)
    cube = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64) * N + cube
    cols = tl.arange(0, N_PAD)
    ok = cols < N
    z = tl.load(Z + row * N + cols, mask=ok, other=float("-inf"))

    if CUMULATIVE:
        keep = _ranked_prefix(_mass(z), ok, p, min_blocks, True)
    else:
        mean = tl.sum(tl.where(ok, z, 0.0), 0) / N
        dev = tl.where(ok, z - mean, 0.0)
        keep = ok & (z >= mean + stat_lambda * tl.sqrt(tl.sum(dev * dev, 0) / N))
        if min_blocks > 1:
            keep |= _ranked_prefix(_mass(z), ok, p, min_blocks, False)
        else:  # the top block by mass is the top block by logit (ties: lower index); no softmax needed
            keep |= cols == tl.argmax(z, 0)
    keep |= cols == cube

    count = tl.sum(keep.to(tl.int32), 0)
    position = tl.cumsum(keep.to(tl.int32), 0) - keep.to(tl.int32)
    tl.store(Count + row, count)
    if WRITE_MASK:
        tl.store(Mask + row * N + cols, keep.to(tl.int8), mask=ok)
    tl.store(Index + row * N + cols, tl.full([N_PAD], -1, tl.int32), mask=ok & (cols >= count))
    tl.store(Index + row * N + position, cols, mask=keep)


_log_n_cache: dict = {}


def _log_n(layout) -> torch.Tensor:
    """log of each cube's real key count, once per layout (a partial cube weighs its real size)."""
    key = (layout.grid, layout.cube_size, str(layout.n_valid.device))
    if key not in _log_n_cache:
        if len(_log_n_cache) >= 32:
            _log_n_cache.clear()
        _log_n_cache[key] = layout.n_valid.float().log()
    return _log_n_cache[key]


def kv_select(q_bar: torch.Tensor, k_bar: torch.Tensor, layout, config, scale: float, return_mask: bool = False):
    """q_bar, k_bar [B, H, N, D] float32 -> (kv_count [B,H,N] int32, kv_index [B,H,N,Kkv] int32
    ascending, -1 padded), with return_mask also the selection as a [B, H, N, N] bool mask. When every
    head's logits fit the scratch at once, Kkv = N and nothing waits for the device; otherwise heads go
    in groups, one host sync each, and Kkv = the largest count. p >= 1 in cumulative mode keeps every
    cube and returns expanded views without a launch."""
    if q_bar.dim() != 4 or k_bar.shape != q_bar.shape or q_bar.shape[2] != layout.num_cubes:
        raise ValueError(f"q_bar and k_bar must both be [B, H, {layout.num_cubes}, D], "
                         f"got {tuple(q_bar.shape)} and {tuple(k_bar.shape)}")
    if q_bar.dtype != torch.float32 or k_bar.dtype != torch.float32:
        raise ValueError(f"q_bar and k_bar must be float32, got {q_bar.dtype} and {k_bar.dtype}")
    if k_bar.device != q_bar.device or layout.n_valid.device != q_bar.device:
        raise ValueError(f"q_bar ({q_bar.device}), k_bar ({k_bar.device}) and layout "
                         f"({layout.n_valid.device}) must share a device")
    B, H, N, D = q_bar.shape
    dev = q_bar.device
    if config.threshold_mode == "cumulative" and config.kv_threshold >= 1.0:
        kv_index = torch.arange(N, dtype=torch.int32, device=dev).expand(B, H, N, N)
        kv_count = torch.full((B, H, N), N, dtype=torch.int32, device=dev)
        if return_mask:
            return kv_count, kv_index, torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev).expand(B, H, N, N)
        return kv_count, kv_index

    BH = B * H
    qb, kb = q_bar.reshape(BH, N, D).contiguous(), k_bar.reshape(BH, N, D).contiguous()
    log_n = _log_n(layout)
    kv_count = torch.empty(BH, N, dtype=torch.int32, device=dev)
    mask = torch.empty(BH, N, N, dtype=torch.bool, device=dev) if return_mask else kv_count
    group = max(1, min(BH, _SCRATCH_ELEMENTS // (N * N)))
    scratch = torch.empty(group, N, N, dtype=torch.float32, device=dev)
    index = scratch.view(torch.int32)
    n_pad = max(16, triton.next_power_of_2(N))
    block_d = max(16, min(64, triton.next_power_of_2(D)))
    parts = []
    for g0 in range(0, BH, group):
        g = min(group, BH - g0)
        _block_logits_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), g)](
            qb[g0:], kb[g0:], log_n, scratch, N, scale, HEAD_DIM=D, BLOCK_D=block_d,
            PRECISION="ieee" if _INTERPRET else "tf32x3")
        _kv_select_kernel[(N, g)](
            scratch, index, kv_count[g0:], mask[g0:].view(torch.int8) if return_mask else mask, N,
            float(config.kv_threshold), float(config.stat_lambda), min(config.min_blocks, N), N_PAD=n_pad,
            CUMULATIVE=config.threshold_mode == "cumulative", WRITE_MASK=return_mask,
            num_warps=max(2, min(16, n_pad // 512)))  # 512 blocks a warp: a row waits on its reductions
        if group == BH:
            # one group: the index written over the logits is the result, full width, no host sync
            result = kv_count.view(B, H, N), index.view(B, H, N, N)
            return (*result, mask.view(B, H, N, N)) if return_mask else result
        # the scratch is reused by the next group: keep only the used width of this one
        parts.append(index[:g, :, :int(kv_count[g0:g0 + g].max())].clone())
    width = max(part.shape[-1] for part in parts)
    kv_index = torch.cat([torch.nn.functional.pad(part, (0, width - part.shape[-1]), value=-1) for part in parts])
    result = kv_count.view(B, H, N), kv_index.view(B, H, N, width)
    return (*result, mask.view(B, H, N, N)) if return_mask else result
