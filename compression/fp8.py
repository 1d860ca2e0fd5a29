"""FP8 e4m3 math shared by the compression modes: a plain-torch reference of the rounding, the fake-quant
path every device runs, and the torch._scaled_mm path of sm89+ GPUs that computes the same numbers."""
from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite e4m3fn value
_E4M3_MANTISSA_BITS = 3
_E4M3_MIN_NORMAL_EXPONENT = -6  # below 2**-6 the grid is the subnormal step 2**-9


def round_to_e4m3_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain-float reference of `x.clamp(±448).to(float8_e4m3fn)`: saturate, then round to the nearest e4m3
    value (ties to even mantissa), subnormals included. Float32 in, float32 out, same shape."""
    x = x.float().clamp(-E4M3_MAX, E4M3_MAX)
    exponent = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(torch.float32).tiny)))
    step = torch.exp2(exponent.clamp_min(_E4M3_MIN_NORMAL_EXPONENT) - _E4M3_MANTISSA_BITS)
    return (torch.round(x / step) * step).clamp(-E4M3_MAX, E4M3_MAX)  # round: half to even


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale saturated into e4m3 (torch's cast gives NaN past ±448 instead of saturating)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize with `scale` (broadcast against x): the numbers an FP8 matmul sees, in x's dtype."""
    return (to_e4m3(x, scale).float() * scale).to(x.dtype)


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales [out, 1] (float32) that map each row's absmax onto 448; all-zero rows get 1."""
    absmax = weight.detach().float().abs().amax(dim=1, keepdim=True)
    return torch.where(absmax > 0, absmax / E4M3_MAX, torch.ones_like(absmax))


def token_scales(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token activation scales [..., 1] (float32): each token's absmax onto 448."""
    absmax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    return torch.where(absmax > 0, absmax / E4M3_MAX, torch.ones_like(absmax))


def scaled_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._scaled_mm runs here: a CUDA device of compute capability 8.9+ and dims that are multiples of 16."""
    return (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0)


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               x_scale: torch.Tensor) -> torch.Tensor:
    """y = Q(x) @ Q(W)^T + b with W already e4m3 ([out, in], scales [out, 1]) and x's scale a scalar tensor or
    per token [..., 1]. torch._scaled_mm (row-wise scales, bf16 out) where supported, else the fake-quant
    reference: both compute the same rounded operands, so they agree up to the accumulation order."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = x_scale.float().reshape(-1, 1) if x_scale.numel() > 1 else x_scale.float().reshape(1, 1)
    if scaled_mm_supported(x, weight_fp8):
        y = torch._scaled_mm(to_e4m3(x2, x_scale), weight_fp8.t(), scale_a=x_scale.expand(x2.shape[0], 1).contiguous(),
                             scale_b=w_scale.reshape(1, -1).contiguous(), out_dtype=torch.bfloat16)
    else:
        y = (to_e4m3(x2, x_scale).float() * x_scale) @ (weight_fp8.float() * w_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], weight_fp8.shape[0])
