"""The whole Triton pipeline (permute, select, attention, scatter, extra tokens) vs the reference.

Without CUDA the kernels run in Triton's interpreter on tiny grids (TRITON_INTERPRET is set here,
before any kernel module is imported, only when there is no GPU)."""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from comfyui_bsa.bsa_core import attention  # noqa: E402
from comfyui_bsa.bsa_core.config import BSAConfig  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.bsa_core.reference import bsa_attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(B, H, L, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g).to(DEVICE, dtype) for _ in range(3))


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("grid, cube, dtype, n_prefix, n_suffix, keep, p, pooled", [
    ((3, 5, 6), (2, 2, 4), torch.bfloat16, 0, 0, 0.5, 0.6, False),
    ((3, 4, 5), (2, 2, 2), torch.float16, 4, 3, 0.5, 0.8, False),
    ((2, 4, 4), (2, 2, 4), torch.float16, 0, 5, 1.0, 1.0, False),
    ((3, 5, 6), (2, 2, 4), torch.bfloat16, 2, 3, 1.0, 0.5, True),
    ((5, 6, 9), (4, 4, 4), torch.bfloat16, 0, 2, 1.0, 0.6, True),
], ids=["partial-bf16", "extras-fp16", "dense-fp16", "pooled-remainder-bf16", "pooled-one-cube-tiles-bf16"])
def test_triton_pipeline_matches_reference(grid, cube, dtype, n_prefix, n_suffix, keep, p, pooled):
    B, H, D = 2, 3, 32
    L = n_prefix + math.prod(grid) + n_suffix
    q, k, v = _qkv(B, H, L, D, dtype, seed=7)
    config = BSAConfig(cube, keep_ratio=keep, kv_threshold=p, pooled_remainder=pooled, threshold_mode="cumulative")
    layout = cube_layout(grid, cube, DEVICE)
    scale = 1.0 / math.sqrt(D)
    out, selection, _ = attention._bsa_attention_triton(q, k, v, layout, config, scale, n_prefix, n_suffix)
    ref, ref_selection = bsa_attention_reference(q, k, v, layout, config, scale, n_prefix, n_suffix,
                                                 selection=selection)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert _rel(out, ref) < 2e-2
    # the kernels select what the reference selects on these tie-free inputs
    own = bsa_attention_reference(q, k, v, layout, config, scale, n_prefix, n_suffix)[1]
    assert torch.equal(selection.kv_count, own.kv_count) and torch.equal(selection.q_index, own.q_index)
    if keep == 1.0 and p == 1.0:
        assert _rel(out, torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())) < 2e-2


def test_auto_backend_is_reference_without_cuda():
    q = torch.zeros(1, 1, 8, 32)
    assert attention.choose_backend(q)[0] == ("triton" if q.is_cuda else "reference")
    with pytest.raises(ValueError, match="backend"):
        attention.choose_backend(q, "fast")


@pytest.mark.gpu
@pytest.mark.parametrize("grid, heads, D, keep, pooled", [((9, 30, 52), 4, 128, 0.5, False),
                                                          ((5, 17, 23), 2, 64, 0.5, False),
                                                          ((9, 30, 52), 4, 128, 0.5, True),
                                                          ((9, 30, 52), 4, 128, 1.0, True)],
                         ids=["480p-slice", "odd-64", "480p-slice-pooled", "480p-slice-pooled-all-queries"])
def test_triton_backend_on_gpu(grid, heads, D, keep, pooled):
    q, k, v = _qkv(1, heads, math.prod(grid) + 16, D, torch.bfloat16, seed=3)
    config = BSAConfig((4, 4, 4), keep_ratio=keep, kv_threshold=0.7, pooled_remainder=pooled,
                       threshold_mode="cumulative")
    out, selection = attention.bsa_attention(q, k, v, grid, config, n_suffix=16, backend="triton")
    layout = cube_layout(grid, config.cube_size, DEVICE)
    ref, _ = bsa_attention_reference(q, k, v, layout, config, None, 0, 16, selection=selection)
    assert torch.isfinite(out).all() and _rel(out, ref) < 2e-2
    dense, _ = attention.bsa_attention(q, k, v, grid, BSAConfig(keep_ratio=1.0, kv_threshold=1.0,
                                                                threshold_mode="cumulative", pooled_remainder=False), n_suffix=16,
                                       backend="triton")
    assert _rel(dense, torch.nn.functional.scaled_dot_product_attention(q, k, v)) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "no-pool"])
def test_gpu_call_reads_kv_from_the_raster_where_it_can(monkeypatch, pooled):
    """On the Gluon Hopper kernel a call at keep_ratio 1 skips the K/V permute (only their means are written) and
    returns what the permuted call returns, bit for bit, in ComfyUI's [B, L, H, D] strides with a CFG batch."""
    from comfyui_bsa.kernels import block_sparse_attention as kernel_module
    from comfyui_bsa.kernels import cube_permute

    grid, B, H, D = (9, 30, 52), 2, 4, 128
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, math.prod(grid), H, D, generator=g).to(DEVICE, torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    if kernel_module.hopper_path_reason(q, D, 64, 1, False) is not None:
        pytest.skip(f"Gluon Hopper kernel: {kernel_module.hopper_path_reason(q, D, 64, 1, False)}")
    config = BSAConfig((4, 4, 4), keep_ratio=1.0, pooled_remainder=pooled)
    asked = []
    permute_qkv = cube_permute.permute_qkv
    monkeypatch.setattr(cube_permute, "permute_qkv", lambda *a, **kw: asked.append(kw["kv_cubes"]) or
                        permute_qkv(*a, **kw))
    raster, _ = attention.bsa_attention(q, k, v, grid, config, backend="triton")
    monkeypatch.setattr(kernel_module, "raster_kv_reason", lambda *args: "switched off by the test")
    permuted, _ = attention.bsa_attention(q, k, v, grid, config, backend="triton")
    assert asked == [False, True]
    assert torch.isfinite(raster).all() and torch.equal(raster, permuted)


@pytest.mark.gpu
@pytest.mark.parametrize("n_prefix, n_suffix, pooled", [(0, 0, True), (5, 257, True), (0, 40, False)],
                         ids=["wan", "text-and-reference", "guides-no-pool"])
def test_gpu_call_has_no_host_sync_and_replays_from_a_cuda_graph(n_prefix, n_suffix, pooled):
    """A warm BSA call at Wan 480p never waits for the GPU (sync debug mode 'error'), so it can be captured in a
    CUDA graph; the replay equals the eager call."""
    grid, H, D = (21, 30, 52), 4, 128
    L = n_prefix + math.prod(grid) + n_suffix
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _qkv(1, H, L, D, torch.bfloat16, seed=3))
    config = BSAConfig(keep_ratio=1.0, threshold_mode="statistical", stat_lambda=1.0, pooled_remainder=pooled)

    def call():
        return attention.bsa_attention_op(q, k, v, grid, config, n_prefix=n_prefix, n_suffix=n_suffix)

    eager = call()[0].clone()  # compiles, tunes and fills the per-layout caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()[0]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
