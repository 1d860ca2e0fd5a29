"""The backward of a BSA call on the Triton kernels: recompute the call's selection, take the forward's
log-sum-exp and output (saved by the op; recomputed when not given), then the block-sparse backward kernels
(`kernels/block_sparse_attention_bwd.py`).

The selection is a constant of the step (BSA_SPEC "Backward"): the forward's own first half
(`attention._triton_selection`: the same permute pass and selection kernels) gives the same tables.
Gradients follow the forward exactly: a dropped query's output gradient goes to the kept query it copied,
the pooled keys' gradients spread over their cube's keys and values (k_bar is their mean), the extra
tokens' own rows are dense attention.
"""
from __future__ import annotations

import torch

from ..kernels.block_sparse_attention import block_sparse_attention
from ..kernels.block_sparse_attention_bwd import block_sparse_attention_backward
from ..kernels.cube_permute import cube_permute, grad_permute
from .attention import _triton_selection, extra_parts, extra_rows
from .cubes import CubeLayout


def bsa_attention_backward_triton(q, k, v, grad_out, layout: CubeLayout, config, scale: float, n_prefix: int = 0,
                                  n_suffix: int = 0, out=None, lse=None):
    """q, k, v, grad_out [B, H, L, D] as the forward got them -> (dq, dk, dv) in q's dtype. out, lse: the
    forward's output and LSE (`bsa_attention(..., return_lse=True)`); without them the forward runs again.

    The kernels read Q and dO in cube order (one permute each). keep_ratio 1 (the default): every slot is its
    own row, dO's permute also gives delta = rowsum(dO * O), and the kernels write the gradients' raster rows
    themselves (in q's dtype when the video is the whole sequence). Below 1: the kept-query lists, a dropped
    query's output gradient summed onto the row it copied, the gradients scattered back from cube order."""
    q_in, k_in, v_in = q, k, v
    B, H, L, D = q.shape
    N, S = layout.num_cubes, layout.cube_volume
    (q, k, v), (q_cubes, _, k_cubes, _, v_cubes, k_pooled, v_pooled), selection, attended = _triton_selection(
        q, k, v, layout, config, scale, n_prefix, q_cubes=True)
    remainder = (k_pooled, v_pooled, attended) if config.pooled_remainder else None
    extra = extra_parts(L, n_prefix, n_suffix)
    k_extra, v_extra = extra_rows(k, extra), extra_rows(v, extra)
    # the rows in the forward LSE's order: at keep_ratio 1 every slot, each its own source, else the kept lists
    every_query = config.keep_ratio >= 1.0
    q_index = _every_slot(layout, B, H) if every_query else selection.q_index.contiguous()
    tables = (q_index, selection.kv_count, selection.kv_index, layout.slot_valid)
    delta = None
    if lse is None:
        out_kept, lse = block_sparse_attention(q_cubes, k_cubes, v_cubes, *tables, scale, k_extra, v_extra,
                                               remainder=remainder, return_lse=True)
        grad_cubes = cube_permute(grad_out, layout, n_prefix)
    elif every_query:  # dO to cubes and rowsum(dO * O) in one pass: O is read, not permuted
        out_kept = None
        grad_cubes, delta = grad_permute(grad_out, out, layout, n_prefix)
    else:
        out_kept = cube_permute(out, layout, n_prefix).gather(
            -2, q_index.clamp(min=0).long()[..., None].expand(-1, -1, -1, -1, D))
        grad_cubes = cube_permute(grad_out, layout, n_prefix)
    if every_query:
        # the kernels write the raster rows; with extra tokens they join those rows' gradients in fp32 below
        raster = [torch.empty(q.shape, dtype=q_in.dtype, device=q.device) if not extra else
                  torch.zeros(q.shape, dtype=torch.float32, device=q.device) for _ in range(3)]
        dq, dk, dv, dk_extra, dv_extra = block_sparse_attention_backward(
            q_cubes, k_cubes, v_cubes, *tables, out_kept, lse, grad_cubes, scale, k_extra, v_extra,
            remainder=remainder, raster=(layout, n_prefix, *raster), delta=delta)
        if not extra:
            return dq, dk, dv
    else:
        # every slot's output gradient, summed onto the kept row it copied (padding slots add nothing)
        source = selection.q_source.clamp(min=0).long()[..., None].expand(B, H, N, S, D)
        grad_kept = torch.zeros(*out_kept.shape, dtype=torch.float32, device=q.device).scatter_add_(
            -2, source, grad_cubes.float())
        dq_kept, dk_cubes, dv_cubes, dk_extra, dv_extra = block_sparse_attention_backward(
            q_cubes, k_cubes, v_cubes, *tables, out_kept, lse, grad_kept, scale, k_extra, v_extra, remainder=remainder)
        slot = torch.where(q_index >= 0, q_index, S).long()[..., None].expand(*dq_kept.shape)  # padding -> dump
        dq_cubes = torch.zeros(B, H, N, S + 1, D, dtype=torch.float32, device=q.device).scatter_(-2, slot, dq_kept)
        cubes = (dq_cubes[..., :S, :], dk_cubes, dv_cubes)
        if not extra:  # the video is the whole sequence: cast in cube order, one gather each
            return tuple(layout.to_raster(x.to(q_in.dtype)) for x in cubes)
        dq, dk, dv = (torch.zeros(B, H, L, D, dtype=torch.float32, device=q.device) for _ in range(3))
        video = slice(n_prefix, n_prefix + layout.num_tokens)
        for grad, x in zip((dq, dk, dv), cubes):
            grad[..., video, :] = layout.to_raster(x)
    for grad, extra_grad in ((dk, dk_extra), (dv, dv_extra)):
        grad[..., :n_prefix, :] += extra_grad[..., :n_prefix, :]
        grad[..., L - n_suffix:, :] += extra_grad[..., n_prefix:, :]
    # the extra tokens' own rows were dense attention over every key, in the inputs' dtype
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in (q_in, k_in, v_in)]
        rows = torch.nn.functional.scaled_dot_product_attention(
            extra_rows(leaves[0], extra), leaves[1], leaves[2], scale=scale)
        grad_rows = extra_rows(grad_out, extra).to(rows.dtype)
        for grad, extra_grad in zip((dq, dk, dv), torch.autograd.grad(rows, leaves, grad_rows)):
            grad += extra_grad.float()
    return tuple(x.to(q_in.dtype) for x in (dq, dk, dv))


def _every_slot(layout: CubeLayout, B: int, H: int) -> torch.Tensor:
    """[B, H, N, S] int32: every slot a row of its own, -1 on padding (the raster forward's LSE order)."""
    slots = torch.arange(layout.cube_volume, dtype=torch.int32, device=layout.slot_valid.device)
    return torch.where(layout.slot_valid, slots, -1).expand(B, H, -1, -1).contiguous()
