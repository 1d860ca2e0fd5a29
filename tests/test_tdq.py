"""TDQ FP8 linear layers: the e4m3 reference against torch's cast, per-channel weight scales, the baseline
modes' error order on synthetic sigma-dependent activations, the generator fit, and calibrate -> save ->
load -> quantize on the tiny Wan through ComfyUI's executor (with BSA), hash mismatch, clone isolation."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

from comfy_env import PromptRunner, require_comfyui, tiny_prompt, tiny_wan, tiny_wan_path  # noqa: F401 (fixtures)

require_comfyui()
from comfyui_bsa.compression.fp8 import (E4M3, E4M3_MAX, fake_quantize, fp8_linear,  # noqa: E402
                                         kernel_bit_differences, reference_math, round_to_e4m3_reference,
                                         to_e4m3, token_scales, weight_scales)
from comfyui_bsa.compression.tdq import (CLIP_GRID, TDQCalibration, TDQConfig, apply_tdq, calibrate_tdq,  # noqa: E402
                                         clipping_error_curve, fit_generators, generator_log_intervals)


def rms_rel(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 100.0, 1e4], ids=lambda m: f"x{m:g}")
def test_e4m3_reference_matches_torch_cast_with_saturation(magnitude):
    x = torch.randn(50000, generator=torch.Generator().manual_seed(0)) * magnitude
    edges = torch.tensor([0.0, 448.0, 449.0, 464.0, 465.0, -1e6, 2.0 ** -10, 3 * 2.0 ** -10, 1.5 * 2.0 ** -9,
                          2.5 * 2.0 ** -9, 1.0625, 1.1875])  # saturation, subnormal and normal ties (to even)
    x = torch.cat([x, edges])
    expected = x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float()
    assert torch.equal(round_to_e4m3_reference(x), expected)
    assert torch.equal(to_e4m3(x, torch.tensor(1.0)).float(), expected)
    assert torch.equal(round_to_e4m3_reference(edges[:6]), torch.tensor([0.0, 448, 448, 448, 448, -448]))


def test_per_channel_weight_scales_use_each_rows_range():
    weight = torch.randn(8, 64) * torch.logspace(-3, 3, 8)[:, None]
    weight[3] = 0
    scales = weight_scales(weight)
    assert scales.shape == (8, 1) and scales[3, 0] == 1
    quantized = to_e4m3(weight, scales).float()
    assert torch.equal(quantized.abs().amax(1)[[0, 1, 2, 4, 5, 6, 7]], torch.full((7,), E4M3_MAX))
    dequantized = quantized * scales
    for row in (0, 7):  # each row keeps ~3 mantissa bits whatever its magnitude
        assert rms_rel(dequantized[row], weight[row]) < 0.04


def test_fp8_linear_equals_fake_quant_reference():
    x, weight, bias = torch.randn(2, 7, 32), torch.randn(48, 32), torch.randn(48)
    w_scales = weight_scales(weight)
    for x_scale in (torch.tensor(0.01), x.abs().amax(-1, keepdim=True) / E4M3_MAX):
        reference = (torch.stack([torch.stack([round_to_e4m3_reference(t / s) * s for t, s in
                                               zip(xb, x_scale.expand(2, 7, 1)[b])]) for b, xb in enumerate(x)])
                     @ (round_to_e4m3_reference(weight / w_scales) * w_scales).t() + bias)
        out = fp8_linear(x, to_e4m3(weight, w_scales), w_scales, bias, x_scale)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


# e4m3 rounding edges, as quotients: zeros, saturation (464 is the tie past 448), subnormal ties and negatives
# that round to -0, the largest subnormals rounding up to 2**-6, normal ties, values rounding up a binade
E4M3_EDGES = [0.0, -0.0, 448.0, 449.0, 464.0, 465.0, 1e4, -1e4, 2.0 ** -10, -(2.0 ** -10), 3 * 2.0 ** -10, -1e-7,
              1.5 * 2.0 ** -9, -2.5 * 2.0 ** -9, 7.5 * 2.0 ** -9, -0.0155, 1.0625, 1.1875, -126.0, 432.0, -431.9,
              15.5, -15.6, 1.97, -0.249, 3.99]
EDGE_SCALE = 0.25  # a power of two: x / EDGE_SCALE gives the edges exactly
SCALE_KINDS = ["shared", "shared_pow2", "rows", "rows_pow2", "dynamic"]


def kernel_inputs(dtype, device, rows=37, columns=160):
    """Random rows across 10 decades (fewer for float16's range), a +0 and a -0 row, a row of E4M3_EDGES * 0.25
    and a row of the dtype's subnormals (float32's for bfloat16, except in the interpreter, which widens those
    wrongly), as a row-strided view; and per-row powers of two near each row's absmax / 448 (0.25 for the
    edge row, so that its ties stay ties)."""
    generator = torch.Generator().manual_seed(0)
    top = 3.5 if dtype == torch.float16 else 4.0
    x = torch.randn(rows, columns + 48, generator=generator) * torch.logspace(-6, top, rows)[:, None]
    x[0], x[1] = 0.0, -0.0
    x[2] = torch.tensor(E4M3_EDGES).repeat(columns // len(E4M3_EDGES) + 3)[:columns + 48] * EDGE_SCALE
    if dtype != torch.bfloat16 or device != "cpu":
        x[3] *= torch.finfo(dtype).tiny / x[3].abs().amax()
    x = x.to(dtype).to(device)[:, 8:columns + 8]  # row stride columns + 48
    pow2_scales = torch.exp2(torch.log2(token_scales(x)).round()).reshape(-1)
    pow2_scales[2] = EDGE_SCALE
    return x, pow2_scales


def kernel_scale(kind, x, pow2_scales):
    """quantize_fp8_rows' scale: a 0-dim device tensor of x's absmax / 448 (as calibration gives), a 1-element
    power of two, per-row scales [M, 1], per-row powers of two [M], or None (each row's absmax / 448)."""
    return {"shared": (x.float().abs().amax() / E4M3_MAX).reshape(()),
            "shared_pow2": torch.full((1,), EDGE_SCALE, device=x.device),
            "rows": token_scales(x) * 0.6, "rows_pow2": pow2_scales, "dynamic": None}[kind]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale_kind", SCALE_KINDS)
def test_quantize_kernel_gives_to_e4m3s_bits(scale_kind, dtype):
    """The activation kernel of the _scaled_mm path against to_e4m3 / token_scales, bit for bit (in Triton's
    interpreter without CUDA)."""
    from comfyui_bsa.kernels.quantize_fp8 import quantize_fp8_rows
    x, pow2_scales = kernel_inputs(dtype, "cuda" if torch.cuda.is_available() else "cpu")
    scale = kernel_scale(scale_kind, x, pow2_scales)
    x_fp8, scales = quantize_fp8_rows(x, scale)
    assert x_fp8.is_contiguous() and scales.shape == (x.shape[0], 1)
    assert kernel_bit_differences(x, scale) == []


@pytest.mark.parametrize("scale_kind", ["shared", "rows", "dynamic"])
def test_compiled_activation_cast_gives_the_kernels_bits(scale_kind):
    """Inside torch.compile the activation cast is torch ops (inductor fuses them into x's producer): the same
    e4m3 bytes and row scales as the kernel's one pass (fullgraph: no graph break)."""
    from comfyui_bsa.compression.fp8 import quantize_activations
    from comfyui_bsa.kernels.quantize_fp8 import quantize_fp8_rows
    x, pow2_scales = kernel_inputs(torch.bfloat16, "cuda" if torch.cuda.is_available() else "cpu")
    scale = kernel_scale(scale_kind, x, pow2_scales)
    scale = None if scale is None else scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1, 1)
    torch._dynamo.reset()
    compiled = torch.compile(quantize_activations, backend="aot_eager", fullgraph=True)
    (x_fp8, scales), (want_fp8, want_scales) = compiled(x, scale), quantize_fp8_rows(x, scale)
    assert torch.equal(scales, want_scales)
    assert torch.equal(x_fp8.view(torch.uint8), want_fp8.view(torch.uint8))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="patches Triton's front end: interpreter only")
