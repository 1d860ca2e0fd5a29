"""Activation rows -> FP8 e4m3 for torch._scaled_mm's row-wise scaling, in one pass over x.

x [M, K] (float32, float16 or bfloat16; unit column stride, any row stride) is divided by its row's scale,
saturated to +-448 and rounded to the nearest e4m3 value (ties to even); the [M, 1] float32 scales that the
row-wise _scaled_mm reads are written beside it. The scale is one value for every row (read from a device
tensor, so a scale chosen per model call costs no host sync), one given per row, or each row's own
absmax / 448 (DYNAMIC: a first loop over the row finds it; the second re-reads the row, mostly from L2).

The numbers are compression.fp8's, bit for bit: to_e4m3(x, scale), and token_scales(x) for DYNAMIC. The kernel
rounds in float32 itself and casts only values that e4m3 holds exactly, so Triton's interpreter (whose
float32 -> fp8 cast mis-rounds values that round up into the next binade) gives the GPU's bits. It copies the
sign as a bit instead of negating: Triton 3.6 compiles -x as 0 - x, +0 for x = +0, so a negative x that
rounds to zero came out +0 where torch's cast gives -0 (why the H200 bench printed bits == to_e4m3: NO).
compression.fp8.kernel_bit_differences(x, scale) names any quantity that differs, and where.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)
_INV_E4M3_MAX = tl.constexpr(1.0 / 448.0)  # token_scales multiplies by the float32 reciprocal too
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (y + M) - M rounds |y| < 2**22 to an integer, ties to even
_SIGN_BIT = tl.constexpr(-0x80000000)  # int32 with the sign bit alone
_SCALE_SHARED, _SCALE_ROWS, _SCALE_DYNAMIC = 0, 1, 2
_BLOCK_M, _BLOCK_K = 4, 512


@triton.jit
def _round_to_e4m3(y):
    """float32 y within +-448 -> the nearest e4m3 value, as float32 (3 mantissa bits; below 2**-6 the
    subnormal step 2**-9). y's sign bit is copied onto the rounded magnitude, so -0 stays -0 whatever -x
    compiles to."""
    bits = y.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    up = ((130 - exponent) << 23).to(tl.float32, bitcast=True)  # 2**(3 - exponent): mantissa to an integer
    down = ((exponent + 124) << 23).to(tl.float32, bitcast=True)  # 2**(exponent - 3)
    magnitude = ((tl.abs(y) * up + _RNE_MAGIC) - _RNE_MAGIC) * down  # both scalings exact (powers of two)
    return (magnitude.to(tl.int32, bitcast=True) | (bits & _SIGN_BIT)).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_fp8_kernel(X, Scale, Out, OutScale, M, K, stride_xm,
                         SCALE_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xm
    out_rows = Out + rows.to(tl.int64)[:, None] * K
    if SCALE_MODE == 0:
        scale = tl.load(Scale) + tl.zeros([BLOCK_M], dtype=tl.float32)
    elif SCALE_MODE == 1:
        scale = tl.load(Scale + rows, mask=row_ok, other=1.0)
    else:
        absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        scale = tl.where(absmax > 0, absmax * _INV_E4M3_MAX, 1.0)
    tl.store(OutScale + rows, scale, mask=row_ok)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.div_rn(x, scale[:, None]), -E4M3_MAX), E4M3_MAX)
        tl.store(out_rows + cols[None, :], _round_to_e4m3(y).to(tl.float8e4nv), mask=mask)


def quantize_fp8_rows(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K] contiguous, float32 scales [M, 1]) with x ~ e4m3 * scales.

    scale: a one-element tensor (every row), [M] or [M, 1] (one per row), or None (each row's absmax / 448,
    1 for an all-zero row). Given scales are read as float32 on x's device."""
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"x must be 2-D with unit column stride, got shape {tuple(x.shape)}, stride {x.stride()}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    M, K = x.shape
    out = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    out_scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if scale is None:
        mode, scale = _SCALE_DYNAMIC, out_scale
    elif scale.device != x.device:
        raise ValueError(f"scale must be on x's device ({x.device}), got {scale.device}")
    elif scale.numel() == 1:
        mode, scale = _SCALE_SHARED, scale.float()
    elif scale.numel() == M:
        mode, scale = _SCALE_ROWS, scale.float().contiguous()
    else:
        raise ValueError(f"scale must have 1 or {M} elements (or be None), got shape {tuple(scale.shape)}")
    if M == 0 or K == 0:
        return out, out_scale.fill_(1.0)
    _quantize_fp8_kernel[(triton.cdiv(M, _BLOCK_M),)](
        x, scale, out, out_scale, M, K, x.stride(0), SCALE_MODE=mode, BLOCK_M=_BLOCK_M,
        BLOCK_K=min(_BLOCK_K, max(16, triton.next_power_of_2(K))))
    return out, out_scale
