"""torch.compile sees BSA as the one custom op bsa::attention (fake kernel gives the shapes), so the
data-dependent selection is never traced and a compiled model matches eager."""
import dataclasses

import pytest
import torch

from comfy_env import require_comfyui, tiny_wan_path  # noqa: F401  (fixture)
from comfyui_bsa.bsa_core import BSAConfig
from comfyui_bsa.bsa_core.attention import bsa_attention, bsa_attention_op, threshold_tensor

SPARSE = BSAConfig(keep_ratio=0.5, kv_threshold=0.5,
                   threshold_mode="cumulative", pooled_remainder=False)  # 4 cubes of random tokens: keeps 2-3
GRID = (4, 8, 8)


def attention_block(q, k, v, n_suffix=0):
    """Ops around the custom op, as in a transformer block: compiled together with it."""
    out, kept_queries, kept_kv = bsa_attention_op(q * 1.5, k, v, GRID, SPARSE, n_suffix=n_suffix)
    return torch.nn.functional.gelu(out) + 1, kept_queries, kept_kv


def qkv(device="cpu", dtype=torch.float32, n_suffix=0):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, 256 + n_suffix, 64, generator=g).to(device, dtype) for _ in range(3)]


def test_op_matches_bsa_attention():
    q, k, v = qkv(n_suffix=8)
    out, kept_queries, kept_kv = bsa_attention_op(q, k, v, GRID, SPARSE, n_suffix=8)
    expected, selection = bsa_attention(q, k, v, GRID, SPARSE, n_suffix=8)
    torch.testing.assert_close(out, expected)
    assert float(kept_queries) == pytest.approx(0.5) and 0 < float(kept_kv) < 1


