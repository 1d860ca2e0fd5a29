"""Key cubes in int8 for the attention kernel's Q K^T, value cubes in FP8 for its P V (SageAttention's recipes,
per KV cube).

Keys first lose their head's mean key: q . (k - m) = q . k - q . m shifts every logit of a query row by
the same amount, so its softmax is unchanged as long as every key the row sees is shifted alike (the
attention wrapper shifts the pooled and extra keys too); what it removes is the channel bias video DiTs'
keys share across tokens, which would otherwise set every cube's int8 range. Each KV cube then gets one
fp32 scale (its amax / 127) and its slots are rounded to int8; padding slots are 0. The attention kernel
quantizes each query row the same way when it loads it and runs Q K^T as an int8 MMA (twice bf16's rate
on sm80+, half the key bytes).

Values get one fp32 scale per channel of a head (its amax / 448, e4m3's largest) and are stored in FP8 e4m3
(rounded as torch and compression.fp8 round, by `quantize_fp8._round_to_e4m3`, also under the interpreter),
each cube transposed ([D, S]: FP8 MMAs take their second operand K-major). The kernel multiplies 448 * P in
FP8 with them, each step's product from a zeroed accumulator (FP8 MMAs accumulate at reduced precision; one
64-key step is short) added to the fp32 one after scaling back per channel. sm89+ (FP8 tensor cores).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .cube_permute import cube_tile
from .quantize_fp8 import E4M3_MAX, _round_to_e4m3


class QuantizedKeys(NamedTuple):
    """What `quantize_key_cubes` returns: dequantized key = keys * scale + mean (padding slots: mean)."""
    keys: torch.Tensor   # [B, H, N, S, D] int8
    scale: torch.Tensor  # [B, H, N] fp32, one per KV cube
    mean: torch.Tensor   # [B, H, D] fp32, the shift every key of a head lost


@triton.jit
def _round_to_int8(x):
    """Round half away from zero (a float -> int conversion truncates)."""
    return (x + tl.where(x >= 0, 0.5, -0.5)).to(tl.int8)


@triton.jit
def _shifted_key_rows(K, Valid, base, cube, s0, mean, offs_d, d_ok, S: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_S: tl.constexpr):
    """BLOCK_S slots of one key cube from slot s0, minus the head mean in fp32 (padding slots and channels 0)."""
    slots = s0 + tl.arange(0, BLOCK_S)
    ok = ((slots < S) & (tl.load(Valid + cube * S + slots, mask=slots < S, other=0) != 0))[:, None] & d_ok[None, :]
    k = tl.load(K + base + slots[:, None] * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
    return slots, tl.where(ok, k.to(tl.float32) - mean[None, :], 0.0)


@triton.jit
def _quantize_key_cubes_kernel(K, Mean, Valid, K8, Scale, n_cubes, S: tl.constexpr, HEAD_DIM: tl.constexpr,
                               D_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """One KV cube of one (batch, head): its amax after the shift, then the int8 slots (the second pass re-reads
    the cube from L2)."""
    pid = tl.program_id(0).to(tl.int64)
    cube = pid % n_cubes
    base = pid * (S * HEAD_DIM)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    mean = tl.load(Mean + (pid // n_cubes) * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    amax = tl.zeros([D_PAD], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        _, shifted = _shifted_key_rows(K, Valid, base, cube, s0, mean, offs_d, d_ok, S, HEAD_DIM, BLOCK_S)
        amax = tl.maximum(amax, tl.max(tl.abs(shifted), 0))
    cube_amax = tl.max(amax, 0)
    scale = tl.where(cube_amax > 1e-30, cube_amax / 127.0, 1.0)  # a subnormal scale could flush to 0
    tl.store(Scale + pid, scale)
    for s0 in range(0, S, BLOCK_S):
        slots, shifted = _shifted_key_rows(K, Valid, base, cube, s0, mean, offs_d, d_ok, S, HEAD_DIM, BLOCK_S)
        tl.store(K8 + base + slots[:, None] * HEAD_DIM + offs_d[None, :], _round_to_int8(shifted / scale),
                 mask=(slots < S)[:, None] & d_ok[None, :])


def quantize_key_cubes(k_cubes: torch.Tensor, slot_valid: torch.Tensor) -> QuantizedKeys:
    """k_cubes [B, H, N, S, D] fp16/bf16/fp32 in cube order with padding slots 0 (as `cube_permute` writes
    them), slot_valid [N, S] bool -> QuantizedKeys. One reduction for the head means, one Triton pass."""
    if k_cubes.dim() != 5 or not k_cubes.is_contiguous():
        raise ValueError(f"k_cubes must be a contiguous [B, H, N, S, D], got {tuple(k_cubes.shape)}")
    B, H, N, S, D = k_cubes.shape
    if slot_valid.shape != (N, S):
        raise ValueError(f"slot_valid must be [N, S] = [{N}, {S}], got {tuple(slot_valid.shape)}")
    valid = slot_valid.to(device=k_cubes.device, dtype=torch.uint8).contiguous()
    mean = k_cubes.sum((2, 3), dtype=torch.float32) / valid.sum().clamp(min=1).to(torch.float32)  # no host sync
    keys = torch.empty(k_cubes.shape, dtype=torch.int8, device=k_cubes.device)
    scale = torch.empty(B, H, N, dtype=torch.float32, device=k_cubes.device)
    d_pad, block_s = cube_tile(S, D)
    _quantize_key_cubes_kernel[(B * H * N,)](k_cubes, mean.contiguous(), valid, keys, scale, N,
                                             S=S, HEAD_DIM=D, D_PAD=d_pad, BLOCK_S=block_s)
    return QuantizedKeys(keys, scale, mean)


def fp8_mma_available(device: torch.device) -> bool:
    """Whether the attention kernel can multiply FP8 e4m3 on `device`: NVIDIA sm89+ (compression.fp8's
    FP8_CAPABILITY; Triton's interpreter on the CPU emulates it; ROCm's FP8 is another format)."""
    if device.type != "cuda":
        return True
    return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 9)


class QuantizedValues(NamedTuple):
    """What `quantize_value_cubes` returns: dequantized value = values[..., d, s] * scale[d]."""
    values: torch.Tensor  # [B, H, N, D, S] float8_e4m3fn, each cube transposed
    scale: torch.Tensor   # [B, H, D] fp32, one per channel of a head


@triton.jit
def _quantize_value_cubes_kernel(V, Scale, V8, n_cubes, S: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                                 BLOCK_S: tl.constexpr):
    """One cube of one (batch, head): its slots over their channels' scales, to FP8, stored transposed."""
    pid = tl.program_id(0).to(tl.int64)
    base = pid * (S * HEAD_DIM)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    scale = tl.load(Scale + (pid // n_cubes) * HEAD_DIM + offs_d, mask=d_ok, other=1.0)
    for s0 in range(0, S, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        ok = (slots < S)[:, None] & d_ok[None, :]
        v = tl.load(V + base + slots[:, None] * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
        y = tl.minimum(tl.maximum(tl.div_rn(v.to(tl.float32), scale[None, :]), -E4M3_MAX), E4M3_MAX)
        v8 = _round_to_e4m3(y).to(V8.dtype.element_ty)
        tl.store(V8 + base + offs_d[None, :] * S + slots[:, None], v8, mask=ok)


def quantize_value_cubes(v_cubes: torch.Tensor) -> QuantizedValues:
    """v_cubes [B, H, N, S, D] fp16/bf16/fp32 in cube order -> QuantizedValues (one reduction, one Triton pass)."""
    if v_cubes.dim() != 5 or not v_cubes.is_contiguous():
        raise ValueError(f"v_cubes must be a contiguous [B, H, N, S, D], got {tuple(v_cubes.shape)}")
    B, H, N, S, D = v_cubes.shape
    amax = torch.linalg.vector_norm(v_cubes, ord=float("inf"), dim=(2, 3), dtype=torch.float32)
    scale = torch.where(amax > 1e-30, amax / E4M3_MAX.value, 1.0).contiguous()
    values = torch.empty(B, H, N, D, S, dtype=torch.float8_e4m3fn, device=v_cubes.device)
    d_pad, block_s = cube_tile(S, D)
    _quantize_value_cubes_kernel[(B * H * N,)](v_cubes, scale, values, N, S=S, HEAD_DIM=D, D_PAD=d_pad,
                                               BLOCK_S=block_s)
    return QuantizedValues(values, scale)
