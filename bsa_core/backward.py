"""Backward of one BSA call (BSA_SPEC "Backward"): dQ, dK, dV of the forward's sparse softmax, for the
selection the forward made, made again (a constant of the step: no gradient through pooling, ranking or
thresholds).

On CUDA the Triton kernels take it (`gpu_backward.py`: the forward's LSE recomputed, dQ over the
forward's table, dK/dV over the transposed one). The torch path, everywhere else, is float32 and
memory-bounded: the video rows go a chunk of query cubes at a time, each chunk's attention recomputed
with gradients on and differentiated at once, so only one chunk's intermediates are alive; the extra
(text / reference) rows go a chunk of rows at a time.
"""
from __future__ import annotations

import logging

import torch

from .attention import choose_backend, selection_of_call
from .config import BSAConfig
from .cubes import CubeLayout, cube_layout
from .reference import cube_mean
from .selection import BSASelection

_CHUNK_ELEMENTS = 1 << 24  # logits (or gathered keys) per chunk, like the reference's forward
log = logging.getLogger(__name__)
_kernel_failures: set = set()  # reasons already logged: one line per distinct failure


def bsa_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           grad_out: torch.Tensor, grid, config: BSAConfig, n_prefix: int, n_suffix: int,
                           scale: float, *, backend: str = "auto", lse: torch.Tensor | None = None):
    """(dq, dk, dv) [B, H, L, D] in the inputs' dtypes, for `out = bsa_attention(q, k, v, grid, config,
    n_prefix=..., n_suffix=..., scale=scale, backend=backend)` whose output received `grad_out`.

    backend: the one the forward was asked for, so the selection is made the same way (the Triton
    selection on CUDA, the reference's elsewhere). `out` and `lse` (the Triton forward's, from
    `bsa_attention(..., return_lse=True)`) spare the Triton backward a second forward; the torch path
    recomputes each chunk's output in float32 instead."""
    layout = cube_layout(grid, config.cube_size, q.device)
    if choose_backend(q, backend)[0] == "triton":
        from .gpu_backward import bsa_attention_backward_triton
        try:
            return bsa_attention_backward_triton(q, k, v, grad_out, layout, config, scale, n_prefix, n_suffix,
                                                 out=None if lse is None else out, lse=lse)
        except Exception as error:  # noqa: BLE001 - a kernel that cannot build here must not stop training
            reason = f"{type(error).__name__}: {error}"
            if reason not in _kernel_failures:
                _kernel_failures.add(reason)
                log.warning("[BSA] Triton backward failed (%s); using the PyTorch backward", reason)
    selection = selection_of_call(q, k, v, layout, config, scale, n_prefix, n_suffix, backend)
    dq, dk, dv = _backward_reference(q, k, v, grad_out, layout, selection, scale, n_prefix, n_suffix,
                                     config.pooled_remainder)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _backward_reference(q, k, v, grad_out, layout: CubeLayout, selection: BSASelection, scale: float,
                        n_prefix: int, n_suffix: int, pooled_remainder: bool):
    """float32 (dq, dk, dv) [B, H, L, D] of reference.bsa_attention_reference for this selection."""
    L = q.shape[-2]
    video = slice(n_prefix, L - n_suffix)
    extra = torch.cat([torch.arange(n_prefix), torch.arange(L - n_suffix, L)]).to(q.device)
    qc, kc, vc, gc = (layout.to_cubes(x[..., video, :].detach().float()) for x in (q, k, v, grad_out))
    k_extra, v_extra = (x.detach().index_select(-2, extra).float() for x in (k, v))
    dqc, dkc, dvc, dk_extra, dv_extra = _video_rows_backward(qc, kc, vc, gc, k_extra, v_extra, layout, selection,
                                                             scale, pooled_remainder)
    dq, dk, dv = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) for _ in range(3))
    for grad, grad_cubes in ((dq, dqc), (dk, dkc), (dv, dvc)):
        grad[..., video, :] = layout.to_raster(grad_cubes)
    if extra.numel():
        dk.index_add_(-2, extra, dk_extra)
        dv.index_add_(-2, extra, dv_extra)
        _extra_rows_backward(q, k, v, grad_out, extra, scale, dq, dk, dv)
    return dq, dk, dv