def test_quantize_kernel_keeps_minus_zero_whatever_unary_minus_compiles_to(monkeypatch):
    """Triton 3.6 compiles -x as 0 - x, +0 for x = +0: on the H200 the kernel wrote +0 for negatives that round
    to zero, where to_e4m3 writes -0, while this machine's Triton negates with fneg. The kernel copies the
    sign as a bit, so its bits stay to_e4m3's under the older negation too."""
    from triton.language.semantic import TritonSemantic
    negate = TritonSemantic.minus
    monkeypatch.setattr(TritonSemantic, "minus",
                        lambda self, x: self.sub(0.0, x, True) if x.type.scalar.is_floating() else negate(self, x))
    x, pow2_scales = kernel_inputs(torch.bfloat16, "cpu")
    for kind in ("shared_pow2", "dynamic"):
        assert kernel_bit_differences(x, kernel_scale(kind, x, pow2_scales)) == []


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale_kind", SCALE_KINDS)
def test_quantize_kernel_bits_on_cuda(scale_kind, dtype):
    """The kernel's row scales and e4m3 bytes, each bit for bit against compression.fp8 on the GPU, with rows
    large enough that random values hit ties and negatives that round to -0 by the hundred (the `-m gpu` runs
    on the H200 deselect test_quantize_kernel_gives_to_e4m3s_bits, so its +0 showed only in the bench)."""
    x, pow2_scales = kernel_inputs(dtype, "cuda", rows=512, columns=4096)
    assert kernel_bit_differences(x, kernel_scale(scale_kind, x, pow2_scales)) == []


