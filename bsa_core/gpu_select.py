"""The GPU replacement for `bsa_core.reference.bsa_select`: query selection, then KV selection.

Two kernel ops in sequence, no torch sort anywhere: `query_select` (keep set, sources and q_bar in one
program per cube; skipped at keep_ratio 1, where every query is kept) and `kv_select` (block logits GEMM
+ sort-free cut per row). The pooled means come from the permute pass (`cube_permute(..., with_mean=True)`)
where the caller has it, else from one fp32 reduction here.
"""
from __future__ import annotations

import torch

from ..kernels.kv_select import kv_select
from ..kernels.query_select import query_select
from .reference import cube_mean
from .selection import BSASelection, mask_to_index


def select_triton(q_cubes: torch.Tensor | None, k_cubes: torch.Tensor | None, layout, config, scale: float,
                  k_bar: torch.Tensor | None = None, q_bar: torch.Tensor | None = None,
                  return_mask: bool = False):
    """q_cubes, k_cubes [B, H, N, S, D] in cube order with zero padding slots (`cube_permute` or
    `CubeLayout.to_cubes`); k_bar [B, H, N, D] float32 if already pooled, likewise q_bar (used when
    keep_ratio is 1: every query is kept, so no similarity is computed and q_cubes may be None).
    Returns the BSASelection `bsa_core.reference.bsa_select` returns (up to the tie orders documented in
    the two ops); with return_mask also the selection as a dense [B, H, N, N] bool mask, written by the
    same kernel (the pooled remainder's table)."""
    if config.keep_ratio >= 1.0:
        if q_bar is None:
            q_bar = cube_mean(q_cubes, layout)
        q_count, q_index, q_source = _all_queries(layout, tuple(q_bar.shape[:2]))
    else:
        if k_cubes is not None and (k_cubes.shape[:3] != q_cubes.shape[:3] or k_cubes.shape[-1] != q_cubes.shape[-1]):
            raise ValueError(f"k_cubes must match q_cubes [B, H, N, ., D], got {tuple(k_cubes.shape)} "
                             f"and {tuple(q_cubes.shape)}")
        q_count, q_index, q_source, q_bar = query_select(q_cubes, layout, config.keep_ratio)
    if k_bar is None:
        k_bar = cube_mean(k_cubes, layout)
    kv_count, kv_index, mask = kv_select(q_bar, k_bar, layout, config, scale, return_mask=True)
    selection = BSASelection(q_count, q_index, q_source, kv_count, kv_index)
    return (selection, mask) if return_mask else selection


def _all_queries(layout, batch_heads):
    """keep_ratio 1: every valid slot is kept and is its own source (the reference's tables at r = 1).
    Expanded views of per-layout tables: nothing is copied per call."""
    q_count, q_index, q_source = _all_query_tables(layout)
    return tuple(t.expand(*batch_heads, *t.shape) for t in (q_count, q_index, q_source))


_all_query_cache: dict = {}


def _all_query_tables(layout):
    key = (layout.grid, layout.cube_size, str(layout.slot_valid.device))
    if key not in _all_query_cache:
        q_count, q_index = mask_to_index(layout.slot_valid, width=layout.cube_volume)
        q_source = torch.where(layout.slot_valid, torch.cumsum(layout.slot_valid, -1, dtype=torch.int32) - 1, -1)
        if len(_all_query_cache) >= 32:
            _all_query_cache.clear()
        _all_query_cache[key] = tuple(t.to(torch.int32) for t in (q_count, q_index, q_source))
    return _all_query_cache[key]
