"""Public entry point: validate, normalise, dispatch to the Triton kernels (CUDA) or the reference."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..kernels.cube_index import kept_width
from .call_graphs import active_call_graphs
from .config import BSAConfig
from .cubes import CubeLayout, cube_layout
from .custom_ops import CUDAGRAPH_UNSAFE, custom_op_once
from .reference import bsa_attention_reference, bsa_select
from .selection import BSASelection

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "reference")


def _problem(q, k, v, grid, n_prefix, n_suffix) -> str | None:
    """What is wrong with a call's arguments, as a sentence that starts with the argument's name; None if
    nothing. Shared by unsupported_reason (the patch: logged, dense) and bsa_attention (raises)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} must be a 4-D tensor [B, H, L, D], got {getattr(t, 'shape', type(t).__name__)}"
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            return f"{name} must have q's shape {tuple(q.shape)} (self-attention), got {tuple(t.shape)}"
    if q.numel() == 0:
        return f"q is empty: shape {tuple(q.shape)}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has unsupported dtype {t.dtype} (float16, bfloat16 or float32)"
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            return f"{name} has dtype {t.dtype}, q has {q.dtype}: q, k and v must share one dtype"
        if t.device != q.device:
            return f"{name} is on {t.device}, q on {q.device}"
    if grid is None:
        return "grid unknown (unknown video grid)"
    if not _is_int_triple(grid):
        return f"grid must be three integers >= 1 (T, H, W), got {tuple(grid) if _is_seq(grid) else grid!r}"
    for name, n in (("n_prefix", n_prefix), ("n_suffix", n_suffix)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return f"{name} must be an integer >= 0, got {n!r}"
    if q.shape[-2] != n_prefix + math.prod(grid) + n_suffix:
        return (f"n_suffix / grid do not add up: q has {q.shape[-2]} tokens, n_prefix {n_prefix} + grid "
                f"{tuple(grid)} ({math.prod(grid)}) + n_suffix {n_suffix} = {n_prefix + math.prod(grid) + n_suffix}")
    return None


def _is_seq(value) -> bool:
    return isinstance(value, (tuple, list, torch.Size))


def _is_int_triple(grid) -> bool:
    return (_is_seq(grid) and len(grid) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid))


def unsupported_reason(q, k, v, grid, n_prefix: int = 0, n_suffix: int = 0, mask=None) -> str | None:
    """Why this call cannot be BSA self-attention (None when it can). Never raises."""
    if mask is not None:
        return "attention mask present"
    if isinstance(k, torch.Tensor) and isinstance(q, torch.Tensor) and k.dim() == q.dim() == 4 and k.shape != q.shape:
        return f"not self-attention (q {tuple(q.shape)}, k {tuple(k.shape)})"
    if grid is None:
        return "unknown video grid"
    return _problem(q, k, v, grid, n_prefix, n_suffix)