def _video_rows_backward(qc, kc, vc, gc, k_extra, v_extra, layout: CubeLayout, selection: BSASelection,
                         scale: float, pooled_remainder: bool):
    """Cube-order gradients [B,H,N,S,D] of the video rows' attention, plus those of the extra keys/values
    [B,H,E,D]. Per chunk of query cubes the kept queries attend, in one softmax, their selected cubes'
    valid keys (gathered: a chunk never touches unselected keys), every extra key and, with the pooled
    remainder, each skipped cube as one key (mean key, logit bias log(n_valid), mean value)."""
    B, H, N, S, D = qc.shape
    q_index = selection.q_index.clamp(min=0).long()[..., None].expand(*selection.q_index.shape, D)
    q_kept = qc.gather(-2, q_index)  # [B,H,N,Kq,D]; rows past q_count repeat slot 0 and get no gradient
    # a dropped query's output is its source's copy: its output gradient joins the source's
    source = selection.q_source.clamp(min=0).long()[..., None].expand(B, H, N, S, D)
    g_kept = torch.zeros_like(q_kept).scatter_add_(-2, source, gc)  # padding slots carry zero gradient
    width = max(1, int(selection.kv_count.max()))
    kv_index = selection.kv_index[..., :width].long()  # [B,H,N,Kkv]
    key_groups = [(k_extra, v_extra, None)] if k_extra.shape[-2] else []
    if pooled_remainder:
        k_bar, v_bar = cube_mean(kc, layout), cube_mean(vc, layout)
        attended = selection.to_dense()  # [B,H,N,N]: these cubes are attended token by token, not pooled
        key_groups.append((k_bar, v_bar, torch.log(layout.n_valid.float())))
    leaves = [t.requires_grad_() for group in key_groups for t in group[:2]]
    group_grads = [torch.zeros_like(t) for t in leaves]

    dq_kept = torch.zeros_like(q_kept)
    dkc, dvc = torch.zeros_like(kc), torch.zeros_like(vc)
    per_cube = B * H * (q_kept.shape[-2] * (width * S + k_extra.shape[-2] + N) + 2 * width * S * D)
    chunk = max(1, _CHUNK_ELEMENTS // per_cube)
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        cubes = kv_index[:, :, n0:n1]  # [B,H,c,Kkv]
        key_valid = (cubes >= 0)[..., None] & layout.slot_valid[cubes.clamp(min=0)]  # [B,H,c,Kkv,S]
        gather = cubes.clamp(min=0).reshape(B * H, -1, 1).expand(-1, -1, S * D)  # [B*H, c*Kkv, S*D]
        keys, values = (x.reshape(B * H, N, S * D).gather(1, gather).detach().requires_grad_() for x in (kc, vc))
        with torch.enable_grad():
            q_chunk = q_kept[:, :, n0:n1].detach().requires_grad_()
            logits = [torch.einsum("bhnqd,bhnkd->bhnqk", q_chunk, keys.view(B, H, n1 - n0, -1, D)) * scale]
            logits[0] = logits[0].masked_fill(~key_valid.view(B, H, n1 - n0, 1, -1), float("-inf"))
            for group_keys, _, bias in key_groups:
                group_logits = torch.einsum("bhnqd,bhed->bhnqe", q_chunk, group_keys) * scale
                if bias is not None:  # the pooled remainder: only the cubes this query cube skipped
                    group_logits = (group_logits + bias).masked_fill(attended[:, :, n0:n1, None, :], float("-inf"))
                logits.append(group_logits)
            weights = torch.softmax(torch.cat(logits, -1), -1).split([part.shape[-1] for part in logits], -1)
            out = torch.einsum("bhnqk,bhnkd->bhnqd", weights[0], values.view(B, H, n1 - n0, -1, D))
            for group_weights, (_, group_values, _) in zip(weights[1:], key_groups):
                out = out + torch.einsum("bhnqe,bhed->bhnqd", group_weights, group_values)
            grads = torch.autograd.grad(out, [q_chunk, keys, values, *leaves], g_kept[:, :, n0:n1])
        dq_kept[:, :, n0:n1] = grads[0]
        dkc.view(B * H, N, S * D).scatter_add_(1, gather, grads[1])
        dvc.view(B * H, N, S * D).scatter_add_(1, gather, grads[2])
        for total, grad in zip(group_grads, grads[3:]):
            total += grad

    dqc = torch.zeros_like(qc).scatter_add_(-2, q_index, dq_kept * (selection.q_index >= 0)[..., None])
    dk_extra, dv_extra = group_grads[:2] if k_extra.shape[-2] else (torch.zeros_like(k_extra),) * 2
    if pooled_remainder:  # k_bar, v_bar are means of the cube's valid rows: spread their gradient over them
        spread = layout.slot_valid[..., None] / layout.n_valid[:, None, None].float()  # [N,S,1]
        dkc += group_grads[-2][..., None, :] * spread
        dvc += group_grads[-1][..., None, :] * spread
    return dqc, dkc, dvc, dk_extra, dv_extra


def _extra_rows_backward(q, k, v, grad_out, extra, scale: float, dq, dk, dv):
    """Adds the gradients of the extra tokens' rows (dense attention over every key) into dq, dk, dv,
    a chunk of rows at a time so no [rows, L] block exceeds the chunk."""
    B, H, L, D = q.shape
    keys, values = (x.detach().float().requires_grad_() for x in (k, v))
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (B * H * L))
    for r0 in range(0, extra.numel(), rows_per_chunk):
        rows = extra[r0:r0 + rows_per_chunk]
        with torch.enable_grad():
            q_rows = q.detach().index_select(-2, rows).float().requires_grad_()
            out = torch.nn.functional.scaled_dot_product_attention(q_rows, keys, values, scale=scale)
            d_rows, d_keys, d_values = torch.autograd.grad(out, [q_rows, keys, values],
                                                           grad_out.index_select(-2, rows).float())
        dq.index_copy_(-2, rows, d_rows)
        dk += d_keys
        dv += d_values