def test_quantize_kernel_rejects_bad_inputs():
    from comfyui_bsa.kernels.quantize_fp8 import quantize_fp8_rows
    with pytest.raises(ValueError, match="x must be 2-D"):
        quantize_fp8_rows(torch.zeros(4, 32).t())
    with pytest.raises(ValueError, match="scale must have 1 or 4"):
        quantize_fp8_rows(torch.zeros(4, 32), torch.ones(3))


@pytest.mark.gpu
@pytest.mark.parametrize("fast_accum", [False, True], ids=["fp32-accum", "fast-accum"])
@pytest.mark.parametrize("per_token", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("tokens", [300, 32760])
def test_scaled_mm_path_equals_fake_quant_reference(per_token, fast_accum, tokens):
    """_scaled_mm against the float32 fake-quant reference at Wan 1.3B's FFN output layer (8960 -> 1536); with
    fast accumulation the bound is the one the node's tooltip promises: less exact, not wrong. At 300 tokens
    cuBLASLt has no fast-accumulation kernel on an H200: the call falls back instead of failing."""
    from comfyui_bsa.compression import fp8
    x = torch.randn(tokens, 8960, device="cuda", dtype=torch.bfloat16)
    weight, bias = torch.randn(1536, 8960, device="cuda"), torch.randn(1536, device="cuda", dtype=torch.bfloat16)
    w_scales = weight_scales(weight)
    x_scale = None if per_token else x.float().abs().amax() / E4M3_MAX
    out = fp8_linear(x, to_e4m3(weight, w_scales), w_scales, bias, x_scale, fast_accum)
    with reference_math():
        reference = fp8_linear(x, to_e4m3(weight, w_scales), w_scales, bias, x_scale)
    assert out.dtype == reference.dtype == torch.bfloat16
    error = rms_rel(out, reference)
    refused = (tokens, 1536, 8960) in fp8._FAST_ACCUM_REFUSED
    assert error < (1e-2 if fast_accum and not refused else 2e-3), (error, refused)  # rounding, accumulation only
    if tokens == 32760:  # Wan 480p's token count: the fast kernel exists there
        assert not refused


def test_fast_accumulation_falls_back_where_cublas_has_no_kernel(monkeypatch, caplog):
    """A shape cuBLASLt refuses with fast accumulation runs with float32 accumulation, logged once, and is not
    tried again; any other error still raises."""
    from comfyui_bsa.compression import fp8
    calls = []

    def scaled_mm(a, b, *, use_fast_accum, **kwargs):
        calls.append(use_fast_accum)
        if use_fast_accum:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmulAlgoGetHeuristic")
        return a.float() @ b.float()

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    monkeypatch.setattr(fp8, "_FAST_ACCUM_REFUSED", set())
    x, weight, scale = torch.randn(5, 32), torch.randn(16, 32), torch.ones(16, 1)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            assert torch.equal(fp8._scaled_mm(x, weight, scale, scale, None, True), x @ weight.t())
    assert calls == [True, False, False]
    assert sum("fast accumulation is not supported for a 5 x 32 -> 16" in r.message for r in caplog.records) == 1

    def failing(a, b, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch, "_scaled_mm", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        fp8._scaled_mm(torch.randn(7, 32), weight, scale, scale, None, True)


def synthetic_activations(timesteps):
    """Per timestep, Gaussian tokens whose range shrinks by 5 decades from timestep 1000 to 0."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(256, 64, generator=generator) * 10 ** (5 * float(t) / 1000 - 5) for t in timesteps]


def test_fast_accumulation_fallback_holds_inside_torch_compile(monkeypatch):
    """Inside a compiled graph the fallback still catches cuBLASLt's refusal: the fast-accumulation matmul is
    the custom op bsa::fp8_matmul_fast_accum, which Dynamo does not trace into. The whole _scaled_mm path of
    fp8_linear compiles without a graph break (fullgraph; looking the op up per call broke the graph in every
    layer, and an H200 run then hit Dynamo's recompile limit)."""
    from comfyui_bsa.compression import fp8
    calls = []

    def scaled_mm(a, b, *, scale_a, scale_b, bias, use_fast_accum, out_dtype):
        calls.append(use_fast_accum)
        if use_fast_accum:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmulAlgoGetHeuristic")
        return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)

    x, weight = torch.randn(5, 32, dtype=torch.bfloat16), torch.randn(16, 32)
    w_scale = fp8.weight_scales(weight)
    weight_fp8, x_scale = fp8.to_e4m3(weight, w_scale), torch.tensor(0.01)
    expected = fp8.fp8_linear(x, weight_fp8, w_scale, None, x_scale) * 2  # the fake-quant reference (CPU)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda x, weight: True)
    monkeypatch.setattr(fp8, "_FAST_ACCUM_REFUSED", set())
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: fp8.fp8_linear(a, weight_fp8, w_scale, None, x_scale, fast_accum=True) * 2,
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-2, atol=1e-2)
    assert calls == [True, False]


def test_modes_error_order_on_sigma_dependent_ranges():
    timesteps = torch.linspace(0, 1000, 12)
    acts = synthetic_activations(timesteps)
    absmax = torch.stack([a.abs().max() for a in acts])[None]
    errors = torch.stack([clipping_error_curve(a.reshape(-1), a.abs().max()) for a in acts])[None]
    calibration = TDQCalibration("x", ("layer",), timesteps, absmax, errors,
                                 fit_generators(timesteps, absmax, errors, steps=300))
    tdq = calibration.generator_intervals(timesteps)[0]
    table = calibration.table_intervals(20)[0][(timesteps / 1000 * 20).long().clamp(max=19)]
    static = calibration.static_intervals()[0]

    def error(intervals):
        return sum(rms_rel(fake_quantize(a, (i / E4M3_MAX).reshape(1, 1)), a) for a, i in zip(acts, intervals))

    dynamic = sum(rms_rel(fake_quantize(a, a.abs().amax(1, keepdim=True) / E4M3_MAX), a) for a in acts)
    assert dynamic <= error(tdq) * 1.05
    assert error(tdq) <= error(table) * 1.05
    assert error(table) < error(static.expand(12)) * 0.8


def test_generator_reproduces_the_fitted_per_timestep_intervals():
    timesteps = torch.linspace(0, 1000, 25)
    best = 0.35 + 0.6 * timesteps / 1000  # best clipping fraction per timestep
    absmax = torch.rand(3, 25, generator=torch.Generator().manual_seed(0)) + 0.5
    errors = (CLIP_GRID[None, None] - best[None, :, None]) ** 2 * torch.ones(3, 1, 1)
    params = fit_generators(timesteps, absmax, errors, steps=400)
    fraction = generator_log_intervals(params, timesteps).exp() / absmax
    assert float((fraction - best).abs().max()) < 0.04


@pytest.fixture(scope="module")
def calibration_progress(tiny_wan):
    """(calibration, the progress(done, total) calls it made)"""
    generator = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 16, 4096, generator=generator), {}]]
    negative = [[torch.randn(1, 16, 4096, generator=generator), {}]]
    progress = []
    calibration = calibrate_tdq(tiny_wan, [(cond, negative)], {"samples": torch.zeros(1, 16, 5, 16, 16)}, steps=3,
                                fit_steps=100, progress=lambda done, total: progress.append((done, total)))
    return calibration, progress


