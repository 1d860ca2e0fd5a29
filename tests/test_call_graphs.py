"""BSA calls replayed from CUDA graphs (bsa_core/call_graphs.py) against the same calls launched: the same bits for
new inputs of a captured shape, outputs that a later replay does not overwrite, the caller's strides, autograd
and budgets that launch instead, and a patched ComfyUI attention call replaying inside a run. Marked gpu:
skipped without CUDA, except the CPU checks at the end.

    python3 -m pytest -q -m gpu tests/test_call_graphs.py
"""
import dataclasses
import logging
import math

import pytest
import torch
from test_fuzz_attention import comfy_attention  # noqa: F401  (fixture: ComfyUI's attention module)

from comfyui_bsa.bsa_core.attention import bsa_attention_op
from comfyui_bsa.bsa_core.call_graphs import CallGraphs, active_call_graphs, replaying_calls
from comfyui_bsa.bsa_core.config import RECOMMENDED

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (grid, heads, head_dim, keep_ratio, tokens after the video): the Hopper raster path, the portable kept-query
# path with its scatter, and extra tokens (their dense rows run SDPA inside the graph)
CASES = {
    "raster-hd128": ((5, 16, 24), 4, 128, 1.0, 0),
    "kept-queries-hd64": ((4, 12, 20), 3, 64, 0.5, 0),
    "suffix-tokens": ((4, 16, 16), 2, 128, 1.0, 96),
}


def _qkv(grid, heads, head_dim, n_suffix, seed, batch=1):
    g = torch.Generator("cuda").manual_seed(seed)
    tokens = math.prod(grid) + n_suffix
    return tuple(torch.randn(batch, heads, tokens, head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
                 for _ in range(3))


def _call(q, k, v, grid, config, n_suffix):
    return bsa_attention_op(q, k, v, grid, config, n_suffix=n_suffix)


@gpu
@needs_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_replay_matches_launch(case):
    grid, heads, head_dim, keep_ratio, n_suffix = CASES[case]
    config = dataclasses.replace(RECOMMENDED, keep_ratio=keep_ratio)
    inputs = [_qkv(grid, heads, head_dim, n_suffix, seed) for seed in range(3)]
    launched = [_call(*qkv, grid, config, n_suffix) for qkv in inputs]
    with replaying_calls() as graphs:
        replayed = [_call(*qkv, grid, config, n_suffix) for qkv in inputs]
        assert (graphs.captures, graphs.replays) == (1, 2)
        assert graphs.calls  # held while the run lasts
    assert not graphs.calls  # freed with the run
    for got, want in zip(replayed, launched):  # each its own call's result: no output overwritten by a later replay
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert len({float(r[2]) for r in replayed}) > 1  # the selections differ: the graph did select again


@gpu
@needs_cuda
def test_replay_takes_any_strides_of_a_shape():
    """The patch hands q, k, v as [B, H, L, D] views of ComfyUI's [B, L, H*D]; a later call may be contiguous."""
    grid, heads, head_dim, _, _ = CASES["raster-hd128"]
    q, k, v = _qkv(grid, heads, head_dim, 0, seed=4, batch=2)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    want = _call(q, k, v, grid, RECOMMENDED, 0)
    with replaying_calls() as graphs:
        first = _call(*views, grid, RECOMMENDED, 0)
        second = _call(q, k, v, grid, RECOMMENDED, 0)
        assert (graphs.captures, graphs.replays) == (1, 1)
    for got in (first, second):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@gpu
@needs_cuda
def test_autograd_through_a_replay():
    """A replayed op's outputs are fresh tensors, so what autograd saves of a call is that call's: the same
    gradients as launched calls (training runs of the patch launch anyway)."""
    grid, heads, head_dim, _, _ = CASES["raster-hd128"]
    weights = torch.randn(math.prod(grid), head_dim, device="cuda")

    def grads(seed):
        q, k, v = (t.requires_grad_() for t in _qkv(grid, heads, head_dim, 0, seed=seed))
        (_call(q, k, v, grid, RECOMMENDED, 0)[0].float() * weights).sum().backward()
        return [t.grad for t in (q, k, v)]

    want = [grads(seed) for seed in (5, 6)]
    with replaying_calls() as graphs:
        got = [grads(seed) for seed in (5, 6)]
        assert (graphs.captures, graphs.replays) == (1, 1)
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(g, w))


