"""Selection-side kernels (cube permutation, query selection, KV selection, output scatter) vs the
pure-torch reference.

Without CUDA the kernels run in Triton's interpreter on tiny grids (TRITON_INTERPRET must be set
before a kernel module is imported, so it is set here, at import, only when there is no GPU). Inputs
are random fp32 values cast to the test dtype, with no near-ties, so indices must match exactly; the
tie cases check the documented tie order instead.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from comfyui_bsa.bsa_core import reference  # noqa: E402
from comfyui_bsa.bsa_core.config import BSAConfig  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.bsa_core.selection import mask_to_index  # noqa: E402
from comfyui_bsa.bsa_core.gpu_select import select_triton  # noqa: E402
from comfyui_bsa.kernels.cube_permute import cube_permute, grad_permute, permute_qkv  # noqa: E402
from comfyui_bsa.kernels.kv_select import kv_select  # noqa: E402
from comfyui_bsa.kernels.output_scatter import output_scatter  # noqa: E402
from comfyui_bsa.kernels.query_select import query_select  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def assert_same_lists(got, ref):
    """Equal index lists: the kernels may pad to a wider bound than the reference (all -1 there)."""
    width = ref.shape[-1]
    assert got.shape[:-1] == ref.shape[:-1] and got.shape[-1] >= width, (tuple(got.shape), tuple(ref.shape))
    assert torch.equal(got[..., :width], ref)
    assert (got[..., width:] == -1).all()


def _randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


# ---------------------------------------------------------------- cube permutation

@pytest.mark.parametrize("grid, cube, dtype, n_prefix, n_suffix", [
    ((3, 5, 7), (2, 2, 4), "bf16", 5, 2),
    ((5, 6, 7), (4, 4, 4), "fp16", 0, 0),
    ((2, 3, 9), (1, 2, 8), "fp32", 3, 0),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_cube_permute(grid, cube, dtype, n_prefix, n_suffix):
    layout = cube_layout(grid, cube, DEVICE)
    L = n_prefix + layout.num_tokens + n_suffix
    x = _randn(2, L, 3, 32, seed=0, dtype=DTYPES[dtype]).transpose(1, 2)  # [B, H, L, D] view, as models give it
    cubes, k_bar = cube_permute(x, layout, n_prefix=n_prefix, with_mean=True)
    ref = layout.to_cubes(x[:, :, n_prefix:n_prefix + layout.num_tokens])
    assert torch.equal(cubes, ref)
    torch.testing.assert_close(k_bar, ref.float().sum(-2) / layout.n_valid[:, None].float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(cube_permute(x, layout, n_prefix=n_prefix), ref)


@pytest.mark.parametrize("grid, cube, dtype, n_prefix", [((3, 5, 7), (2, 2, 4), "bf16", 5), ((2, 3, 9), (1, 2, 8), "fp32", 0)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_grad_permute_equals_permute_and_row_dot(grid, cube, dtype, n_prefix):
    """The backward's first pass: dO in cube order (exact) and rowsum(dO * O) per slot, from strided inputs."""
    layout = cube_layout(grid, cube, DEVICE)
    L = n_prefix + layout.num_tokens + 3
    grad, out = (_randn(2, L, 3, 32, seed=s, dtype=DTYPES[dtype]).transpose(1, 2) for s in (1, 2))
    grad_cubes, delta = grad_permute(grad, out, layout, n_prefix)
    video = slice(n_prefix, n_prefix + layout.num_tokens)
    assert torch.equal(grad_cubes, layout.to_cubes(grad[:, :, video]))
    want = layout.to_cubes((grad[:, :, video].float() * out[:, :, video].float()).sum(-1, keepdim=True))[..., 0]
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-5)
    assert not delta[..., ~layout.slot_valid].any()  # padding slots: 0


def test_cube_permute_rejects_short_input():
    layout = cube_layout((2, 4, 4), (2, 2, 2), DEVICE)
    with pytest.raises(ValueError, match="n_prefix"):
        cube_permute(_randn(1, 1, 32, 16, seed=0), layout, n_prefix=1)


# ---------------------------------------------------------------- query selection