@pytest.fixture(scope="module")
def calibration(calibration_progress):
    return calibration_progress[0]


def test_calibration_progress_counts_sampling_steps_then_fit_steps(calibration_progress):
    _, progress = calibration_progress
    assert progress == [(i, 3 + 100) for i in range(1, 3 + 100 + 1)]


def test_calibration_covers_the_block_linears_and_round_trips(calibration, tiny_wan, tmp_path):
    assert len(calibration.layers) == 2 * 10 and all(n.startswith("blocks.") for n in calibration.layers)
    assert calibration.absmax.shape == (20, len(calibration.timesteps)) and torch.isfinite(calibration.absmax).all()
    path = tmp_path / "tdq.safetensors"
    calibration.save(path)
    loaded = TDQCalibration.load(path, tiny_wan)
    assert loaded.layers == calibration.layers
    torch.testing.assert_close(loaded.generator_intervals(loaded.timesteps), calibration.generator_intervals(
        calibration.timesteps))


def test_other_weights_raise_naming_the_file(calibration, tiny_wan_path, tmp_path):
    import comfy.sd
    from safetensors.torch import load_file, save_file
    state = load_file(str(tiny_wan_path))
    state["blocks.0.ffn.0.weight"] = state["blocks.0.ffn.0.weight"] * 2
    save_file(state, str(tmp_path / "other.safetensors"))
    other = comfy.sd.load_diffusion_model(str(tmp_path / "other.safetensors"))
    calibration.save(tmp_path / "tdq.safetensors")
    with pytest.raises(ValueError, match="tdq.safetensors.*other model weights"):
        TDQCalibration.load(tmp_path / "tdq.safetensors", other)


