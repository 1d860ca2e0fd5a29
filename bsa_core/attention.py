"""Public entry point: validate, normalise, dispatch to the Triton kernels (CUDA) or the reference."""
from __future__ import annotations

import math

import torch

from .config import BSAConfig
from .cubes import CubeLayout, cube_layout
from .reference import bsa_attention_reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (32, 64, 128, 256)
BACKENDS = ("auto", "triton", "reference")


def unsupported_reason(q, k, v, grid, n_prefix: int = 0, n_suffix: int = 0, mask=None) -> str | None:
    """Why this call cannot be BSA self-attention (None when it can). Never raises."""
    if mask is not None:
        return "attention mask present"
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return f"not self-attention (q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"unsupported dtype {q.dtype}"
    if k.device != q.device or v.device != q.device:
        return "q, k, v on different devices"
    if grid is None:
        return "unknown video grid"
    if len(grid) != 3 or min(grid) < 1:
        return f"bad grid {tuple(grid)}"
    if n_prefix < 0 or n_suffix < 0 or q.shape[-2] != n_prefix + math.prod(grid) + n_suffix:
        return f"token count {q.shape[-2]} != grid {tuple(grid)} + {n_prefix} + {n_suffix} extra"
    return None


def kernel_reason(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take this call (None when they can): they need CUDA sm80+."""
    if not q.is_cuda:
        return f"device {q.device.type} (kernels need CUDA)"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "GPU older than sm80"
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} not in {KERNEL_HEAD_DIMS}"
    return None


def choose_backend(q: torch.Tensor, backend: str = "auto") -> tuple[str, str]:
    """(backend, why): 'triton' on CUDA where the kernels fit, else 'reference'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference", "asked for"
    reason = kernel_reason(q)
    if reason is None:
        return "triton", f"CUDA {torch.cuda.get_device_name(q.device)}"
    if backend == "triton":
        raise ValueError(f"backend 'triton' cannot run this call: {reason}")
    return "reference", reason


def bsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, config: BSAConfig, *,
                  n_prefix: int = 0, n_suffix: int = 0, scale: float | None = None, backend: str = "auto"):
    """BSA self-attention. q, k, v [B, H, L, D], L = n_prefix + T*H*W + n_suffix, video in raster
    order; the extra tokens are never pruned and always attended. Returns (out [B, H, L, D] in
    q.dtype, BSASelection)."""
    reason = unsupported_reason(q, k, v, grid, n_prefix, n_suffix)
    if reason is not None:
        raise ValueError(f"q/k/v: {reason}")
    name, _ = choose_backend(q, backend)
    layout = cube_layout(grid, config.cube_size, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if name == "triton":
        return _bsa_attention_triton(q, k, v, layout, config, scale, n_prefix, n_suffix)
    return bsa_attention_reference(q, k, v, layout, config, scale, n_prefix, n_suffix)


def _bsa_attention_triton(q, k, v, layout: CubeLayout, config: BSAConfig, scale: float, n_prefix: int,
                          n_suffix: int):
    """permute (+ pooled keys) -> select -> block-sparse attention -> scatter back to raster order."""
    from ..kernels.block_sparse_attention import block_sparse_attention
    from ..kernels.bsa_select import select_triton
    from ..kernels.cube_permute import cube_permute
    from ..kernels.output_scatter import output_scatter

    q_cubes = cube_permute(q, layout, n_prefix)
    k_cubes, k_bar = cube_permute(k, layout, n_prefix, with_mean=True)
    v_cubes = cube_permute(v, layout, n_prefix)
    selection = select_triton(q_cubes, k_cubes, layout, config, scale, k_bar=k_bar)
    L = q.shape[-2]
    extra = None
    if n_prefix or n_suffix:
        extra = torch.cat([torch.arange(n_prefix), torch.arange(L - n_suffix, L)]).to(q.device)
    k_extra = None if extra is None else k.index_select(-2, extra).contiguous()
    v_extra = None if extra is None else v.index_select(-2, extra).contiguous()
    out_kept = block_sparse_attention(q_cubes, k_cubes, v_cubes, selection.q_index, selection.kv_count,
                                      selection.kv_index, layout.slot_valid, scale, k_extra, v_extra)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    output_scatter(out_kept, selection.q_source, layout, out, n_prefix)
    if extra is not None:
        # extra tokens (text, reference frames) are never pruned: dense rows over every key
        out[..., extra, :] = torch.nn.functional.scaled_dot_product_attention(
            q.index_select(-2, extra), k, v, scale=scale).to(q.dtype)
    return out, selection