def test_op_passes_torch_library_checks():
    """Inputs as ComfyUI hands them over: [B, L, H*D] viewed as [B, H, L, D] (not contiguous)."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv())
    torch.library.opcheck(torch.ops.bsa.attention.default,
                          (q, k, v, list(GRID), [4, 4, 4], 0.5, torch.tensor([0.9, 1.0], dtype=torch.float64),
                           "cumulative", 1, True, 0, 0, 0.125, "auto"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_op_hands_every_setting_to_forward_and_backward(monkeypatch):
    """Every BSAConfig field crosses bsa::attention's schema in its place, into the forward and (rebuilt from the
    saved call) into the backward: a setting dropped or swapped there would pass silently on the CPU, where
    both halves run the reference."""
    import dataclasses

    from comfyui_bsa.bsa_core import attention, backward

    seen = {}

    class Selection:  # what the op reads of a selection at keep_ratio 1
        def kept_kv_fraction(self):
            return torch.ones((), dtype=torch.float64)

    def forward(q, k, v, grid, config, **kwargs):
        seen["forward"] = config
        return torch.zeros_like(q), Selection(), None

    def backward_of(q, k, v, out, grad_out, grid, config, *args, **kwargs):
        seen["backward"] = config
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    monkeypatch.setattr(attention, "bsa_attention", forward)
    monkeypatch.setattr(backward, "bsa_attention_backward", backward_of)
    config = BSAConfig((2, 2, 2), keep_ratio=1.0, kv_threshold=0.5, threshold_mode="cumulative", stat_lambda=2.0,
                       min_blocks=3, pooled_remainder=False)
    assert all(getattr(config, f.name) != f.default for f in dataclasses.fields(BSAConfig) if f.name != "keep_ratio")
    q = torch.randn(1, 2, 32, 8, requires_grad=True)
    out = attention.bsa_attention_op(q, q.detach(), q.detach(), (2, 4, 4), config)[0]
    out.sum().backward()
    assert seen["forward"] == config and seen["backward"] == config


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_without_graph_break_matches_eager(backend):
    torch._dynamo.reset()
    q, k, v = qkv(n_suffix=8)
    compiled = torch.compile(attention_block, backend=backend, fullgraph=True)
    for got, expected in zip(compiled(q, k, v, 8), attention_block(q, k, v, 8)):
        torch.testing.assert_close(got, expected)


def test_op_stays_out_of_cuda_graphs():
    """bsa::attention reads its thresholds from a CPU tensor on the host at each call; a CUDA graph replay
    (torch.compile's reduce-overhead / max-autotune) would keep the values of the recorded call."""
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip("this torch has no cudagraph_unsafe tag (nor graph partitioning: CPU inputs skip CUDA graphs)")
    assert torch.Tag.cudagraph_unsafe in torch.ops.bsa.attention.default.tags


@pytest.mark.gpu
def test_reduce_overhead_compile_reads_a_changed_threshold_on_cuda():
    """torch.compile with CUDA graphs around the op: a threshold changed in place or passed anew is the one
    the next call uses (the op is kept out of the graphs), as eager."""
    torch._dynamo.reset()
    q, k, v = qkv("cuda", torch.bfloat16)
    config = dataclasses.replace(SPARSE, threshold_mode="statistical", stat_lambda=0.0)
    thresholds = threshold_tensor(config)

    def block(q, k, v, thresholds):
        return torch.nn.functional.gelu(bsa_attention_op(q, k, v, GRID, config, thresholds=thresholds)[0]) + 1

    compiled = torch.compile(block, mode="reduce-overhead")
    for stat_lambda in (0.0, 1.5, -1.0):
        thresholds[1] = stat_lambda
        for _ in range(3):  # warm-up, recording, replays
            got = compiled(q, k, v, thresholds).clone()
        expected = block(q, k, v, threshold_tensor(dataclasses.replace(config, stat_lambda=stat_lambda)))
        torch.testing.assert_close(got, expected)
    assert not torch.allclose(block(q, k, v, threshold_tensor(config)), expected, atol=1e-2)


@pytest.mark.gpu
def test_inductor_on_cuda_with_model_layout_matches_eager():
    """q, k, v as a model hands them over, [B, H, L, D] views of [B, L, H, D] projections (the output's
    strides must be the fake's, or inductor's stride assert stops the graph)."""
    torch._dynamo.reset()
    x = torch.randn(3, 2, 256, 2 * 64, device="cuda", dtype=torch.bfloat16)

    def block(x):
        q, k, v = (x[i].view(2, 256, 2, 64).transpose(1, 2) for i in range(3))
        out = bsa_attention_op(q, k, v, GRID, dataclasses.replace(SPARSE, keep_ratio=1.0))[0]  # raster path
        return out.transpose(1, 2).reshape(2, 256, 128)

    torch.testing.assert_close(torch.compile(block, backend="inductor", fullgraph=True)(x), block(x))


@pytest.mark.gpu
def test_inductor_on_cuda_matches_eager():
    torch._dynamo.reset()
    q, k, v = qkv("cuda", torch.bfloat16)
    compiled = torch.compile(attention_block, backend="inductor", fullgraph=True)
    for got, expected in zip(compiled(q, k, v), attention_block(q, k, v)):
        torch.testing.assert_close(got, expected)


def test_comfyui_torch_compile_model_with_the_patch(tiny_wan_path, caplog):
    """ComfyUI's TorchCompileModel wrapper (aot_eager: no C++ compiler needed) over the patched tiny Wan:
    the family is still recognised through the compiled module, sampling goes sparse, and matches eager."""
    require_comfyui()  # skips without ComfyUI; the op tests above need none
    import logging

    import comfy.sd
    import nodes
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from comfy_env import apply_bsa

    def sample(model):
        g = torch.Generator().manual_seed(0)
        positive, negative = ([[torch.randn(1, 16, 4096, generator=g), {}]] for _ in range(2))
        latent = {"samples": torch.zeros(1, 16, 5, 16, 16)}
        return nodes.common_ksampler(model, 7, 2, 3.0, "euler", "simple", positive, negative, latent)[0]["samples"]

    torch._dynamo.reset()
    caplog.set_level(logging.INFO)
    patched = apply_bsa(comfy.sd.load_diffusion_model(str(tiny_wan_path)), SPARSE)
    compiled = patched.clone()
    set_torch_compile_wrapper(compiled, backend="aot_eager")
    eager_latent, compiled_latent = sample(patched), sample(compiled)
    eager_run, compiled_run = [r.bsa_run for r in caplog.records if hasattr(r, "bsa_run")]
    assert compiled_run == eager_run and compiled_run["sparse_calls"] == 4, compiled_run
    torch.testing.assert_close(compiled_latent, eager_latent, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("setting, before, after", [("kv_threshold", 0.5, 0.9), ("stat_lambda", 0.0, 1.0)])
def test_a_changed_threshold_reuses_the_compiled_model(tiny_wan_path, monkeypatch, setting, before, after):
    """TorchCompileModel after BSA, a threshold moved (a new BSA clone, as a slider change makes it): the
    compiled model samples at the new threshold, as eager does, without compiling again. A threshold read as
    a float was guarded on, so every new value recompiled the model (about a minute at Wan 1.3B on a GPU) and
    past Dynamo's 8 recompiles ran it eagerly. keep_ratio sets the saved LSE's shape: it compiles anew."""
    require_comfyui()
    import comfy.ldm.modules.attention
    import comfy.ldm.wan.model
    import comfy.sd
    import nodes
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    from comfy_env import apply_bsa

    def sample(model):
        g = torch.Generator().manual_seed(0)
        positive, negative = ([[torch.randn(1, 16, 4096, generator=g), {}]] for _ in range(2))
        latent = {"samples": torch.zeros(1, 16, 5, 16, 16)}
        return nodes.common_ksampler(model, 7, 2, 3.0, "euler", "simple", positive, negative, latent)[0]["samples"]

    monkeypatch.setattr(comfy.ldm.wan.model, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    base = comfy.sd.load_diffusion_model(str(tiny_wan_path))
    mode = "cumulative" if setting == "kv_threshold" else "statistical"
    torch._dynamo.reset()
    latents = {}
    for value, compiles in ((before, 1), (after, 0), (after, 0)):
        eager = apply_bsa(base, dataclasses.replace(SPARSE, threshold_mode=mode, **{setting: value}))
        compiled = eager.clone()
        set_torch_compile_wrapper(compiled, backend="aot_eager")
        counters.clear()
        latents[value] = sample(compiled)
        assert counters["frames"]["ok"] == compiles, (setting, value, dict(counters["frames"]))
        torch.testing.assert_close(latents[value], sample(eager), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(latents[before], latents[after], atol=1e-3)  # the new threshold took effect
    keep = apply_bsa(base, dataclasses.replace(SPARSE, threshold_mode=mode, keep_ratio=0.75, **{setting: after}))
    compiled = keep.clone()
    set_torch_compile_wrapper(compiled, backend="aot_eager")
    counters.clear()
    sample(compiled)
    assert counters["frames"]["ok"] == 1, dict(counters["frames"])


@pytest.mark.gpu
def test_override_and_fp8_linear_compile_without_graph_break_on_cuda():
    """The CUDA-only parts of a compiled Wan block trace whole (fullgraph): the BSA override's self-attention
    (its device checks) and cross-attention (dense, ComfyUI's SDPA), and a TDQ FP8 linear with fast
    accumulation. On an H200 (torch 2.11) the device queries broke the graph in every block, and with the
    per-layer TDQ patches Dynamo then recompiled block frames past its limit: compiled BSA+TDQ ran at eager speed."""
    require_comfyui()
    import comfy.ldm.modules.attention as comfy_attention

    from comfyui_bsa.bsa_core.adapters import TokenLayout
    from comfyui_bsa.bsa_core.patch import OVERRIDE_KEY, BlockRanges, BSAOptions, BSARun, make_override
    from comfyui_bsa.compression import fp8

    heads, head_dim = 2, 128
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 256, heads * head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    text = torch.randn(1, 16, heads * head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(256, heads * head_dim, generator=g, device="cuda")
    w_scale = fp8.weight_scales(weight)
    weight_fp8, x_scale = fp8.to_e4m3(weight, w_scale), torch.tensor(0.05, device="cuda")
    run = BSARun(BSAOptions(SPARSE, 0.0, 1.0, BlockRanges(), 0))
    options = {OVERRIDE_KEY: make_override(run, None)}

    attention = comfy_attention.attention_pytorch  # the GPU's (the tests run ComfyUI in CPU mode)

    def block(q, k, v, text):
        x = attention(q, k, v, heads, transformer_options=options)
        x = x + attention(x, text, text, heads, transformer_options=options)
        return fp8.fp8_linear(x, weight_fp8, w_scale, None, x_scale, fast_accum=True)

    def model_call(fn):
        run.begin_forward(TokenLayout("wan", GRID, 0, 0))
        return fn(q, k, v, text)

    eager = model_call(block)
    torch._dynamo.reset()
    compiled = model_call(torch.compile(block, fullgraph=True, backend="aot_eager"))
    assert run.stats.sparse_calls == 2 and run.stats.dense_reasons == {"cross-attention": 2}, run.stats.as_dict()
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)


def test_compiled_run_logs_what_an_eager_run_logs(monkeypatch, caplog):
    """Nothing is logged inside the graph (a log call broke it in every block): a compiled run says its
    attention backend and its dense reasons when it finishes, a failed sparse call as a warning, as eager does."""
    import logging

    from comfyui_bsa.bsa_core import patch
    from comfyui_bsa.bsa_core.adapters import TokenLayout

    def failing(*args, **kwargs):
        raise ValueError("boom")

    def sdpa(q, k, v, heads, **kwargs):
        qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).flatten(-2)

    def logged(compiled: bool, fail: bool) -> list[tuple[int, str]]:
        monkeypatch.setattr(patch, "bsa_attention_op", failing if fail else bsa_attention_op)
        run = patch.BSARun(patch.BSAOptions(SPARSE, 0.0, 1.0, patch.BlockRanges(), 0))
        override = patch.make_override(run, None)
        options = {patch.OVERRIDE_KEY: override}

        def model(x, text):
            x = x + override(sdpa, x, x, x, 2, transformer_options=options)
            return x + override(sdpa, x, text, text, 2, transformer_options=options)

        torch._dynamo.reset()
        fn = torch.compile(model, backend="eager", fullgraph=not fail) if compiled else model
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=patch.log.name):
            for _ in range(2):
                run.begin_forward(TokenLayout("wan", GRID, 0, 0), 16)
                fn(torch.randn(1, 256, 128), torch.randn(1, 16, 128))
            run.finish()
        return sorted((r.levelno, r.getMessage()) for r in caplog.records)

    for fail in (False, True):
        eager = logged(False, fail)
        assert logged(True, fail) == eager and any("attention backend" in m for _, m in eager), eager
    assert (logging.WARNING, "[BSA] dense: BSA failed (ValueError: boom)") in eager