def test_invalid_settings_raise_naming_the_input(tiny_wan):
    with pytest.raises(ValueError, match="mode"):
        TDQConfig(mode="int4")
    with pytest.raises(ValueError, match="fast_accum"):
        TDQConfig(fast_accum="yes")
    with pytest.raises(ValueError, match="calibration"):
        apply_tdq(tiny_wan, TDQConfig(mode="tdq"))
    with pytest.raises(ValueError, match="seed"):  # before any sampling: the last of 2 seeds would pass 2**64 - 1
        calibrate_tdq(tiny_wan, [([], [])], {"samples": torch.zeros(1, 16, 5, 16, 16)}, seed=2**64 - 1,
                      seeds_per_prompt=2)


def test_patch_stays_on_its_clone(calibration, tiny_wan):
    patched = apply_tdq(tiny_wan, TDQConfig(mode="tdq"), calibration)
    assert patched.object_patches and not tiny_wan.object_patches
    fast = apply_tdq(tiny_wan, TDQConfig(mode="tdq", fast_accum=True), calibration)
    assert all(patch.fp8.fast_accum for patch in fast.object_patches.values())  # the option reaches every layer
    assert not any(patch.fp8.fast_accum for patch in patched.object_patches.values())
    assert not tiny_wan.clone().object_patches
    assert "comfyui_bsa_tdq" not in str(tiny_wan.wrappers)


def test_second_tdq_replaces_the_first(calibration, tiny_wan, caplog):
    """TDQ on a TDQ model: the later apply's layers and wrapper only (the earlier wrapper would keep a second
    FP8 copy of every layer warm), sampling as one apply does; the first model keeps its own."""
    import comfy.patcher_extension as pe
    first = apply_tdq(tiny_wan, TDQConfig(mode="static"), calibration)
    with caplog.at_level("WARNING"):
        second = apply_tdq(first, TDQConfig(mode="tdq"), calibration)
    assert any("already has FP8 linear layers" in r.message for r in caplog.records)
    assert len(second.get_wrappers(pe.WrappersMP.APPLY_MODEL, "comfyui_bsa_tdq")) == 1
    assert len(first.get_wrappers(pe.WrappersMP.APPLY_MODEL, "comfyui_bsa_tdq")) == 1
    assert not {id(p.fp8) for p in second.object_patches.values()} & {id(p.fp8) for p in first.object_patches.values()}
    assert torch.equal(sample(second), sample(apply_tdq(tiny_wan, TDQConfig(mode="tdq"), calibration)))