@pytest.mark.parametrize("grid, cube, dtype, keep_ratio", [
    ((3, 5, 7), (2, 2, 4), "fp16", 0.5),
    ((3, 5, 7), (2, 2, 4), "bf16", 0.3),  # 0.3 * 10 keeps 3, not 4
    ((5, 6, 7), (4, 4, 4), "bf16", 0.25),
    ((3, 5, 7), (2, 2, 4), "fp16", 1.0),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_query_select(grid, cube, dtype, keep_ratio):
    layout = cube_layout(grid, cube, DEVICE)
    q_cubes = layout.to_cubes(_randn(2, 3, layout.num_tokens, 32, seed=1, dtype=DTYPES[dtype]))
    q_count, q_index, q_source, q_bar = query_select(q_cubes, layout, keep_ratio)
    ref_count, ref_index, ref_source = reference.select_queries(q_cubes, layout, keep_ratio)
    ref_q_bar, _ = reference.pooled_cubes(q_cubes, q_cubes, layout, ref_count, ref_index)
    assert torch.equal(q_count, ref_count)
    assert torch.equal(q_index, ref_index)
    assert torch.equal(q_source, ref_source)
    torch.testing.assert_close(q_bar, ref_q_bar, rtol=1e-6, atol=1e-6)


def test_query_select_ties_take_lower_slots():
    # all-zero queries: every cosine is 0, so the keep set and every source follow slot order
    layout = cube_layout((3, 4, 6), (2, 2, 4), DEVICE)
    q_cubes = torch.zeros(1, 1, layout.num_cubes, layout.cube_volume, 16, device=DEVICE, dtype=torch.float16)
    got = query_select(q_cubes, layout, 0.5)[:3]
    for a, b in zip(got, reference.select_queries(q_cubes, layout, 0.5)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- KV selection

_KV_CASES = {
    "cum-p0.5": BSAConfig((2, 2, 4), kv_threshold=0.5, threshold_mode="cumulative", pooled_remainder=False, keep_ratio=0.5),
    "cum-p0.9-min4": BSAConfig((2, 2, 4), kv_threshold=0.9, min_blocks=4,
                               threshold_mode="cumulative", pooled_remainder=False, keep_ratio=0.5),
    "cum-p1": BSAConfig((2, 2, 4), kv_threshold=1.0, threshold_mode="cumulative", pooled_remainder=False, keep_ratio=0.5),
    "stat-l0.5-min3": BSAConfig((2, 2, 4), threshold_mode="statistical", stat_lambda=0.5, min_blocks=3, keep_ratio=0.5, pooled_remainder=False),
    "stat-l-0.5": BSAConfig((2, 2, 4), threshold_mode="statistical", stat_lambda=-0.5, keep_ratio=0.5, pooled_remainder=False),
}


@pytest.mark.parametrize("name", list(_KV_CASES))
def test_kv_select(name):
    config = _KV_CASES[name]
    layout = cube_layout((3, 5, 7), (2, 2, 4), DEVICE)
    N, scale = layout.num_cubes, 0.25
    q_bar, k_bar = _randn(2, 3, N, 32, seed=2) * 2, _randn(2, 3, N, 32, seed=3)
    kv_count, kv_index = kv_select(q_bar, k_bar, layout, config, scale)
    ref_count, ref_index = mask_to_index(reference.select_kv(reference.block_logits(q_bar, k_bar, layout, scale), config))
    assert torch.equal(kv_count, ref_count)
    assert_same_lists(kv_index, ref_index)


def test_kv_select_in_head_groups_equals_one_group(monkeypatch):
    """Heads whose logits do not fit the scratch at once go in groups (one host sync each, index trimmed to
    the largest count): the same lists as all heads in one group (no sync, width N)."""
    from comfyui_bsa.kernels import kv_select as module
    layout = cube_layout((3, 5, 7), (2, 2, 4), DEVICE)
    N = layout.num_cubes
    config = BSAConfig((2, 2, 4), threshold_mode="statistical", stat_lambda=0.5, keep_ratio=0.5, pooled_remainder=False)
    q_bar, k_bar = _randn(2, 3, N, 32, seed=12) * 2, _randn(2, 3, N, 32, seed=13)
    count, index = kv_select(q_bar, k_bar, layout, config, 0.25)
    assert index.shape[-1] == N
    monkeypatch.setattr(module, "_SCRATCH_ELEMENTS", 2 * N * N)  # 6 heads -> 3 groups of 2
    grouped_count, grouped_index = kv_select(q_bar, k_bar, layout, config, 0.25)
    assert torch.equal(grouped_count, count)
    assert grouped_index.shape[-1] == int(count.max()) < N
    assert_same_lists(index, grouped_index)


@pytest.mark.parametrize("mode", ["cumulative", "statistical"])
def test_kv_select_ties_in_index_order(mode):
    # zero pools: every full cube has the same mass; min_blocks then takes the lowest indices
    layout = cube_layout((3, 4, 6), (2, 2, 2), DEVICE)
    config = BSAConfig((2, 2, 2), kv_threshold=0.3, threshold_mode=mode, min_blocks=3, keep_ratio=0.5, pooled_remainder=False)
    pools = torch.zeros(1, 2, layout.num_cubes, 16, device=DEVICE)
    kv_count, kv_index = kv_select(pools, pools, layout, config, 0.5)
    ref_count, ref_index = mask_to_index(reference.select_kv(reference.block_logits(pools, pools, layout, 0.5), config))
    assert torch.equal(kv_count, ref_count)
    assert_same_lists(kv_index, ref_index)


# ---------------------------------------------------------------- output scatter

@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_output_scatter(dtype):
    layout = cube_layout((3, 5, 7), (2, 2, 4), DEVICE)
    q_cubes = layout.to_cubes(_randn(2, 3, layout.num_tokens, 16, seed=4))
    _, q_index, q_source = reference.select_queries(q_cubes, layout, 0.4)
    B, H, N, Kq = q_index.shape
    kept = _randn(B, H, N, Kq, 16, seed=5, dtype=DTYPES[dtype])
    out = torch.full((B, H, 4 + layout.num_tokens + 3, 16), 7.0, device=DEVICE, dtype=DTYPES[dtype])
    output_scatter(kept, q_source, layout, out, n_prefix=4)
    source = q_source.clamp(min=0).long()[..., None].expand(B, H, N, layout.cube_volume, 16)
    assert torch.equal(out[:, :, 4:4 + layout.num_tokens], layout.to_raster(kept.gather(-2, source)))
    assert (out[:, :, :4] == 7).all() and (out[:, :, -3:] == 7).all()


# ---------------------------------------------------------------- composed selection

@pytest.mark.parametrize("dtype, config", [
    ("fp16", BSAConfig((2, 2, 4), keep_ratio=0.4, kv_threshold=0.8, min_blocks=2,
                       threshold_mode="cumulative", pooled_remainder=False)),
    ("bf16", BSAConfig((2, 2, 4), keep_ratio=0.6, threshold_mode="statistical", stat_lambda=0.3, pooled_remainder=False)),
], ids=["fp16-cumulative", "bf16-statistical"])
def test_select_triton(dtype, config):
    layout = cube_layout((3, 5, 7), (2, 2, 4), DEVICE)
    x = _randn(2, 3, 2 * layout.num_tokens, 32, seed=6, dtype=DTYPES[dtype])
    q_cubes, (k_cubes, k_bar) = layout.to_cubes(x[:, :, ::2]), cube_permute(x[:, :, 1::2], layout, with_mean=True)
    got = select_triton(q_cubes, k_cubes, layout, config, 0.2, k_bar=k_bar)
    ref = reference.bsa_select(q_cubes, k_cubes, layout, config, 0.2)
    for name in ("q_count", "q_index", "q_source", "kv_count"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert_same_lists(got.kv_index, ref.kv_index)


def test_select_triton_one_cube():
    layout = cube_layout((2, 3, 3), (4, 4, 4), DEVICE)  # one partial cube of 18 tokens
    config = BSAConfig((4, 4, 4), keep_ratio=0.3, kv_threshold=0.5, min_blocks=2,
                       threshold_mode="cumulative", pooled_remainder=False)
    q_cubes, k_cubes = (layout.to_cubes(_randn(2, 3, layout.num_tokens, 16, seed=s, dtype=torch.float16)) for s in (10, 11))
    got = select_triton(q_cubes, k_cubes, layout, config, 0.25)
    ref = reference.bsa_select(q_cubes, k_cubes, layout, config, 0.25)
    for name in ("q_count", "q_index", "q_source", "kv_count"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert_same_lists(got.kv_index, ref.kv_index)


# ---------------------------------------------------------------- GPU sizes

def _agreement(a, b):
    """Share of equal elements."""
    return float((a == b).float().mean())


@pytest.mark.gpu
@pytest.mark.parametrize("cube, D", [((4, 4, 4), 128), ((2, 8, 8), 64)], ids=["c4x4x4-D128", "c2x8x8-D64"])
def test_select_triton_gpu(cube, D):
    """Wan-like grid (partial cubes on every axis): exact where the reference has no near-ties."""
    layout = cube_layout((9, 30, 52), cube, DEVICE)
    B, H, n_prefix = 2, 4, 7
    L = n_prefix + layout.num_tokens
    q, k = (_randn(B, L, H, D, seed=s, dtype=torch.bfloat16).transpose(1, 2) for s in (7, 8))
    q_cubes = cube_permute(q, layout, n_prefix=n_prefix)
    k_cubes, k_bar = cube_permute(k, layout, n_prefix=n_prefix, with_mean=True)
    assert torch.equal(q_cubes, layout.to_cubes(q[:, :, n_prefix:]))
    for config in (BSAConfig(cube, keep_ratio=0.5, kv_threshold=0.9, min_blocks=4,
                             threshold_mode="cumulative", pooled_remainder=False),
                   BSAConfig(cube, keep_ratio=0.25, threshold_mode="statistical", stat_lambda=1.0, pooled_remainder=False)):
        scale = 1 / math.sqrt(D)
        got = select_triton(q_cubes, k_cubes, layout, config, scale, k_bar=k_bar)
        ref = reference.bsa_select(q_cubes, k_cubes, layout, config, scale)
        assert torch.equal(got.q_count, ref.q_count)
        assert _agreement(got.q_index, ref.q_index) > 0.999
        assert _agreement(got.q_source, ref.q_source) > 0.999
        dense_got, dense_ref = got.to_dense(), ref.to_dense()
        assert _agreement(dense_got, dense_ref) > 0.99
        assert dense_got.diagonal(dim1=-2, dim2=-1).all()
        assert (got.kv_count >= config.min_blocks).all()
        kept_out = _randn(B, H, layout.num_cubes, got.q_index.shape[-1], D, seed=9, dtype=torch.bfloat16)
        out = output_scatter(kept_out, got.q_source, layout)
        source = got.q_source.clamp(min=0).long()[..., None].expand(*got.q_source.shape, D)
        assert torch.equal(out, layout.to_raster(kept_out.gather(-2, source)))


@pytest.mark.parametrize("kv_cubes", [True, False], ids=["kv-cubes", "kv-means"])
@pytest.mark.parametrize("q_cubes", [False, True], ids=["q-mean", "q-cubes"])
@pytest.mark.parametrize("pooled", [False, True], ids=["no-pooled", "pooled"])
def test_permute_qkv_equals_three_permutes(q_cubes, pooled, kv_cubes):
    """One launch for Q, K and V gives what cube_permute gives for each (strided [B, L, H, D] views); without
    kv_cubes (the Hopper kernel reads K/V from the raster) the same means and no K/V cubes."""
    layout = cube_layout((3, 5, 7), (2, 2, 4), DEVICE)
    n_prefix, L = 2, 2 + 105 + 3
    q, k, v = (_randn(2, L, 3, 32, seed=s, dtype=torch.bfloat16).transpose(1, 2) for s in (1, 2, 3))
    qc, qm, kc, km, vc, k16, v16 = permute_qkv(q, k, v, layout, n_prefix, q_cubes=q_cubes, pooled=pooled,
                                               kv_cubes=kv_cubes)
    assert (kc is None) != kv_cubes and (vc is None) != kv_cubes and km is not None
    for x, cubes, mean, mean16 in ((k, kc, km, k16), (v, vc, None, v16), (q, qc, qm, None)):
        want_cubes, want_mean = cube_permute(x, layout, n_prefix, with_mean=True)
        if cubes is not None:
            assert torch.equal(cubes, want_cubes)
        if mean is not None:
            assert torch.allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
        if mean16 is not None:
            assert mean16.dtype == x.dtype and torch.allclose(mean16.float(), want_mean, rtol=8e-3, atol=1e-3)  # bf16 rounding
    assert (qc is None) != q_cubes and (qm is None) == q_cubes and (k16 is None) != pooled and (v16 is None) != pooled
