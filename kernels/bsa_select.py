"""The GPU replacement for `bsa_core.reference.bsa_select`: query selection, then KV selection.

Two ops in sequence, no torch sort anywhere: `query_select` (keep set, sources and q_bar in one
program per cube) and `kv_select` (block logits GEMM + sort-free mass cut per row). k_bar comes from
`cube_permute(k, ..., with_mean=True)` when the caller permuted K with it; otherwise it is one fp32
reduction over k_cubes here.
"""
from __future__ import annotations

import torch

from ..bsa_core.reference import cube_mean
from ..bsa_core.selection import BSASelection, mask_to_index
from .kv_select import kv_select
from .query_select import query_select


def select_triton(q_cubes: torch.Tensor, k_cubes: torch.Tensor, layout, config, scale: float,
                  k_bar: torch.Tensor | None = None, q_bar: torch.Tensor | None = None) -> BSASelection:
    """q_cubes, k_cubes [B, H, N, S, D] in cube order with zero padding slots (`cube_permute` or
    `CubeLayout.to_cubes`); k_bar [B, H, N, D] float32 if already pooled, likewise q_bar (used when
    keep_ratio is 1: every query is kept, so no similarity is computed). Returns the BSASelection
    `bsa_core.reference.bsa_select` returns (up to the tie orders documented in the two ops)."""
    if k_cubes.shape[:3] != q_cubes.shape[:3] or k_cubes.shape[-1] != q_cubes.shape[-1]:
        raise ValueError(f"k_cubes must match q_cubes [B, H, N, ., D], got {tuple(k_cubes.shape)} "
                         f"and {tuple(q_cubes.shape)}")
    if config.keep_ratio >= 1.0:
        q_count, q_index, q_source = _all_queries(layout, q_cubes.shape[:2])
        if q_bar is None:
            q_bar = cube_mean(q_cubes, layout)
    else:
        q_count, q_index, q_source, q_bar = query_select(q_cubes, layout, config.keep_ratio)
    if k_bar is None:
        k_bar = cube_mean(k_cubes, layout)
    kv_count, kv_index = kv_select(q_bar, k_bar, layout, config, scale)
    return BSASelection(q_count, q_index, q_source, kv_count, kv_index)


def _all_queries(layout, batch_heads):
    """keep_ratio 1: every valid slot is kept and is its own source (the reference's tables at r = 1)."""
    q_count, q_index = mask_to_index(layout.slot_valid, width=layout.cube_volume)
    q_source = torch.where(layout.slot_valid, torch.cumsum(layout.slot_valid, -1, dtype=torch.int32) - 1, -1)
    return tuple(t.to(torch.int32).expand(*batch_heads, *t.shape).contiguous() for t in (q_count, q_index, q_source))