def sample(model, seed=0):
    import comfy.sample
    generator = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 16, 4096, generator=generator), {}]]
    negative = [[torch.randn(1, 16, 4096, generator=generator), {}]]
    latent = torch.zeros(1, 16, 5, 16, 16)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), 3, 5.0, "euler", "simple", cond,
                               negative, latent, seed=seed, disable_pbar=True)


def with_lora(model, strength=1.0):
    """A clone with a 'diff' weight patch on every block linear, as a LoRA loader adds them."""
    from comfyui_bsa.compression.linears import target_linears
    clone, generator = model.clone(), torch.Generator().manual_seed(11)
    linears = target_linears(model.get_model_object("diffusion_model"))
    patches = {f"diffusion_model.{name}.weight": (0.05 * torch.randn(m.weight.shape, generator=generator),)
               for name, m in linears.items()}
    assert len(clone.add_patches(patches, strength)) == len(patches) == 20
    return clone


def test_a_device_without_fp8_matmuls_is_named_once_per_patched_model(calibration, tiny_wan, caplog, monkeypatch):
    """Without torch._scaled_mm the FP8 layers run the float32 fake-quant reference, slower than no TDQ: the
    first call of each TDQ model says so (here on the CPU), once; a pre-Ada GPU is named with its sm."""
    from comfyui_bsa.compression import fp8
    patched = apply_tdq(tiny_wan, TDQConfig(mode="tdq"), calibration)
    with caplog.at_level("WARNING"):
        sample(patched)
        sample(patched)
        sample(apply_tdq(tiny_wan, TDQConfig(mode="static"), calibration))
    slow = [r.message for r in caplog.records if "fake-quantized reference" in r.message]
    assert len(slow) == 2 and slow[0].startswith("[TDQ] cpu has no FP8 matrix multiplication"), slow

    monkeypatch.setitem(fp8._CAPABILITY, 0, (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA GeForce RTX 3090")
    assert fp8.no_fp8_matmul_reason(torch.device("cuda", 0)) == (
        "NVIDIA GeForce RTX 3090 (sm86) has no FP8 matrix multiplication (sm89+)")
    monkeypatch.setitem(fp8._CAPABILITY, 0, (9, 0))
    assert fp8.no_fp8_matmul_reason(torch.device("cuda", 0)) is None
    on_gpu, weight = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0)), torch.empty(32, 32)
    assert fp8.scaled_mm_supported(on_gpu, weight)
    monkeypatch.setattr(torch.version, "hip", "6.4.0")  # ROCm reports capabilities past sm89 without e4m3fn GEMMs
    assert fp8.no_fp8_matmul_reason(torch.device("cuda", 0)).startswith("ROCm")
    assert not fp8.scaled_mm_supported(on_gpu, weight)


def test_tdq_composes_with_lora_pruning_and_teal_and_leaves_the_base_model_alone(tiny_wan):
    """TDQ patches each linear's forward (the layer and its parameters stay): a LoRA before or after it applies,
    2:4 masks (either order) are kept and quantized with the weight, TEAL before it keeps sparsifying, and
    sampling these clones leaves the base model's own sample unchanged."""
    import comfy.model_management

    from comfyui_bsa.compression.activation_sparsity import ActivationSparsityConfig, apply_activation_sparsity
    from comfyui_bsa.compression.linears import CalibrationSampling, current_patch
    from comfyui_bsa.compression.sparsity24 import Sparsity24Config, apply_sparsity24
    dynamic = TDQConfig(mode="dynamic")
    base = sample(tiny_wan)
    tdq = sample(apply_tdq(tiny_wan, dynamic))
    assert not torch.equal(sample(apply_tdq(with_lora(tiny_wan), dynamic)), tdq)  # LoRA, then TDQ
    assert not torch.equal(sample(with_lora(apply_tdq(tiny_wan, dynamic))), tdq)  # TDQ, then LoRA
    pruned = apply_sparsity24(tiny_wan, Sparsity24Config(method="magnitude", layers="all"))[0]
    pruned_tdq = apply_tdq(pruned, dynamic)
    patch = current_patch(pruned_tdq, "blocks.0.ffn.0")
    assert patch.fp8 is not None and patch.weight24 is not None
    weight_fp8 = patch.fp8.quantized(patch.module, torch.device("cpu"), patch.weight24.mask)[0]
    assert not weight_fp8.float()[~patch.weight24.mask].any()  # the quantized weight is the masked one
    assert not torch.equal(sample(pruned_tdq), tdq)
    generator = torch.Generator().manual_seed(3)
    sampling = CalibrationSampling([[torch.randn(1, 16, 4096, generator=generator), {}]],
                                   [[torch.randn(1, 16, 4096, generator=generator), {}]],
                                   {"samples": torch.zeros(1, 16, 5, 16, 16)}, samples=1, steps=2)
    teal = apply_activation_sparsity(tiny_wan, ActivationSparsityConfig(target=0.5), sampling)[0]
    assert not torch.equal(sample(apply_tdq(teal, dynamic)), tdq)
    tdq_pruned = apply_sparsity24(apply_tdq(tiny_wan, dynamic), Sparsity24Config(method="magnitude", layers="all"))
    assert len(tdq_pruned[1].masks) == 20 and current_patch(tdq_pruned[0], "blocks.0.ffn.0").fp8 is not None
    comfy.model_management.unload_all_models()
    assert torch.equal(sample(tiny_wan), base)


