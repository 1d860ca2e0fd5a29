"""Public entry point: validate, normalise, dispatch to the Triton kernels or the reference."""
from __future__ import annotations

import math

import torch

from .config import BSAConfig
from .cubes import cube_layout
from .reference import bsa_attention_reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(q, k, v, grid, n_prefix: int = 0, n_suffix: int = 0, mask=None) -> str | None:
    """Why this call cannot be BSA self-attention (None when it can). Never raises."""
    if mask is not None:
        return "attention mask present"
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return f"not self-attention (q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"unsupported dtype {q.dtype}"
    if grid is None:
        return "unknown video grid"
    if len(grid) != 3 or min(grid) < 1:
        return f"bad grid {tuple(grid)}"
    if n_prefix < 0 or n_suffix < 0 or q.shape[-2] != n_prefix + math.prod(grid) + n_suffix:
        return f"token count {q.shape[-2]} != grid {tuple(grid)} + {n_prefix} + {n_suffix} extra"
    return None


def bsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, config: BSAConfig, *,
                  n_prefix: int = 0, n_suffix: int = 0, scale: float | None = None, backend: str = "auto"):
    """BSA self-attention. q, k, v [B, H, L, D], L = n_prefix + T*H*W + n_suffix, video in raster
    order. Returns (out [B, H, L, D] in q.dtype, BSASelection)."""
    reason = unsupported_reason(q, k, v, grid, n_prefix, n_suffix)
    if reason is not None:
        raise ValueError(f"q/k/v: {reason}")
    if backend not in ("auto", "reference"):
        raise ValueError(f"backend must be 'auto' or 'reference', got {backend!r}")
    layout = cube_layout(grid, config.cube_size, q.device)
    return bsa_attention_reference(q, k, v, layout, config, scale, n_prefix, n_suffix)
