"""Pure-torch BSA (float32, readable): the single source of truth the kernels are tested against.

Shapes: q, k, v [B, H, L, D] with L = n_prefix + T*H*W + n_suffix; video tokens in raster order.
Nothing here allocates O(L^2): attention runs over chunks of query cubes.
"""
from __future__ import annotations

import math

import torch

from ..kernels.cube_index import keep_counts
from .config import BSAConfig
from .cubes import CubeLayout
from .selection import BSASelection, mask_to_index

_CHUNK_ELEMENTS = 1 << 24  # logits per attention chunk


def select_queries(q_cubes: torch.Tensor, layout: CubeLayout, keep_ratio: float):
    """q_cubes [B,H,N,S,D] -> (q_count, q_index, q_source).

    Keep the cube centre plus the ceil(r*n)-1 queries least similar (cosine) to it; each dropped
    query copies the kept query of its cube it is most similar to.
    """
    qn = torch.nn.functional.normalize(q_cubes.float(), dim=-1)
    centre = qn.gather(-2, layout.centre_slot.view(1, 1, -1, 1, 1).expand(*qn.shape[:3], 1, qn.shape[-1]))
    cos = (qn * centre).sum(-1)  # [B,H,N,S]
    slots = torch.arange(layout.cube_volume, device=q_cubes.device)
    key = torch.where(slots == layout.centre_slot[:, None], float("-inf"), cos)
    key = torch.where(layout.slot_valid, key, float("inf"))
    rank = torch.empty_like(slots.expand_as(key))
    rank.scatter_(-1, torch.sort(key, dim=-1, stable=True).indices, slots.expand_as(key))
    kept = rank < keep_counts(layout.n_valid, keep_ratio)[:, None]
    q_count, q_index = mask_to_index(kept, width=int(keep_counts(layout.n_valid, keep_ratio).max()))

    kept_vectors = qn.gather(-2, q_index.clamp(min=0).long()[..., None].expand(*q_index.shape, qn.shape[-1]))
    sim = qn @ kept_vectors.transpose(-1, -2)  # [B,H,N,S,Kq]
    sim = sim.masked_fill((q_index < 0)[..., None, :], float("-inf"))
    source = sim.argmax(-1)
    # a kept query is its own source, whatever ties say
    is_kept_at = q_index.long()[..., None, :] == slots[:, None]  # [B,H,N,S,Kq]
    source = torch.where(is_kept_at.any(-1), is_kept_at.int().argmax(-1), source)
    source = torch.where(layout.slot_valid, source, -1)
    return q_count, q_index, source.to(torch.int32)


def cube_mean(x_cubes, layout: CubeLayout) -> torch.Tensor:
    """Mean of each cube's valid rows (padding slots are zero): [..., N, S, D] -> [..., N, D] float32."""
    return x_cubes.float().sum(-2) / layout.n_valid[:, None].float()


def pooled_cubes(q_cubes, k_cubes, layout: CubeLayout, q_count, q_index):
    """Mean of each cube's kept queries and of its valid keys: [B,H,N,D] each, float32."""
    kept_q = q_cubes.float().gather(-2, q_index.clamp(min=0).long()[..., None].expand(*q_index.shape, q_cubes.shape[-1]))
    kept_q = kept_q * (q_index >= 0)[..., None]
    q_bar = kept_q.sum(-2) / q_count[..., None].float()
    return q_bar, cube_mean(k_cubes, layout)


def block_logits(q_bar, k_bar, layout: CubeLayout, scale: float) -> torch.Tensor:
    """z = q_bar . k_bar * scale + log(n_valid_keys): [B,H,N,N]; a partial cube weighs its real size."""
    return (q_bar @ k_bar.transpose(-1, -2)) * scale + torch.log(layout.n_valid.float())


def select_kv(z: torch.Tensor, config: BSAConfig) -> torch.Tensor:
    """[B,H,N,N] block logits -> [B,H,N,N] bool keep mask (own cube and min_blocks included).

    Blocks are ranked by (mass descending, index ascending); min_blocks takes the first ranks."""
    N = z.shape[-1]
    mass = torch.softmax(z, dim=-1)
    sorted_mass, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=z.device).expand_as(order))
    if config.threshold_mode == "statistical":
        keep = z >= z.mean(-1, keepdim=True) + config.stat_lambda * z.std(-1, unbiased=False, keepdim=True)
    elif config.kv_threshold >= 1.0:
        keep = torch.ones_like(z, dtype=torch.bool)
    else:
        # a block is kept while the mass ranked before it is still short of p (the crossing block is kept)
        keep = (torch.cumsum(sorted_mass, -1) - sorted_mass).gather(-1, rank) < config.kv_threshold
    return keep | (rank < config.min_blocks) | torch.eye(N, dtype=torch.bool, device=z.device)


