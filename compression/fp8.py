"""FP8 e4m3 math shared by the compression modes: a plain-torch reference of the rounding, the fake-quant
path every device runs, and the torch._scaled_mm path of sm89+ GPUs that computes the same numbers (its
activations quantized in one pass by kernels/quantize_fp8.py, bit-exact with to_e4m3 / token_scales; inside
torch.compile by those torch ops, for inductor to fuse)."""
from __future__ import annotations

import contextlib
import logging

import torch

from ..bsa_core.custom_ops import custom_op_once

log = logging.getLogger(__name__)

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


def to_e4m3(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale saturated into e4m3 (torch's cast gives NaN past ±448 instead of saturating). The scale is
    made a float32 tensor on x's device first: CUDA divides by a CPU scalar (a float, a 0-dim CPU tensor) by
    multiplying with its reciprocal, and a few of those quotients round to the neighbouring e4m3 value."""
    return (x.float() / torch.as_tensor(scale, dtype=torch.float32, device=x.device)).clamp(
        -E4M3_MAX, E4M3_MAX).to(E4M3)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize with `scale` (broadcast against x): the numbers an FP8 matmul sees, in x's dtype."""
    return (to_e4m3(x, scale).float() * scale).to(x.dtype)


def _absmax_scales(absmax: torch.Tensor) -> torch.Tensor:
    """absmax / 448 as absmax times the float32 reciprocal (what CUDA computes for a Python divisor, and what
    the quantize kernel computes), 1 where absmax is 0."""
    return torch.where(absmax > 0, absmax * (1.0 / E4M3_MAX), torch.ones_like(absmax))


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales [out, 1] (float32) that map each row's absmax onto 448; all-zero rows get 1."""
    return _absmax_scales(weight.detach().float().abs().amax(dim=1, keepdim=True))


def token_scales(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token activation scales [..., 1] (float32): each token's absmax onto 448."""
    return _absmax_scales(x.detach().float().abs().amax(dim=-1, keepdim=True))


def kernel_bit_differences(x: torch.Tensor, scale: torch.Tensor | None = None) -> list[str]:
    """What of kernels/quantize_fp8.py's quantize_fp8_rows(x, scale) is not this module's numbers bit for bit,
    one line per quantity (its row scales against the given ones or token_scales(x), its e4m3 bytes against
    to_e4m3(x, its row scales)) with the count and the first difference; empty when every bit agrees. For the
    GPU tests and bench/bench_tdq.py, so that a run says which quantity differs and where."""
    from ..kernels.quantize_fp8 import quantize_fp8_rows
    x_fp8, scales = quantize_fp8_rows(x, scale)
    expected = token_scales(x) if scale is None else scale.float().reshape(-1, 1).expand(x.shape[0], 1)
    lines = []
    for what, got, want in (("row scales", scales.view(torch.int32), expected.contiguous().view(torch.int32)),
                            ("e4m3 bytes", x_fp8.view(torch.uint8), to_e4m3(x, scales).view(torch.uint8))):
        differ = got != want
        if not differ.any():
            continue
        row, col = (int(i) for i in differ.nonzero()[0])
        if what == "row scales":
            detail = (f"row {row} (absmax {float(x[row].float().abs().amax())!r}): kernel {float(scales[row])!r}, "
                      f"{'token_scales' if scale is None else 'given'} {float(expected[row])!r}")
        else:
            detail = (f"[{row}, {col}]: x {float(x[row, col])!r}, scale {float(scales[row])!r} -> kernel "
                      f"0x{int(got[row, col]):02x}, to_e4m3 0x{int(want[row, col]):02x}")
        lines.append(f"{what}: {int(differ.sum())} of {differ.numel()} differ, first {detail}")
    return lines


_reference_only = False


@contextlib.contextmanager
def reference_math():
    """Within the block fp8_linear takes the fake-quant path on every device (to compare with _scaled_mm)."""
    global _reference_only
    before, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = before


_CAPABILITY: dict[int, tuple[int, int]] = {}


def capability(device_index: int) -> tuple[int, int]:
    """A CUDA device's compute capability, read once into a plain dict that compiled graphs look up: a traced
    CUDA query breaks the graph, and apply_tdq's wrapper reads it eagerly before the model runs. (Marked
    torch.compiler.assume_constant_result instead, its tuple compared in the graph crashed Dynamo in torch 2.11.)"""
    if device_index not in _CAPABILITY:
        _CAPABILITY[device_index] = torch.cuda.get_device_capability(device_index)
    return _CAPABILITY[device_index]


FP8_CAPABILITY = (8, 9)  # the first CUDA compute capability with FP8 tensor cores (Ada, Hopper and later)


def scaled_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._scaled_mm runs here: an NVIDIA device of compute capability 8.9+ and dims that are multiples of
    16 (and not inside reference_math()). ROCm builds report other capabilities and other FP8 formats (MI300's
    e4m3fnuz): they take the reference."""
    return (not _reference_only and x.is_cuda and torch.version.hip is None
            and capability(x.device.index) >= FP8_CAPABILITY
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0)


def no_fp8_matmul_reason(device: torch.device) -> str | None:
    """Why `device` has no torch._scaled_mm, None where it has one. Layers there run the fake-quant reference:
    the same numbers through float32 matmuls, slower than the layer unquantized (eager only: names the GPU)."""
    if device.type != "cuda":
        return f"{device.type} has no FP8 matrix multiplication"
    if torch.version.hip is not None:
        return "ROCm: this pack's FP8 matrix multiplication is for NVIDIA GPUs"
    index = torch.cuda.current_device() if device.index is None else device.index
    major, minor = capability(index)
    if (major, minor) < FP8_CAPABILITY:
        return (f"{torch.cuda.get_device_name(index)} (sm{major}{minor}) has no FP8 matrix multiplication "
                f"(sm{''.join(map(str, FP8_CAPABILITY))}+)")
    return None


_FAST_ACCUM_REFUSED: set[tuple] = set()  # (device, tokens, out, in) cuBLASLt has no fast-accumulation kernel for


def _scaled_mm(x_fp8, weight_fp8, scale_a, w_scale, bias, fast_accum: bool) -> torch.Tensor:
    """torch._scaled_mm with row-wise scales and bias, bf16 out. cuBLASLt has no fast-accumulation kernel for
    some shapes (an H200 refused 300 tokens x 8960 -> 384 with CUBLAS_STATUS_NOT_SUPPORTED, where 32760 tokens
    ran): those fall back to float32 accumulation, logged once per shape, instead of failing the workflow."""
    def matmul(fast: bool) -> torch.Tensor:
        return torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=scale_a, scale_b=w_scale.reshape(1, -1),
                                bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16,
                                use_fast_accum=fast)

    shape = (str(x_fp8.device), x_fp8.shape[0], *weight_fp8.shape)
    if fast_accum and shape not in _FAST_ACCUM_REFUSED:
        try:
            return matmul(True)
        except RuntimeError as error:
            if "NOT_SUPPORTED" not in str(error):
                raise
            _FAST_ACCUM_REFUSED.add(shape)
            log.warning("[TDQ] fast accumulation is not supported for a %d x %d -> %d FP8 matmul on this GPU: "
                        "float32 accumulation there", shape[1], shape[3], shape[2])
    return matmul(False)


def _fast_accum_matmul(x_fp8: torch.Tensor, weight_fp8: torch.Tensor, scale_a: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    return _scaled_mm(x_fp8, weight_fp8, scale_a, w_scale, bias, True)


def _fast_accum_matmul_fake(x_fp8, weight_fp8, scale_a, w_scale, bias):
    return x_fp8.new_empty((x_fp8.shape[0], weight_fp8.shape[0]), dtype=torch.bfloat16)


# _scaled_mm with fast accumulation and its fallback as the custom op bsa::fp8_matmul_fast_accum: inside
# torch.compile a traced try/except could not catch cuBLASLt's refusal, raised by the compiled graph. Defined at
# import: looked up per call, the registry lookup broke the graph in every compiled layer (an H200 run hit
# Dynamo's recompile limit there and ran slower than eager).
_fast_accum_op = custom_op_once("fp8_matmul_fast_accum", _fast_accum_matmul, _fast_accum_matmul_fake)


def quantize_activations(x2: torch.Tensor, x_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (e4m3 [M, K], float32 row scales [M, 1]) for _scaled_mm; x_scale [1, 1], [M, 1] or None (per
    token). Eager: one pass of kernels/quantize_fp8.py. Inside torch.compile the same numbers as torch ops,
    which inductor fuses into the op that made x (a norm, a GELU) instead of a separate pass over x."""
    if torch.compiler.is_compiling():
        scale_a = (token_scales(x2) if x_scale is None else x_scale.expand(x2.shape[0], 1)).contiguous()
        return to_e4m3(x2, scale_a), scale_a
    from ..kernels.quantize_fp8 import quantize_fp8_rows
    return quantize_fp8_rows(x2, x_scale)


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               x_scale: torch.Tensor | None, fast_accum: bool = False) -> torch.Tensor:
    """y = Q(x) @ Q(W)^T + b with W already e4m3 ([out, in], scales [out, 1]) and x's scale a one-element
    tensor, per token [..., 1], or None (each token's absmax, token_scales). On sm89+ GPUs one kernel pass
    quantizes x and torch._scaled_mm (row-wise scales, bias in its epilogue, bf16 out) multiplies; elsewhere
    the fake-quant reference. Both see the same rounded operands, so they agree up to the accumulation order
    and the bf16 rounding of the product. fast_accum: _scaled_mm's use_fast_accum (Hopper sums FP8 products
    without promoting partial sums to float32: faster, less exact as K grows); the reference ignores it."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x_scale is not None:
        x_scale = x_scale.float().reshape(-1, 1) if x_scale.numel() > 1 else x_scale.float().reshape(1, 1)
    if scaled_mm_supported(x, weight_fp8):
        x_fp8, scale_a = quantize_activations(x2, x_scale)
        y = (_fast_accum_op(x_fp8, weight_fp8, scale_a, w_scale, bias) if fast_accum else
             _scaled_mm(x_fp8, weight_fp8, scale_a, w_scale, bias, False))
    else:
        x_scale = token_scales(x2) if x_scale is None else x_scale
        y = (to_e4m3(x2, x_scale).float() * x_scale) @ (weight_fp8.float() * w_scale).t()
        if bias is not None:
            y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], weight_fp8.shape[0])