def test_fp8_scaled_checkpoints_keep_their_layers(tiny_wan_path, tmp_path, caplog):
    """A Wan loaded from an fp8_scaled file (8-bit weights times scale_weight): TDQ and 2:4 pruning leave those
    layers as loaded, with the reason, instead of reading the raw 8-bit weight as if it were the real one."""
    import comfy.sd
    from safetensors.torch import load_file, save_file

    from comfyui_bsa.compression.sparsity24 import Sparsity24Config, apply_sparsity24
    state = load_file(str(tiny_wan_path))
    for name in [n for n in state if n.startswith("blocks.") and n.endswith(".weight") and state[n].ndim == 2]:
        scale = state[name].float().abs().amax() / E4M3_MAX
        state[name] = (state[name].float() / scale).to(E4M3)
        state[name.removesuffix("weight") + "scale_weight"] = scale.reshape(())
    state["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    save_file(state, str(tmp_path / "tiny_wan_fp8_scaled.safetensors"))
    model = comfy.sd.load_diffusion_model(str(tmp_path / "tiny_wan_fp8_scaled.safetensors"))
    with caplog.at_level("INFO"):
        patched = apply_tdq(model, TDQConfig(mode="dynamic"))
    assert not patched.object_patches and any("8 bits" in r.message for r in caplog.records)
    pruned, result = apply_sparsity24(model, Sparsity24Config(method="magnitude", layers="all"))
    assert not result.masks and all("8 bits" in choice.reason for choice in result.choices)


def test_modes_on_the_tiny_wan_are_close_to_the_unquantized_sample(calibration, tiny_wan):
    reference = sample(tiny_wan)
    errors = {mode: rms_rel(sample(apply_tdq(tiny_wan, TDQConfig(mode=mode), calibration)), reference)
              for mode in ("off", "static", "table", "dynamic", "tdq")}
    assert errors["off"] == 0
    assert all(0 < errors[m] < 0.2 for m in ("static", "table", "dynamic", "tdq")), errors
    assert torch.equal(sample(apply_tdq(tiny_wan, TDQConfig(mode="tdq"), calibration)),
                       sample(apply_tdq(tiny_wan, TDQConfig(mode="tdq"), calibration)))  # deterministic


def test_torch_compile_model_over_tdq_and_bsa_matches_eager(calibration, tiny_wan, monkeypatch):
    """ComfyUI's TorchCompileModel wrapper (aot_eager: no C++ compiler needed) over TDQ then BSA: the per-step
    scale and the FP8 layers trace, the model compiles without a graph break (one broke every block, and on
    the 30-block Wan Dynamo then recompiled a block's frame per layer, each LinearPatch being another object,
    past its limit: BSA + TDQ compiled ran slower than eager on an H200), and the compiled sample equals the
    eager one. Dense attention is ComfyUI's SDPA one, as on a GPU (its CPU default reads free memory)."""
    import comfy.ldm.modules.attention
    import comfy.ldm.wan.model
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    from comfyui_bsa.bsa_core import BSAConfig
    from comfyui_bsa.bsa_core.patch import apply_bsa
    monkeypatch.setattr(comfy.ldm.wan.model, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    eager = apply_bsa(apply_tdq(tiny_wan, TDQConfig(mode="tdq"), calibration),
                      BSAConfig(keep_ratio=0.5, kv_threshold=0.5, threshold_mode="cumulative"),
                      start_percent=0.0, end_percent=1.0, min_tokens=0)  # self-attention sparse
    compiled = eager.clone()
    set_torch_compile_wrapper(compiled, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    compiled_sample = sample(compiled)
    assert not counters["graph_break"], list(counters["graph_break"])
    # compiled once: the run's counts grew from one model call to the next in the graph's inputs, which made
    # Dynamo compile the whole model a second time (20-50 s on a GPU at Wan 1.3B); and not again next run
    assert counters["frames"]["ok"] == 1, dict(counters["frames"])
    counters.clear()
    torch.testing.assert_close(sample(compiled), compiled_sample)
    assert not counters["frames"]["ok"], dict(counters["frames"])
    torch.testing.assert_close(compiled_sample, sample(eager), atol=1e-4, rtol=1e-4)


def test_calibrate_save_load_quantize_with_bsa_through_the_executor(tiny_wan_path, tmp_path):
    import folder_paths
    runner = PromptRunner(tiny_wan_path, tmp_path)
    folder_paths.set_output_directory(str(tmp_path / "output"))
    prompt = tiny_prompt(steps=2)
    prompt["8"] = {"class_type": "TDQCalibrate", "inputs": {
        "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": 3,
        "seeds": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple",
        "filename_prefix": "tdq/tiny", "fit_steps": 50}}
    prompt["9"] = {"class_type": "TDQQuantize", "inputs": {"model": ["1", 0], "mode": "tdq",
                                                           "calibration": ["8", 0]}}
    prompt["6"]["inputs"]["model"] = ["9", 0]
    prompt["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "tdq_test/latent"}}
    runner.run(prompt)
    assert (tmp_path / "output" / "tdq" / "tiny.safetensors").is_file()

    import json

    from comfy_env import REPO
    bsa = json.loads((REPO / "workflows" / "tiny_wan_tdq_api.json").read_text())["2"]["inputs"]
    from_file = tiny_prompt({k: v for k, v in bsa.items() if k != "model"}, steps=2)
    from_file["9"] = {"class_type": "TDQQuantize", "inputs": {"model": ["1", 0], "mode": "tdq",
                                                              "calibration_file": "tdq/tiny.safetensors"}}
    from_file["2"]["inputs"]["model"] = ["9", 0]
    from_file["7"] = prompt["7"]
    runner.run(from_file)
    # the file written again under the same name is a new input for ComfyUI's cache
    from comfyui_bsa.nodes.nodes_tdq import TDQQuantize
    path = tmp_path / "output" / "tdq" / "tiny.safetensors"
    before = TDQQuantize.fingerprint_inputs(calibration_file="tdq/tiny.safetensors")
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 5))
    assert before and TDQQuantize.fingerprint_inputs(calibration_file="tdq/tiny.safetensors") != before


def test_bench_cpu_smoke_runs_every_mode():
    """bench/bench_tdq.py --cpu-smoke: the speed rows and the quality table (stand-in model) on the CPU."""
    from comfy_env import COMFYUI_PATH, REPO
    env = {**os.environ, "COMFYUI_PATH": str(COMFYUI_PATH), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_tdq.py"), "--cpu-smoke"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sum("fp8 TDQ linear" in line and "vs its fake-quant reference 0.0e+00" in line for line in lines) == 6
    for mode in ("static", "table", "dynamic", "tdq"):
        assert any(line.split()[:1] == [mode] and "PSNR vs reference" in line for line in lines), mode
    assert any(line.startswith("tdq - dynamic:") for line in lines)


def test_e2e_wan_tiny_with_tdq_variants():
    """bench/e2e_wan.py --tiny --tdq tdq: the quick calibration and the tdq / bsa+tdq variants run on the CPU."""
    from comfy_env import COMFYUI_PATH, REPO
    env = {**os.environ, "COMFYUI_PATH": str(COMFYUI_PATH), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "e2e_wan.py"), "--tiny", "--tdq", "tdq", "--steps", "1",
                           "--warmup-steps", "0", "--no-attention-share"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "TDQ: mode tdq, 20 linear layers in FP8 e4m3" in done.stdout
    assert "speed-up dense/tdq" in done.stdout and "speed-up dense/bsa+tdq" in done.stdout