def bsa_select(q_cubes, k_cubes, layout: CubeLayout, config: BSAConfig, scale: float) -> BSASelection:
    """Query keep set and KV cube table for one call (all batches and heads at once)."""
    q_count, q_index, q_source = select_queries(q_cubes, layout, config.keep_ratio)
    q_bar, k_bar = pooled_cubes(q_cubes, k_cubes, layout, q_count, q_index)
    kv_count, kv_index = mask_to_index(select_kv(block_logits(q_bar, k_bar, layout, scale), config))
    return BSASelection(q_count, q_index, q_source, kv_count, kv_index)


def sparse_attention_reference(q_cubes, k_cubes, v_cubes, layout: CubeLayout, selection: BSASelection,
                               scale: float, k_extra=None, v_extra=None, pooled_remainder: bool = False) -> torch.Tensor:
    """Exact attention of the kept queries over their selected KV cubes (+ every extra key), then
    each slot copies its source's output. Inputs [B,H,N,S,D] (+ extras [B,H,E,D]); out [B,H,N,S,D] fp32.

    pooled_remainder: every KV cube a query cube did not select joins the same softmax as one key,
    its mean key with logit bias log(n_valid) and its mean value: n * exp(q . k_bar) * v_bar."""
    B, H, N, S, D = q_cubes.shape
    idx = selection.q_index.clamp(min=0).long()[..., None].expand(*selection.q_index.shape, D)
    q_kept = q_cubes.float().gather(-2, idx)  # [B,H,N,Kq,D]
    keys = k_cubes.float().reshape(B, H, N * S, D)
    values = v_cubes.float().reshape(B, H, N * S, D)
    if k_extra is not None and k_extra.shape[-2] > 0:
        keys = torch.cat([keys, k_extra.float()], -2)
        values = torch.cat([values, v_extra.float()], -2)
    n_extra = keys.shape[-2] - N * S
    cube_mask = selection.to_dense()  # [B,H,N,N]

    if pooled_remainder:
        k_bar, v_bar = cube_mean(k_cubes, layout), cube_mean(v_cubes, layout)
        log_n = torch.log(layout.n_valid.float())

    out = torch.empty_like(q_kept)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * q_kept.shape[-2] * (keys.shape[-2] + N)))
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        # the key mask of this chunk only: for all cubes at once it is [B,H,N,N*S], O(L^2 / S)
        allowed = (cube_mask[:, :, n0:n1, :, None] & layout.slot_valid).reshape(B, H, n1 - n0, 1, N * S)
        allowed = torch.cat([allowed, allowed.new_ones(B, H, n1 - n0, 1, n_extra)], -1)
        logits = torch.einsum("bhnqd,bhkd->bhnqk", q_kept[:, :, n0:n1], keys) * scale
        logits = logits.masked_fill(~allowed, float("-inf"))
        if not pooled_remainder:
            out[:, :, n0:n1] = torch.einsum("bhnqk,bhkd->bhnqd", torch.softmax(logits, -1), values)
            continue
        pooled = torch.einsum("bhnqd,bhmd->bhnqm", q_kept[:, :, n0:n1], k_bar) * scale + log_n
        pooled = pooled.masked_fill(cube_mask[:, :, n0:n1, None, :], float("-inf"))
        weights = torch.softmax(torch.cat([logits, pooled], -1), -1)
        out[:, :, n0:n1] = (torch.einsum("bhnqk,bhkd->bhnqd", weights[..., :keys.shape[-2]], values)
                            + torch.einsum("bhnqm,bhmd->bhnqd", weights[..., keys.shape[-2]:], v_bar))
    source = selection.q_source.clamp(min=0).long()[..., None].expand(B, H, N, S, D)
    return out.gather(-2, source) * layout.slot_valid[..., None]


def bsa_attention_reference(q, k, v, layout: CubeLayout, config: BSAConfig, scale: float | None = None,
                            n_prefix: int = 0, n_suffix: int = 0, selection: BSASelection | None = None):
    """Whole BSA call on [B,H,L,D] tensors; returns (out [B,H,L,D] in q.dtype, selection)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    video = slice(n_prefix, q.shape[-2] - n_suffix)
    qc, kc, vc = (layout.to_cubes(x[..., video, :]) for x in (q, k, v))
    if selection is None:
        selection = bsa_select(qc, kc, layout, config, scale)
    extra = torch.cat([torch.arange(n_prefix), torch.arange(q.shape[-2] - n_suffix, q.shape[-2])]).to(q.device)
    k_extra, v_extra = k.index_select(-2, extra), v.index_select(-2, extra)
    out_video = layout.to_raster(sparse_attention_reference(qc, kc, vc, layout, selection, scale, k_extra, v_extra,
                                                            config.pooled_remainder))
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    out[..., video, :] = out_video
    if extra.numel():
        # extra tokens (text, reference frames) are never pruned: dense rows over every key
        out[..., extra, :] = torch.nn.functional.scaled_dot_product_attention(
            q.index_select(-2, extra).float(), k.float(), v.float(), scale=scale)
    return out.to(q.dtype), selection