def kernel_reason(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take this call (None when they can): they need CUDA sm80+."""
    if not q.is_cuda:
        return f"device {q.device.type} (kernels need CUDA)"
    return _cuda_kernel_reason(q.device.index, q.shape[-1])


# The CUDA queries below are constants to torch.compile (run once while tracing, not traced): inside the graph
# they broke it in every block on an H200 (torch 2.11), and Dynamo then recompiled the block frames past its limit.
# Eager, each is asked twice a call: answered from a dict (a device query costs ~10 us of host work; Dynamo traces
# through functools.lru_cache, so that is no way to cache them).
_device_answers: dict = {}


@torch.compiler.assume_constant_result
def _cuda_kernel_reason(device_index: int, head_dim: int) -> str | None:
    key = ("kernel_reason", device_index, head_dim)
    if key not in _device_answers:
        _device_answers[key] = _kernel_reason_uncached(device_index, head_dim)
    return _device_answers[key]


def _kernel_reason_uncached(device_index: int, head_dim: int) -> str | None:
    if torch.cuda.get_device_capability(device_index) < (8, 0):
        return "GPU older than sm80"
    from ..kernels.block_sparse_attention import HEAD_DIMS  # imported here: CUDA machines have Triton
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} not in {HEAD_DIMS}"
    return None


@torch.compiler.assume_constant_result
def _cuda_device_name(device_index: int) -> str:
    key = ("name", device_index)
    if key not in _device_answers:
        _device_answers[key] = torch.cuda.get_device_name(device_index)
    return _device_answers[key]


def choose_backend(q: torch.Tensor, backend: str = "auto") -> tuple[str, str]:
    """(backend, why): 'triton' on CUDA where the kernels fit, else 'reference'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference", "asked for"
    reason = kernel_reason(q)
    if reason is None:
        return "triton", f"CUDA {_cuda_device_name(q.device.index)}"
    if backend == "triton":
        raise ValueError(f"backend 'triton' cannot run this call: {reason}")
    return "reference", reason


def bsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, config: BSAConfig, *,
                  n_prefix: int = 0, n_suffix: int = 0, scale: float | None = None, backend: str = "auto",
                  return_lse: bool = False):
    """BSA self-attention. q, k, v [B, H, L, D], L = n_prefix + T*H*W + n_suffix, video in raster
    order; the extra tokens are never pruned and always attended. Returns (out [B, H, L, D] in
    q.dtype, BSASelection), and with return_lse also the forward's log2-domain log-sum-exp of the video
    rows the kernels computed ([B, H, *lse_shape] fp32; None on the reference path),
    which spares the backward a second forward."""
    problem = _problem(q, k, v, grid, n_prefix, n_suffix)
    if problem is not None:
        raise ValueError(problem)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    name, _ = choose_backend(q, backend)
    layout = cube_layout(grid, config.cube_size, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if name == "triton":
        out, selection, lse = _bsa_attention_triton(q, k, v, layout, config, scale, n_prefix, n_suffix)
    else:
        (out, selection), lse = bsa_attention_reference(q, k, v, layout, config, scale, n_prefix, n_suffix), None
    return (out, selection, lse) if return_lse else (out, selection)


def lse_shape(grid, cube_size, keep_ratio: float) -> tuple[int, int]:
    """(cubes, rows per cube) of the forward's saved log-sum-exp: every slot at keep_ratio 1 (slot order;
    a padding slot's value unspecified and unused), else the kept-query lists' width (selection.q_index's
    order). Host numbers only."""
    cubes = math.prod(-(-g // c) for g, c in zip(grid, cube_size))
    return cubes, math.prod(cube_size) if keep_ratio >= 1.0 else kept_width(grid, cube_size, keep_ratio)


# Masked keys get weight exp(-1e4 + logit) == 0 in fp32: dropping them is exact.
MASKED_KEY_LOGIT = -1.0e4


@dataclass(frozen=True)
class KeyMaskPlan:
    """How to run BSA under a key mask, worked out once per mask: per group of batch rows (all rows when
    the mask is shared) the kept and the hidden token indices (on the device) and how many hidden tokens
    sit before / after the video (host numbers), so a call needs no read-back from the GPU."""

    groups: tuple[tuple[slice, torch.Tensor, torch.Tensor, int, int], ...]


def key_mask_plan(mask, batch: int, n_tokens: int, n_prefix: int, n_suffix: int):
    """(KeyMaskPlan or None, reason): an attention mask BSA can honour exactly hides only extra
    (prefix/suffix) keys, the same for every query and head. Bool masks: True = attend; float masks are
    additive: 0 = attend, <= -1e4 = hidden. Reads the mask back to the host (call once per mask). Never raises."""
    # ComfyUI's backends read a mask as [Lq, Lk], [B, Lq, Lk] or [B, H, Lq, Lk]
    full = mask.reshape(1, 1, *mask.shape) if mask.dim() == 2 else mask.unsqueeze(1) if mask.dim() == 3 else mask
    if full.dim() != 4 or full.shape[-1] != n_tokens or full.shape[1] != 1 or full.shape[2] != 1:
        return None, f"attention mask of shape {tuple(mask.shape)} is not a key mask"
    rows = full.reshape(-1, n_tokens)
    if rows.shape[0] not in (1, batch):
        return None, f"attention mask of shape {tuple(mask.shape)} is not a key mask"
    keys = rows if rows.dtype == torch.bool else rows == 0
    host = torch.stack([keys, rows <= MASKED_KEY_LOGIT if rows.dtype != torch.bool else ~keys]).cpu()
    keys_host, hidden_host = host[0], host[1]
    if not bool((keys_host | hidden_host).all()):
        return None, "attention mask has soft (not 0 / -inf) values"
    if not bool(keys_host[:, n_prefix:n_tokens - n_suffix].all()):
        return None, "attention mask hides video tokens"
    groups = []
    for index, row in enumerate(keys_host):
        rows_of = slice(None) if keys_host.shape[0] == 1 else slice(index, index + 1)
        hidden_prefix = int((~row[:n_prefix]).sum())
        hidden_suffix = int((~row).sum()) - hidden_prefix
        groups.append((rows_of, row.nonzero().flatten().to(mask.device), (~row).nonzero().flatten().to(mask.device),
                       hidden_prefix, hidden_suffix))
    return KeyMaskPlan(tuple(groups)), None


def bsa_attention_key_masked(q, k, v, grid, config: BSAConfig, plan: KeyMaskPlan, *, n_prefix: int = 0,
                             n_suffix: int = 0, scale: float | None = None, backend: str = "auto",
                             thresholds: torch.Tensor | None = None):
    """BSA where `plan` (from key_mask_plan) hides some extra keys: equals masked dense attention. The hidden
    tokens drop out of the sequence; their queries attend the kept keys densely. Returns (out, kept
    query fraction, kept KV fraction) like bsa_attention_op, the fractions averaged over batch rows."""
    outs, kept_q, kept_kv = [], 0.0, 0.0
    for rows, kept, hidden, hidden_prefix, hidden_suffix in plan.groups:
        qs, ks, vs = (t[rows].index_select(-2, kept) for t in (q, k, v))
        out_kept, fq, fkv = bsa_attention_op(qs, ks, vs, grid, config, n_prefix=n_prefix - hidden_prefix,
                                             n_suffix=n_suffix - hidden_suffix, scale=scale, backend=backend,
                                             thresholds=thresholds)
        out = torch.empty(q[rows].shape, dtype=q.dtype, device=q.device)
        out.index_copy_(-2, kept, out_kept)
        if hidden_prefix + hidden_suffix:
            out.index_copy_(-2, hidden, torch.nn.functional.scaled_dot_product_attention(
                q[rows].index_select(-2, hidden), ks, vs, scale=scale).to(q.dtype))
        outs.append(out)
        kept_q, kept_kv = kept_q + fq / len(plan.groups), kept_kv + fkv / len(plan.groups)
    return torch.cat(outs), kept_q, kept_kv


def threshold_tensor(config: BSAConfig) -> torch.Tensor:
    """(kv_threshold, stat_lambda) as the op takes them: a CPU tensor, whose values a compiled graph does not
    guard on (floats it would), so a compiled model takes another threshold without compiling again."""
    return torch.tensor([config.kv_threshold, config.stat_lambda], dtype=torch.float64)


def _op_config(cube_size, keep_ratio: float, thresholds, threshold_mode: str, min_blocks: int,
               pooled_remainder: bool) -> BSAConfig:
    """The op's settings as a BSAConfig; thresholds: threshold_tensor's tensor or its two numbers."""
    kv_threshold, stat_lambda = thresholds.tolist() if isinstance(thresholds, torch.Tensor) else thresholds
    return BSAConfig(tuple(cube_size), keep_ratio, kv_threshold, threshold_mode, stat_lambda, min_blocks,
                     pooled_remainder)


def _bsa_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: list[int], cube_size: list[int],
                        keep_ratio: float, thresholds: torch.Tensor, threshold_mode: str, min_blocks: int,
                        pooled_remainder: bool, n_prefix: int, n_suffix: int, scale: float,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    settings = _call_settings(grid, cube_size, keep_ratio, thresholds, threshold_mode, min_blocks, pooled_remainder,
                              n_prefix, n_suffix, scale, backend)
    return _replayed_or_launched(q, k, v, settings, 4)


def _call_settings(grid, cube_size, keep_ratio, thresholds, threshold_mode, min_blocks, pooled_remainder, n_prefix,
                   n_suffix, scale, backend) -> tuple:
    """The op's arguments besides q, k, v as one hashable tuple: what decides its launches."""
    return (tuple(grid), tuple(cube_size), keep_ratio, tuple(thresholds.tolist()), threshold_mode, min_blocks,
            pooled_remainder, n_prefix, n_suffix, scale, backend)


def _replayed_or_launched(q, k, v, settings, outputs: int):
    """The op's first `outputs` outputs, replayed from the run's CUDA graph of these settings where there is
    one (bsa_core/call_graphs.py), else launched."""
    launch = functools.partial(_bsa_attention_launch, settings=settings)
    graphs = active_call_graphs()
    replayed = None if graphs is None else graphs.run(launch, (q, k, v), settings, outputs)
    return launch(q, k, v)[:outputs] if replayed is None else replayed


def _bsa_attention_launch(q, k, v, settings):
    """The op's outputs, launched (`_bsa_attention_impl` may replay them from a CUDA graph instead)."""
    grid, cube_size, keep_ratio, thresholds, threshold_mode, min_blocks, pooled_remainder, n_prefix, n_suffix, \
        scale, backend = settings
    config = _op_config(cube_size, keep_ratio, thresholds, threshold_mode, min_blocks, pooled_remainder)
    out, selection, lse = bsa_attention(q, k, v, grid, config, n_prefix=n_prefix, n_suffix=n_suffix,
                                        scale=scale, backend=backend, return_lse=True)
    if config.keep_ratio >= 1.0:  # every query kept: no reduction to launch
        kept_queries = q.new_ones((), dtype=torch.float64)
    else:
        kept_queries = selection.kept_query_fraction(cube_layout(grid, config.cube_size, q.device).n_valid)
    return out, kept_queries, selection.kept_kv_fraction(), _lse_or_empty(lse, q)


def _lse_or_empty(lse: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """The op's fourth output: the forward's LSE, or an empty tensor where the reference ran (it has none)."""
    return q.new_empty(0, dtype=torch.float32) if lse is None else lse


def _bsa_attention_fake(q, k, v, grid, cube_size, keep_ratio, thresholds, threshold_mode, min_blocks,
                        pooled_remainder, n_prefix, n_suffix, scale, backend):
    fraction = q.new_empty((), dtype=torch.float64)
    lse = None
    if choose_backend(q, backend)[0] == "triton":  # the same choice the real call makes
        lse = q.new_empty(*q.shape[:2], *lse_shape(grid, cube_size, keep_ratio), dtype=torch.float32)
    # contiguous like the real output, whatever q's strides: a compiled graph reshapes it as a view
    return q.new_empty(q.shape), fraction, torch.empty_like(fraction), _lse_or_empty(lse, q)


def _bsa_attention_setup_context(ctx, inputs, output):
    q, k, v, *call = inputs
    ctx.save_for_backward(q, k, v, output[0], output[3])
    # the kept fractions are counts and the LSE a saved statistic: marked so that a run's stats summing
    # them keep no autograd graph alive
    ctx.mark_non_differentiable(*output[1:])
    ctx.call = call  # grid, cube_size, the config's settings, n_prefix, n_suffix, scale, backend


def _bsa_attention_grad(ctx, grad_out, _grad_kept_queries, _grad_kept_kv, _grad_lse):
    """dq, dk, dv for the op's inputs (the kept fractions are counts: no gradient reaches them)."""
    from .backward import bsa_attention_backward  # backward.py imports this module

    grid, *settings, n_prefix, n_suffix, scale, backend = ctx.call
    config = _op_config(*settings)
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = bsa_attention_backward(q, k, v, out, grad_out, tuple(grid), config, n_prefix, n_suffix, scale,
                                        backend=backend, lse=lse if lse.numel() else None)
    return (dq, dk, dv) + (None,) * len(ctx.call)


_bsa_attention_op = custom_op_once("attention", _bsa_attention_impl, _bsa_attention_fake, _bsa_attention_grad,
                                   _bsa_attention_setup_context, tags=CUDAGRAPH_UNSAFE)


def bsa_attention_op(q, k, v, grid, config: BSAConfig, *, n_prefix: int = 0, n_suffix: int = 0,
                     scale: float | None = None, backend: str = "auto", thresholds: torch.Tensor | None = None):
    """bsa_attention as the torch custom op bsa::attention, so torch.compile (ComfyUI's TorchCompileModel)
    treats it as one opaque call instead of tracing the data-dependent selection. Returns (out
    [B, H, L, D], kept query fraction, kept KV-cube fraction), the fractions as 0-d float64 tensors.
    thresholds: threshold_tensor(config), made once outside the compiled model (the BSA patch's options)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    thresholds = threshold_tensor(config) if thresholds is None else thresholds
    args = (q, k, v, [int(n) for n in grid], list(config.cube_size), float(config.keep_ratio), thresholds,
            config.threshold_mode, int(config.min_blocks), bool(config.pooled_remainder), int(n_prefix), int(n_suffix),
            scale, backend)
    if (not torch.compiler.is_compiling() and active_call_graphs() is not None
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))):
        # an eager call of a sampling run that autograd does not record: the op's body without the dispatcher's
        # ~0.1 ms of host work (bench/host_probe.py), and no copy of the LSE, which only a backward reads; short
        # videos run at the host's pace
        return _replayed_or_launched(q, k, v, _call_settings(*args[3:]), 3)
    return _bsa_attention_op(*args)[:3]  # the fourth output, the LSE, is the backward's


def selection_of_call(q, k, v, layout: CubeLayout, config: BSAConfig, scale: float, n_prefix: int, n_suffix: int,
                      backend: str = "auto") -> BSASelection:
    """The selection bsa_attention makes for this call, made again the same way (same backend, same
    inputs): deterministic, so a backward or a checkpoint recompute gets the forward's cubes."""
    if choose_backend(q, backend)[0] == "triton":
        return _triton_selection(q, k, v, layout, config, scale, n_prefix)[2]
    video = slice(n_prefix, q.shape[-2] - n_suffix)
    return bsa_select(layout.to_cubes(q[..., video, :]), layout.to_cubes(k[..., video, :]), layout, config, scale)


def _triton_selection(q, k, v, layout: CubeLayout, config: BSAConfig, scale: float, n_prefix: int,
                      q_cubes: bool = False, raster_kv: bool = False, has_extra: bool = False):
    """The Triton path's first half: Q/K/V in the kernels' dtype, permuted to cube order (+ pooled means, one
    launch) and selected. Q's cubes are written below keep_ratio 1 (query selection reads them) or when
    `q_cubes` asks (the backward); its mean is the same bits either way. With `raster_kv`, K and V are only
    pooled where the Gluon Hopper kernel can read them from the raster (`raster_kv_reason`; their cubes come
    back None). Returns ((q, k, v) in the kernels' dtype, permute_qkv's outputs, selection, dense selection
    mask)."""
    from ..kernels.block_sparse_attention import raster_kv_reason
    from ..kernels.cube_permute import permute_qkv
    from .gpu_select import select_triton

    if q.dtype == torch.float32:  # the MMA path is 16-bit: compute in bf16, return fp32
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    if q.stride(-1) != 1:  # the attention kernel reads Q rows as vectors (the permutes take any strides)
        q = q.contiguous()
    kv_cubes = not (raster_kv and config.keep_ratio >= 1.0
                    and raster_kv_reason(q, k, v, layout, n_prefix, has_extra) is None)
    permuted = permute_qkv(q, k, v, layout, n_prefix, q_cubes=q_cubes or config.keep_ratio < 1.0,
                           q_mean=config.keep_ratio >= 1.0, pooled=config.pooled_remainder, kv_cubes=kv_cubes)
    q_cube_rows, q_bar, k_cubes, k_bar = permuted[:4]
    selection, attended = select_triton(q_cube_rows, k_cubes, layout, config, scale, k_bar=k_bar, q_bar=q_bar,
                                        return_mask=True)
    return (q, k, v), permuted, selection, attended


def extra_parts(L: int, n_prefix: int, n_suffix: int) -> list[slice]:
    """The rows of the extra (never pruned) tokens: the prefix and the suffix, where present."""
    return [slice(0, n_prefix)] * bool(n_prefix) + [slice(L - n_suffix, L)] * bool(n_suffix)


def extra_rows(x: torch.Tensor, parts: list[slice]) -> torch.Tensor | None:
    """x's extra-token rows [..., E, D] in order (None without extra tokens)."""
    return torch.cat([x[..., part, :] for part in parts], -2) if parts else None


def _bsa_attention_triton(q, k, v, layout: CubeLayout, config: BSAConfig, scale: float, n_prefix: int,
                          n_suffix: int):
    """permute Q/K/V (+ pooled means, one launch) -> select -> block-sparse attention -> raster output.
    Returns (out, selection, the kernel's LSE [B, H, *lse_shape]: one fp32 per row, written by the kernel).

    keep_ratio 1 (the default): Q is only pooled (one read); the attention kernel reads Q's raster rows
    and writes the output rows itself; on the Gluon Hopper kernel it reads K's and V's raster rows too, and the
    permute only pools them. Below 1: Q is permuted for query selection, the kernel computes
    the kept queries, and the scatter copies every dropped query's source row."""
    from ..kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_raster
    from ..kernels.output_scatter import output_scatter

    q_in, k_in, v_in = q, k, v  # the extra tokens' dense rows use these: exact in every dtype
    L = q.shape[-2]
    extra = extra_parts(L, n_prefix, n_suffix)
    (q, k, v), (q_cubes, _, k_cubes, _, v_cubes, k_pooled, v_pooled), selection, attended = _triton_selection(
        q, k, v, layout, config, scale, n_prefix, raster_kv=True, has_extra=bool(extra))
    remainder = (k_pooled, v_pooled, attended) if config.pooled_remainder else None
    k_extra, v_extra = extra_rows(k, extra), extra_rows(v, extra)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, as the op's fake promises
    if config.keep_ratio >= 1.0:
        _, lse = block_sparse_attention_raster(q, k_cubes, v_cubes, layout, selection.kv_count, selection.kv_index,
                                               out, n_prefix, scale, k_extra, v_extra, remainder=remainder,
                                               return_lse=True, selection_mask=attended,
                                               kv_raster=(k, v) if k_cubes is None else None)
    else:
        out_kept, lse = block_sparse_attention(q_cubes, k_cubes, v_cubes, selection.q_index, selection.kv_count,
                                               selection.kv_index, layout.slot_valid, scale, k_extra, v_extra,
                                               remainder=remainder, return_lse=True)
        output_scatter(out_kept, selection.q_source, layout, out, n_prefix)
    out = out.to(q_in.dtype)
    if extra:
        # extra tokens (text, reference frames) are never pruned: dense rows over every key
        rows = torch.nn.functional.scaled_dot_product_attention(
            extra_rows(q_in, extra), k_in, v_in, scale=scale)
        out[..., :n_prefix, :] = rows[..., :n_prefix, :]
        out[..., L - n_suffix:, :] = rows[..., n_prefix:, :]
    return out, selection, lse