@gpu
@needs_cuda
def test_budgets_launch_or_evict(caplog):
    grid, heads, head_dim, _, _ = CASES["raster-hd128"]
    qkv = _qkv(grid, heads, head_dim, 0, seed=6)
    want = _call(*qkv, grid, RECOMMENDED, 0)
    tiny = CallGraphs(memory_share=1e-9)  # no graph fits: every call launches, and the log says why once
    launch = lambda q, k, v: _call(q, k, v, grid, RECOMMENDED, 0)  # noqa: E731
    with caplog.at_level(logging.INFO, logger=CallGraphs.__module__):
        assert all(tiny.run(launch, qkv, "key") is None for _ in range(2))
    assert "budget" in next(iter(tiny.refused.values()))
    assert [r.getMessage() for r in caplog.records] == [f"[BSA] a call shape runs without CUDA graph replay: "
                                                        f"{next(iter(tiny.refused.values()))}"]
    small = CallGraphs(max_input_bytes=qkv[0].numel() * 2 - 1)
    assert small.skip_reason(qkv) == "inputs large enough to hide the launches"
    two = CallGraphs(max_graphs=2)
    for key in ("a", "b", "c", "a"):
        got = two.run(launch, qkv, key)
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert [key[0] for key in two.calls] == ["c", "a"]  # "b" dropped first, "a" captured again
    assert two.captures == 4 and two.replays == 0
    two.clear()


@gpu
@needs_cuda
def test_patched_attention_replays_in_a_run(comfy_attention):  # noqa: F811
    """ComfyUI's optimized_attention with the BSA override, as a sampling run calls it: replayed after the first
    call of the run, the same output as the launched call."""
    from comfyui_bsa.bsa_core.adapters import TokenLayout
    from comfyui_bsa.bsa_core.patch import OVERRIDE_KEY, BlockRanges, BSAOptions, BSARun, make_override

    grid, heads = (5, 16, 24), 4
    g = torch.Generator("cuda").manual_seed(7)
    q, k, v = (torch.randn(1, math.prod(grid), heads * 128, generator=g, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    run = BSARun(BSAOptions(RECOMMENDED, 0.0, 1.0, BlockRanges(), 0))
    options = {OVERRIDE_KEY: make_override(run, None)}

    def model_call():
        run.begin_forward(TokenLayout("wan", grid, 0, 0))
        return comfy_attention.optimized_attention(q, k, v, heads, transformer_options=options)

    launched = model_call()
    with torch.inference_mode(), replaying_calls() as graphs:
        replayed = [model_call() for _ in range(3)]
        assert (graphs.captures, graphs.replays) == (1, 2)
    assert run.stats.sparse_calls == 4 and not run.stats.dense_reasons
    assert all(torch.equal(out, launched) for out in replayed)


@gpu
@needs_cuda
def test_inductor_compiled_attention_replays_in_a_run(comfy_attention):  # noqa: F811
    """A model compiled by inductor (ComfyUI's TorchCompileModel) runs BSA as the custom op; inside a sampling
    run the op's body replays all the same: the outputs of the launched eager calls, one capture."""
    from comfyui_bsa.bsa_core.adapters import TokenLayout
    from comfyui_bsa.bsa_core.patch import OVERRIDE_KEY, BlockRanges, BSAOptions, BSARun, make_override

    grid, heads = (5, 16, 24), 4
    g = torch.Generator("cuda").manual_seed(11)
    inputs = [tuple(torch.randn(1, math.prod(grid), heads * 128, generator=g, device="cuda", dtype=torch.bfloat16)
                    for _ in range(3)) for _ in range(3)]
    run = BSARun(BSAOptions(RECOMMENDED, 0.0, 1.0, BlockRanges(), 0))
    options = {OVERRIDE_KEY: make_override(run, None)}
    attention = comfy_attention.attention_pytorch  # the GPU's (the tests run ComfyUI in CPU mode)

    def block(q, k, v):
        return attention(q * 0.5, k, v, heads, transformer_options=options) + 1

    def model_call(fn, qkv):
        run.begin_forward(TokenLayout("wan", grid, 0, 0))
        return fn(*qkv)

    launched = [model_call(block, qkv) for qkv in inputs]
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="inductor", fullgraph=True)
    with torch.inference_mode(), replaying_calls() as graphs:
        replayed = [model_call(compiled, qkv) for qkv in inputs]
        assert (graphs.captures, graphs.replays) == (1, 2)
    assert run.stats.sparse_calls == 6 and not run.stats.dense_reasons
    for got, want in zip(replayed, launched):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    assert not torch.allclose(replayed[0], replayed[1])  # new inputs each call, not a stale replay


def test_disabled_or_cpu_calls_launch(monkeypatch):
    """Off (training runs, BSA_CUDA_GRAPHS=0) there is no CallGraphs; CPU calls inside a run launch as before."""
    with replaying_calls(enabled=False) as graphs:
        assert graphs is None and active_call_graphs() is None
    monkeypatch.setenv("BSA_CUDA_GRAPHS", "0")
    with replaying_calls() as graphs:
        assert graphs is None
    monkeypatch.delenv("BSA_CUDA_GRAPHS")
    grid = (2, 4, 4)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    want = bsa_attention_op(q, k, v, grid, dataclasses.replace(RECOMMENDED, cube_size=(2, 2, 2)))
    with replaying_calls() as graphs:
        assert active_call_graphs() is graphs
        assert graphs.skip_reason((q, k, v)) == "not CUDA"
        got = bsa_attention_op(q, k, v, grid, dataclasses.replace(RECOMMENDED, cube_size=(2, 2, 2)))
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and graphs.captures == 0
