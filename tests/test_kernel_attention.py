"""Block-sparse attention kernel vs the pure-torch reference, given the same BSASelection.

Without CUDA the kernel runs in Triton's interpreter on tiny shapes (TRITON_INTERPRET must be set
before the kernel module is imported, so it is set here, at import, only when there is no GPU).
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from comfyui_bsa.bsa_core.config import BSAConfig  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.bsa_core.reference import bsa_select, sparse_attention_reference  # noqa: E402
from comfyui_bsa.bsa_core.selection import BSASelection, mask_to_index  # noqa: E402
from comfyui_bsa.kernels import block_sparse_attention as kernel_module  # noqa: E402
from comfyui_bsa.kernels.block_sparse_attention import (  # noqa: E402
    _group_table, _key_block, block_sparse_attention, block_sparse_attention_raster)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel_rms(out, ref):
    return float((out.float() - ref.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt().clamp(min=1e-12))


def _inputs(B, H, grid, cube, D, dtype, seed, E=0):
    g = torch.Generator().manual_seed(seed)
    layout = cube_layout(grid, cube, DEVICE)
    L = math.prod(grid)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(DEVICE, dtype) for _ in range(3))
    qc, kc, vc = (layout.to_cubes(x).contiguous() for x in (q, k, v))
    ke = torch.randn(B, H, E, D, generator=g).to(DEVICE, dtype) if E else None
    ve = torch.randn(B, H, E, D, generator=g).to(DEVICE, dtype) if E else None
    return layout, qc, kc, vc, ke, ve


def scatter_kept(out_kept, q_source, slot_valid):
    """[B,H,N,Kq,D] kept outputs -> [B,H,N,S,D]: every slot copies its source (padding slots 0)."""
    B, H, N, _, D = out_kept.shape
    src = q_source.clamp(min=0).long()[..., None].expand(B, H, N, q_source.shape[-1], D)
    return out_kept.gather(-2, src) * slot_valid.to(out_kept.device)[..., None].to(out_kept.dtype)


def _run(layout, qc, kc, vc, sel, scale, ke=None, ve=None, group=None):
    kept = block_sparse_attention(qc, kc, vc, sel.q_index, sel.kv_count, sel.kv_index, layout.slot_valid, scale,
                                  ke, ve, cubes_per_program=group)
    return scatter_kept(kept, sel.q_source, layout.slot_valid)


CASES = [  # (B, H, grid, cube, D, dtype, keep_ratio, kv_threshold, E, group)
    (2, 3, (3, 5, 6), (2, 2, 2), 16, torch.float16, 0.5, 0.6, 0, None),
    (2, 3, (3, 5, 6), (2, 2, 2), 16, torch.bfloat16, 0.5, 0.6, 5, 1),
    (1, 2, (5, 4, 7), (2, 2, 4), 32, torch.bfloat16, 0.4, 0.5, 0, 2),
    (2, 3, (4, 4, 4), (2, 2, 4), 64, torch.float16, 1.0, 1.0, 3, 1),
    (1, 3, (3, 3, 9), (2, 2, 4), 16, torch.bfloat16, 0.3, 0.2, 17, 3),
]


def _case_id(c):
    B, H, grid, cube, D, dtype, r, p, E, group = c
    return (f"B{B}-H{H}-T{'x'.join(map(str, grid))}-c{'x'.join(map(str, cube))}-D{D}-"
            f"{str(dtype).split('.')[-1]}-r{r}-p{p}-E{E}-G{group}")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(case):
    B, H, grid, cube, D, dtype, r, p, E, group = case
    layout, qc, kc, vc, ke, ve = _inputs(B, H, grid, cube, D, dtype, seed=hash(_case_id(case)) % 1000, E=E)
    scale = D ** -0.5
    sel = bsa_select(qc, kc, layout, BSAConfig(cube_size=cube, keep_ratio=r, kv_threshold=p,
                                               threshold_mode="cumulative", pooled_remainder=False), scale)
    ref = sparse_attention_reference(qc, kc, vc, layout, sel, scale, ke, ve)
    out = _run(layout, qc, kc, vc, sel, scale, ke, ve, group)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert _rel_rms(out, ref) < 1e-2


def test_empty_selection_rows_are_zero_or_extra_only():
    """kv_count 0 everywhere: rows see only the extra keys, or nothing (output 0, no NaN)."""
    B, H, grid, cube, D = 1, 2, (2, 3, 4), (2, 2, 2), 16
    layout, qc, kc, vc, ke, ve = _inputs(B, H, grid, cube, D, torch.float16, seed=3, E=4)
    sel = bsa_select(qc, kc, layout, BSAConfig(cube_size=cube, keep_ratio=0.5, kv_threshold=0.5,
                                               threshold_mode="cumulative", pooled_remainder=False), D ** -0.5)
    empty = BSASelection(sel.q_count, sel.q_index, sel.q_source, torch.zeros_like(sel.kv_count),
                         torch.full_like(sel.kv_index, -1))
    kept = block_sparse_attention(qc, kc, vc, empty.q_index, empty.kv_count, empty.kv_index, layout.slot_valid)
    assert torch.isfinite(kept).all() and kept.abs().max() == 0  # padding rows are written (0) too
    out = _run(layout, qc, kc, vc, empty, D ** -0.5, ke, ve, group=2)
    ref = sparse_attention_reference(qc, kc, vc, layout, empty, D ** -0.5, ke, ve)
    assert _rel_rms(out, ref) < 1e-2


def test_fp32_input_is_computed_in_bf16():
    B, H, grid, cube, D = 1, 1, (2, 2, 4), (2, 2, 4), 16
    layout, qc, kc, vc, _, _ = _inputs(B, H, grid, cube, D, torch.float32, seed=5)
    sel = bsa_select(qc, kc, layout, BSAConfig(cube_size=cube, keep_ratio=1.0, kv_threshold=1.0,
                                               threshold_mode="cumulative", pooled_remainder=False), D ** -0.5)
    out = _run(layout, qc, kc, vc, sel, D ** -0.5)
    assert out.dtype == torch.float32
    assert _rel_rms(out, sparse_attention_reference(qc, kc, vc, layout, sel, D ** -0.5)) < 1e-2


def test_bad_inputs_raise():
    layout, qc, kc, vc, _, _ = _inputs(1, 1, (2, 2, 4), (2, 2, 4), 16, torch.float16, seed=1)
    sel = bsa_select(qc, kc, layout, BSAConfig(cube_size=(2, 2, 4),
                                               threshold_mode="cumulative", pooled_remainder=False, keep_ratio=0.5), 0.25)
    with pytest.raises(ValueError, match="k_cubes"):
        block_sparse_attention(qc, kc[..., :8].contiguous(), vc, sel.q_index, sel.kv_count, sel.kv_index,
                               layout.slot_valid)
    with pytest.raises(ValueError, match="kv_index"):
        block_sparse_attention(qc, kc, vc, sel.q_index, sel.kv_count, sel.kv_index.long(), layout.slot_valid)
    with pytest.raises(ValueError, match="contiguous"):
        block_sparse_attention(qc.transpose(-1, -2).contiguous().transpose(-1, -2), kc, vc, sel.q_index,
                               sel.kv_count, sel.kv_index, layout.slot_valid)


def test_group_table_union_and_bits():
    kv = torch.tensor([[[[0, 2, -1], [1, 2, -1], [1, -1, -1]]]], dtype=torch.int32)
    count, index, bits = _group_table(torch.tensor([[[2, 2, 1]]], dtype=torch.int32), kv, 2)
    assert count.tolist() == [[[3, 1]]]
    assert index[0, 0, 0].tolist() == [0, 1, 2] and bits[0, 0, 0].tolist() == [1, 2, 3]
    assert index[0, 0, 1].tolist() == [1, -1, -1] and bits[0, 0, 1, 0] == 1


@pytest.mark.parametrize("N", [7, 64])
def test_pair_table_equals_dense_union(N):
    torch.manual_seed(N)
    keep = (torch.rand(2, 3, N, N) < 0.3) | torch.eye(N, dtype=torch.bool)
    count, index = mask_to_index(keep)
    NG = -(-N // 2)
    pairs = torch.cat([keep, torch.zeros(2, 3, 2 * NG - N, N, dtype=torch.bool)], 2).view(2, 3, NG, 2, N)
    union_count, union_index = mask_to_index(pairs.any(3))
    bits = (pairs[..., 0, :].int() + 2 * pairs[..., 1, :].int()).gather(-1, union_index.clamp(min=0).long())
    got_count, got_index, got_bits = _group_table(count, index, 2)
    width = union_index.shape[-1]
    assert torch.equal(got_count, union_count) and torch.equal(got_index[..., :width], union_index)
    assert torch.equal(got_bits[..., :width], (bits * (union_index >= 0)).int())
    assert (got_index[..., width:] == -1).all()


# ---- GPU: real Wan sizes ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_dense_selection_equals_sdpa(D):
    """r = 1, p = 1 on the Wan-1.3B 480p grid: BSA is dense attention."""
    grid, H = (21, 30, 52), 2
    torch.manual_seed(0)
    layout = cube_layout(grid, (4, 4, 4), "cuda")
    q, k, v = (torch.randn(1, H, math.prod(grid), D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qc, kc, vc = (layout.to_cubes(x).contiguous() for x in (q, k, v))
    N = layout.num_cubes
    q_count, q_index = mask_to_index(layout.slot_valid.expand(1, H, N, -1))
    kv_count, kv_index = mask_to_index(torch.ones(1, H, N, N, dtype=torch.bool, device="cuda"))
    kept = block_sparse_attention(qc, kc, vc, q_index, kv_count, kv_index, layout.slot_valid)
    src = (torch.cumsum(layout.slot_valid.int(), -1) - 1).where(layout.slot_valid, -1).to(torch.int32)
    out = layout.to_raster(scatter_kept(kept, src.expand(1, H, N, -1), layout.slot_valid))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert _rel_rms(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 2, 4])
def test_gpu_wan_sparse_matches_reference(group):
    grid, H, D = (21, 30, 52), 2, 128
    layout, qc, kc, vc, ke, ve = _inputs(1, H, grid, (4, 4, 4), D, torch.bfloat16, seed=11, E=77)
    scale = D ** -0.5
    sel = bsa_select(qc, kc, layout, BSAConfig(keep_ratio=0.5, kv_threshold=0.3, min_blocks=8,
                                               threshold_mode="cumulative", pooled_remainder=False), scale)
    ref = sparse_attention_reference(qc, kc, vc, layout, sel, scale, ke, ve)
    out = _run(layout, qc, kc, vc, sel, scale, ke, ve, group)
    assert _rel_rms(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 2])
def test_gpu_tma_matches_reference(group):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper")
    grid, H, D = (21, 30, 52), 2, 128
    layout, qc, kc, vc, ke, ve = _inputs(1, H, grid, (4, 4, 4), D, torch.bfloat16, seed=12, E=5)
    sel = bsa_select(qc, kc, layout, BSAConfig(keep_ratio=0.5, kv_threshold=0.3, min_blocks=8,
                                               threshold_mode="cumulative", pooled_remainder=False), D ** -0.5)
    ref = sparse_attention_reference(qc, kc, vc, layout, sel, D ** -0.5, ke, ve)
    kept = block_sparse_attention(qc, kc, vc, sel.q_index, sel.kv_count, sel.kv_index, layout.slot_valid,
                                  k_extra=ke, v_extra=ve, cubes_per_program=group, use_tma=True)
    assert _rel_rms(scatter_kept(kept, sel.q_source, layout.slot_valid), ref) < 1e-2


# ---- raster I/O (keep_ratio 1), pooled remainder, per-group lists ------------------------------------------

RASTER_CASES = [  # (B, H, grid, cube, D, dtype, kv_threshold, n_prefix, n_suffix, pooled, group)
    (2, 3, (3, 5, 6), (2, 2, 2), 16, torch.bfloat16, 0.5, 0, 0, True, None),
    (1, 2, (5, 4, 7), (2, 2, 4), 32, torch.float16, 0.6, 3, 2, True, 2),
    (1, 2, (3, 3, 9), (1, 3, 3), 16, torch.bfloat16, 0.4, 0, 5, False, 1),
    (1, 2, (4, 8, 8), (4, 4, 8), 16, torch.bfloat16, 0.6, 2, 0, True, None),  # 128 queries: two programs a cube
]


@pytest.mark.parametrize("case", RASTER_CASES, ids=lambda c: f"T{'x'.join(map(str, c[2]))}-c{'x'.join(map(str, c[3]))}"
                         f"-pre{c[7]}-suf{c[8]}-pooled{int(c[9])}-G{c[10]}")
@pytest.mark.parametrize("budget", [None, 12 * 1024], ids=["budget-any", "budget-12K"])
def test_raster_matches_reference(case, budget, monkeypatch):
    """keep_ratio 1: Q read from a strided raster view, output written into the raster rows of `out`. A small
    shared-memory budget forces key tiles smaller than a cube (several pieces per cube)."""
    B, H, grid, cube, D, dtype, p, n_prefix, n_suffix, pooled, group = case
    if budget is not None:
        if math.prod(cube) <= 16:
            pytest.skip("cube fits the smallest key tile")
        monkeypatch.setattr(kernel_module, "_device_facts", lambda device: (0, budget, 0))
    g = torch.Generator().manual_seed(5)
    layout = cube_layout(grid, cube, DEVICE)
    L = n_prefix + layout.num_tokens + n_suffix
    q, k, v = (torch.randn(B, L, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2) for _ in range(3))
    video = slice(n_prefix, n_prefix + layout.num_tokens)
    qc, kc, vc = (layout.to_cubes(x[:, :, video]).contiguous() for x in (q, k, v))
    ke = torch.cat([k[:, :, :n_prefix], k[:, :, L - n_suffix:]], 2).contiguous()
    ve = torch.cat([v[:, :, :n_prefix], v[:, :, L - n_suffix:]], 2).contiguous()
    scale = D ** -0.5
    sel = bsa_select(qc, kc, layout, BSAConfig(cube_size=cube, keep_ratio=1.0, kv_threshold=p, threshold_mode="cumulative"), scale)
    ref = sparse_attention_reference(qc, kc, vc, layout, sel, scale, ke, ve, pooled_remainder=pooled)
    remainder = None
    if pooled:
        from comfyui_bsa.bsa_core.reference import cube_mean
        remainder = (cube_mean(kc, layout), cube_mean(vc, layout), sel.to_dense())
    out = torch.full_like(q, float("nan"))
    block_sparse_attention_raster(q, kc, vc, layout, sel.kv_count, sel.kv_index, out, n_prefix, scale, ke, ve,
                                  cubes_per_program=group, remainder=remainder)
    assert torch.isnan(out[:, :, :n_prefix]).all() and torch.isnan(out[:, :, L - n_suffix:]).all()
    assert _rel_rms(out[:, :, video], layout.to_raster(ref)) < 1e-2


def _require_hopper_kernel(q, head_dim, cube_volume):
    """Skip where the Gluon Hopper kernel is not meant to run (no sm90 GPU, another Triton, switched off); any
    other reason (a failed build, a module that did not import) fails the test."""
    reason = kernel_module.hopper_path_reason(q, head_dim, cube_volume, 1, False)
    if reason and reason.startswith(("not an sm90", "Triton ", "BSA_HOPPER_KERNEL")):
        pytest.skip(f"Gluon Hopper kernel: {reason}")
    assert reason is None


HOPPER_CASES = [  # (B, H, grid, cube, D, dtype, kv_threshold, n_prefix, pooled)
    (1, 4, (21, 30, 52), (4, 4, 4), 128, torch.bfloat16, 0.7, 0, True),  # Wan 480p: partial cubes on T and H
    (1, 4, (21, 30, 52), (4, 4, 4), 128, torch.bfloat16, 0.7, 0, False),
    (2, 3, (9, 14, 22), (4, 4, 4), 128, torch.float16, 0.5, 3, True),  # CFG batch, fp16, a prefix row
    (1, 2, (8, 16, 16), (2, 4, 8), 128, torch.float16, 0.9, 0, True),  # another 64-token cube
    (2, 3, (9, 14, 22), (4, 4, 4), 64, torch.float16, 0.5, 3, True),  # head_dim 64 (LTX-Video): its own build
    (1, 4, (21, 30, 52), (4, 4, 4), 64, torch.bfloat16, 0.7, 0, False),
    (1, 2, (1, 6, 40), (4, 4, 4), 128, torch.bfloat16, 0.6, 0, True),  # every cube partial: packed tiles only
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", HOPPER_CASES,
                         ids=lambda c: f"B{c[0]}-T{'x'.join(map(str, c[2]))}-c{'x'.join(map(str, c[3]))}"
                                       f"-D{c[4]}-{str(c[5]).split('.')[-1]}-pre{c[7]}-pooled{int(c[8])}")
def test_gpu_hopper_kernel_matches_reference_and_portable_kernel(case):
    """The Gluon Hopper kernel (the default raster path on sm90) against the pure-torch reference and the
    portable Triton kernel on the same selection: output rows, untouched rows outside the video, and the LSE
    the backward reads."""
    from comfyui_bsa.bsa_core.reference import cube_mean

    B, H, grid, cube, D, dtype, p, n_prefix, pooled = case
    layout = cube_layout(grid, cube, DEVICE)
    g = torch.Generator().manual_seed(21)
    L = n_prefix + layout.num_tokens
    q, k, v = (torch.randn(B, L, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2) for _ in range(3))  # ComfyUI's
    _require_hopper_kernel(q, D, layout.cube_volume)
    video = slice(n_prefix, L)
    qc, kc, vc = (layout.to_cubes(x[:, :, video]).contiguous() for x in (q, k, v))
    scale = D ** -0.5
    sel = bsa_select(qc, kc, layout, BSAConfig(cube_size=cube, keep_ratio=1.0, kv_threshold=p,
                                               threshold_mode="cumulative"), scale)
    remainder = (cube_mean(kc, layout), cube_mean(vc, layout), sel.to_dense()) if pooled else None
    ref = layout.to_raster(sparse_attention_reference(qc, kc, vc, layout, sel, scale, pooled_remainder=pooled))
    runs = {}
    for hopper in (True, False, None):  # None: the default path, which takes the Gluon kernel here
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)  # contiguous, unlike q (as the op)
        _, lse = block_sparse_attention_raster(q, kc, vc, layout, sel.kv_count, sel.kv_index, out, n_prefix, scale,
                                               remainder=remainder, return_lse=True, hopper_kernel=hopper)
        runs[hopper] = out, lse
    (out, lse), (portable, portable_lse) = runs[True], runs[False]
    assert torch.equal(runs[None][0][:, :, video], out[:, :, video]) and torch.equal(runs[None][1], lse)
    if not pooled:  # the packed tiles' unions from the caller's mask, not rebuilt from the lists: the same call
        given = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
        _, given_lse = block_sparse_attention_raster(q, kc, vc, layout, sel.kv_count, sel.kv_index, given, n_prefix,
                                                     scale, return_lse=True, hopper_kernel=True,
                                                     selection_mask=sel.to_dense())
        assert torch.equal(given[:, :, video], out[:, :, video]) and torch.equal(given_lse, lse)
    assert torch.isnan(out[:, :, :n_prefix]).all() and torch.isfinite(out[:, :, video]).all()
    assert _rel_rms(out[:, :, video], ref) < 1e-2
    assert _rel_rms(out[:, :, video], portable[:, :, video]) < 5e-3
    valid = layout.slot_valid.expand_as(lse)  # a padding slot's LSE is unspecified: the backward never reads it
    finite = torch.isfinite(portable_lse) & valid
    assert torch.equal(finite, torch.isfinite(lse) & valid) and (lse[finite] - portable_lse[finite]).abs().max() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("D", [128, 64])
@pytest.mark.parametrize("pooled", [False, True], ids=["no-pool", "pooled"])
def test_gpu_hopper_kernel_on_short_and_full_lists(pooled, D):
    """Lists the ring (3 stages at head_dim 128, 4 at 64) never wraps on: 0 (no remainder: output 0, LSE -inf),
    1, 2, 3 and 4 selected cubes, and every cube selected (with a remainder: every pooled key hidden), against
    the portable kernel on the same tables."""
    grid, cube, H = (8, 8, 12), (4, 4, 4), 2
    layout = cube_layout(grid, cube, DEVICE)
    N = layout.num_cubes
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, H, layout.num_tokens, D, generator=g).to(DEVICE, torch.bfloat16) for _ in range(3))
    _require_hopper_kernel(q, D, layout.cube_volume)
    kc, vc = (layout.to_cubes(x).contiguous() for x in (k, v))
    counts = torch.tensor([0, 1, 2, 3, 4, N] + [1] * (N - 6), dtype=torch.int32)[:N]
    kv_index = torch.full((1, H, N, N), -1, dtype=torch.int32)
    for c, n in enumerate(counts.tolist()):  # ascending lists of n cubes from the cube's own on
        kv_index[0, :, c, :n] = torch.sort(torch.arange(c, c + n) % N).values.to(torch.int32)
    kv_index = kv_index.to(DEVICE)
    kv_count = counts.expand(1, H, N).contiguous().to(DEVICE)
    attended = torch.zeros(1, H, N, N, dtype=torch.bool, device=DEVICE)
    for c, n in enumerate(counts.tolist()):
        attended[0, :, c, kv_index[0, 0, c, :n].long()] = True
    remainder = None
    if pooled:
        from comfyui_bsa.bsa_core.reference import cube_mean
        remainder = (cube_mean(kc, layout), cube_mean(vc, layout), attended)
    runs = {}
    for hopper in (True, False):
        out = torch.zeros_like(q)
        _, lse = block_sparse_attention_raster(q, kc, vc, layout, kv_count, kv_index, out, 0, D ** -0.5,
                                               remainder=remainder, return_lse=True, hopper_kernel=hopper)
        runs[hopper] = layout.to_cubes(out), lse
    (out, lse), (portable, portable_lse) = runs[True], runs[False]
    assert torch.isfinite(out).all() and _rel_rms(out, portable) < 5e-3
    finite = torch.isfinite(portable_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[finite] - portable_lse[finite]).abs().max() < 2e-2
    if not pooled:  # the cube with an empty list saw nothing
        assert out[:, :, 0].abs().max() == 0 and torch.isinf(lse[:, :, 0]).all()


@pytest.mark.gpu
def test_gpu_hopper_kernel_pooled_block_stays_in_its_head():
    """A head's pooled keys come in 64-row blocks past its N means (N = 12 here): the rows past N read as zeros,
    so non-finite means in the next head leave this head's output and LSE bit for bit as they were."""
    from comfyui_bsa.bsa_core.reference import cube_mean

    layout = cube_layout((8, 8, 12), (4, 4, 4), DEVICE)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, layout.num_tokens, 128, generator=g).to(DEVICE, torch.bfloat16) for _ in range(3))
    _require_hopper_kernel(q, 128, layout.cube_volume)
    kc, vc = (layout.to_cubes(x).contiguous() for x in (k, v))
    sel = bsa_select(layout.to_cubes(q), kc, layout, BSAConfig(keep_ratio=1.0, kv_threshold=0.5,
                                                               threshold_mode="cumulative"), 128 ** -0.5)
    k_bar, v_bar = cube_mean(kc, layout), cube_mean(vc, layout)
    runs = []
    for poison in (False, True):
        if poison:
            k_bar[:, 1], v_bar[:, 1] = float("inf"), float("nan")
        out = torch.zeros_like(q)
        _, lse = block_sparse_attention_raster(q, kc, vc, layout, sel.kv_count, sel.kv_index, out, 0, 128 ** -0.5,
                                               remainder=(k_bar, v_bar, sel.to_dense()), return_lse=True,
                                               hopper_kernel=True)
        runs.append((out[:, 0], lse[:, 0]))
    assert torch.isfinite(runs[0][0]).all()
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_hopper_kernel_can_be_turned_off_and_needs_aligned_tensors(monkeypatch):
    """BSA_HOPPER_KERNEL=0 is a reason like any other; K/V tensors off a 16-byte boundary (tensor descriptors
    need it) take the portable kernel without disabling the Gluon one for later calls."""
    from comfyui_bsa.kernels.block_sparse_attention import hopper_path_reason

    layout, qc, kc, vc, _, _ = _inputs(1, 2, (4, 4, 4), (4, 4, 4), 16, torch.bfloat16, seed=9)
    q = layout.to_raster(qc)
    monkeypatch.setenv("BSA_HOPPER_KERNEL", "0")
    assert hopper_path_reason(q, 128, 64, 1, False) == "BSA_HOPPER_KERNEL=0"
    monkeypatch.delenv("BSA_HOPPER_KERNEL")

    sel = bsa_select(qc, kc, layout, BSAConfig(keep_ratio=1.0, kv_threshold=0.5, threshold_mode="cumulative"), 0.25)
    launches = []

    class Recorder:
        @staticmethod
        def hopper_block_sparse_attention(*args):
            launches.append(args)

    monkeypatch.setattr(kernel_module, "_hopper_failure", {})
    monkeypatch.setattr(kernel_module, "_import_hopper", lambda: (Recorder, None))
    monkeypatch.setattr(kernel_module, "hopper_path_reason", lambda *args: kernel_module._hopper_module()[1])
    shifted = torch.empty(kc.numel() + 1, dtype=kc.dtype, device=kc.device)[1:].view(kc.shape)  # 2 bytes off
    shifted.copy_(kc)
    out = torch.zeros_like(q)
    block_sparse_attention_raster(q, shifted, vc, layout, sel.kv_count, sel.kv_index, out)
    expected = torch.zeros_like(q)
    block_sparse_attention_raster(q, kc, vc, layout, sel.kv_count, sel.kv_index, expected, hopper_kernel=False)
    assert not launches and torch.equal(out, expected) and not kernel_module._hopper_failure
    with pytest.raises(ValueError, match="16-byte"):
        block_sparse_attention_raster(q, shifted, vc, layout, sel.kv_count, sel.kv_index, out, hopper_kernel=True)
    block_sparse_attention_raster(q, kc, vc, layout, sel.kv_count, sel.kv_index, out)
    assert len(launches) == 1  # aligned tensors: the Gluon kernel's launcher


def test_hopper_kernel_on_request_names_why_it_cannot_run():
    """hopper_kernel=True where the Gluon kernel cannot run (here: no sm90 GPU, or head_dim 16) is a clear error,
    not a silent portable run."""
    layout, qc, kc, vc, _, _ = _inputs(1, 2, (4, 4, 4), (4, 4, 4), 16, torch.bfloat16, seed=4)
    sel = bsa_select(qc, kc, layout, BSAConfig(keep_ratio=1.0, kv_threshold=0.5, threshold_mode="cumulative"), 0.25)
    q = layout.to_raster(qc)
    with pytest.raises(ValueError, match="hopper_kernel=True.*Gluon Hopper kernel cannot run"):
        block_sparse_attention_raster(q, kc, vc, layout, sel.kv_count, sel.kv_index, torch.empty_like(q),
                                      hopper_kernel=True)


def test_a_failed_hopper_build_falls_back_to_the_portable_kernel_once(monkeypatch, caplog):
    """Where the Gluon kernel cannot build (a Triton, driver or platform it was not made for), the call still
    returns the portable kernel's result, says so once, and does not try again; asked for explicitly, the
    error is raised."""
    layout, qc, kc, vc, _, _ = _inputs(1, 2, (4, 4, 4), (4, 4, 4), 16, torch.bfloat16, seed=6)
    sel = bsa_select(qc, kc, layout, BSAConfig(keep_ratio=1.0, kv_threshold=0.5, threshold_mode="cumulative"), 0.25)
    q = layout.to_raster(qc)
    builds = []

    class Unbuildable:
        @staticmethod
        def hopper_block_sparse_attention(*args):
            builds.append(args)
            raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(kernel_module, "_hopper_failure", {})
    monkeypatch.setattr(kernel_module, "_import_hopper", lambda: (Unbuildable, None))
    monkeypatch.setattr(kernel_module, "hopper_path_reason", lambda *args: kernel_module._hopper_module()[1])

    def call(**kwargs):
        out = torch.zeros_like(q)
        block_sparse_attention_raster(q, kc, vc, layout, sel.kv_count, sel.kv_index, out, **kwargs)
        return out

    portable = call(hopper_kernel=False)
    with caplog.at_level("WARNING", logger=kernel_module.__name__):
        first, second = call(), call()
    assert len(builds) == 1 and torch.equal(first, portable) and torch.equal(second, portable)
    assert sum("Gluon Hopper attention kernel failed to build" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="its build failed"):
        call(hopper_kernel=True)
    monkeypatch.setattr(kernel_module, "_hopper_failure", {})
    with pytest.raises(RuntimeError, match="PassManager"):
        call(hopper_kernel=True)


def _kv_raster_layouts(B, H, L, D, dtype, seed):
    """The same K in the strides the raster K/V path meets: ComfyUI's [B, L, H, D] viewed as [B, H, L, D], a
    contiguous [B, H, L, D], and a [B, L, H, D] with a row of gap between batches (batches fold into no 5-D view,
    so with B > 1 the permute stays)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, H, D, generator=g).to(DEVICE, dtype)
    gapped = torch.zeros(B, L + 1, H, D, dtype=dtype, device=DEVICE)[:, :L]
    gapped.copy_(x)
    return {"BLHD": x.transpose(1, 2), "BHLD": x.transpose(1, 2).contiguous(), "gapped": gapped.transpose(1, 2)}


@pytest.mark.parametrize("B, n_prefix", [(2, 0), (1, 3), (2, 3)])
def test_cube_box_view_boxes_are_the_cubes(B, n_prefix):
    """Every valid slot of cube c of (batch, head) bh is, in `cube_box_view`'s 5-D view, at the box the Hopper
    loader reads it from: (bh % R, (bh // R) * GT + c_t * CT, c_h * CH, c_w * CW) + the slot's (t, h, w); strides
    that fold into no such view give None."""
    from comfyui_bsa.kernels.cube_tokens import cube_box_view

    grid, cube, H = (5, 6, 7), (2, 2, 4), 3  # partial cubes on every axis
    layout = cube_layout(grid, cube, DEVICE)
    L = n_prefix + layout.num_tokens
    for name, x in _kv_raster_layouts(B, H, L, 8, torch.float32, seed=B + n_prefix).items():
        folded = cube_box_view(x, layout, n_prefix)
        if B > 1 and (n_prefix or name == "gapped"):  # batches a prefix or a gap apart: no stride between them
            assert folded is None, name
            continue
        view, heads_a_row = folded
        cubes = layout.to_cubes(x[:, :, n_prefix:]).reshape(B * H, layout.num_cubes, -1, 8)
        slots = torch.arange(layout.cube_volume)
        st, sh, sw = slots // (cube[1] * cube[2]), slots // cube[2] % cube[1], slots % cube[2]
        for bh in range(B * H):
            for c in range(layout.num_cubes):
                ct, ch, cw = c // math.prod(layout.cubes_per_axis[1:]), c // layout.cubes_per_axis[2] % \
                    layout.cubes_per_axis[1], c % layout.cubes_per_axis[2]
                t, h, w = ct * cube[0] + st, ch * cube[1] + sh, cw * cube[2] + sw
                valid = (t < grid[0]) & (h < grid[1]) & (w < grid[2])
                row = (bh // heads_a_row) * grid[0] + t[valid]
                got = view[bh % heads_a_row, row, h[valid], w[valid]]
                assert torch.equal(got, cubes[bh, c, valid.to(DEVICE)]), (name, bh, c)


def test_raster_kv_reason_names_what_stops_it(monkeypatch):
    """K/V from the raster wherever the Gluon kernel runs and the strides fold into 16-byte-aligned 5-D boxes; else
    a reason that names the tensor. Without an sm90 GPU, the kernel's own reason."""
    from comfyui_bsa.kernels.block_sparse_attention import raster_kv_reason

    layout = cube_layout((5, 6, 8), (4, 4, 4), DEVICE)
    kinds = _kv_raster_layouts(2, 2, layout.num_tokens, 16, torch.bfloat16, seed=1)  # batches fold but "gapped"
    q = kinds["BLHD"]
    if kernel_module.hopper_path_reason(q, 16, 64, 1, False) is not None:
        assert raster_kv_reason(q, q, q, layout) == kernel_module.hopper_path_reason(q, 16, 64, 1, False)
    monkeypatch.setattr(kernel_module, "hopper_path_reason", lambda *args: None)
    assert raster_kv_reason(q, kinds["BLHD"], kinds["BLHD"], layout) is None
    assert raster_kv_reason(q, kinds["BHLD"], kinds["BHLD"], layout) is None
    assert "fold into different 5-D views" in raster_kv_reason(q, kinds["BLHD"], kinds["BHLD"], layout)
    assert "v's strides" in raster_kv_reason(q, q, kinds["gapped"], layout)
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype, device=q.device)[1:].view(2, layout.num_tokens, 2, 16)
    assert "k is not 16-byte aligned" in raster_kv_reason(q, shifted.transpose(1, 2), q, layout)
    assert "k is not q's" in raster_kv_reason(q, q.float(), q, layout)


def test_a_failed_hopper_build_with_raster_kv_permutes_for_the_portable_kernel(monkeypatch):
    """A call that handed the Gluon kernel K/V in the raster still gets the portable kernel's result should the
    build fail (K/V permuted then); asking for raster K/V where the Gluon kernel cannot run is a clear error."""
    from comfyui_bsa.bsa_core.reference import cube_mean

    layout, qc, kc, vc, _, _ = _inputs(2, 2, (5, 6, 8), (4, 4, 4), 16, torch.bfloat16, seed=6)
    q, k, v = (layout.to_raster(x) for x in (qc, kc, vc))
    sel = bsa_select(qc, kc, layout, BSAConfig(keep_ratio=1.0, kv_threshold=0.5, threshold_mode="cumulative"), 0.25)
    with pytest.raises(ValueError, match="kv_raster"):
        block_sparse_attention_raster(q, None, None, layout, sel.kv_count, sel.kv_index, torch.empty_like(q),
                                      kv_raster=(k, v))

    class Unbuildable:
        @staticmethod
        def hopper_block_sparse_attention(*args):
            raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(kernel_module, "_hopper_failure", {})
    monkeypatch.setattr(kernel_module, "_import_hopper", lambda: (Unbuildable, None))
    monkeypatch.setattr(kernel_module, "hopper_path_reason", lambda *args: None)
    for remainder in (None, (cube_mean(kc, layout), cube_mean(vc, layout), sel.to_dense())):
        expected = torch.zeros_like(q)
        block_sparse_attention_raster(q, kc, vc, layout, sel.kv_count, sel.kv_index, expected, hopper_kernel=False,
                                      remainder=remainder)
        monkeypatch.setattr(kernel_module, "_hopper_failure", {})
        out = torch.zeros_like(q)
        block_sparse_attention_raster(q, None, None, layout, sel.kv_count, sel.kv_index, out, kv_raster=(k, v),
                                      remainder=remainder)
        assert torch.equal(out, expected) and kernel_module._hopper_failure


@pytest.mark.gpu
@pytest.mark.parametrize("D", [128, 64])
@pytest.mark.parametrize("pooled", [False, True], ids=["no-pool", "pooled"])
@pytest.mark.parametrize("B, n_prefix", [(2, 0), (1, 3)])
def test_gpu_hopper_kernel_reads_kv_from_the_raster(B, n_prefix, pooled, D):
    """The Gluon kernel reading K/V as 5-D boxes of the raster gives the cube-order run's output and LSE bit for
    bit (padding slots read other rows or zeros, masked either way), in ComfyUI's strides and in contiguous
    [B, H, L, D], partial cubes on every axis (packed tiles included)."""
    from comfyui_bsa.bsa_core.reference import cube_mean

    grid, H = (9, 14, 22), 3
    layout = cube_layout(grid, (4, 4, 4), DEVICE)
    L = n_prefix + layout.num_tokens
    video = slice(n_prefix, L)
    q = _kv_raster_layouts(B, H, L, D, torch.bfloat16, seed=1)["BLHD"]
    _require_hopper_kernel(q, D, layout.cube_volume)
    for name, k in _kv_raster_layouts(B, H, L, D, torch.bfloat16, seed=2).items():
        v = _kv_raster_layouts(B, H, L, D, torch.bfloat16, seed=3)[name]
        if B > 1 and name == "gapped":
            assert "strides" in kernel_module.raster_kv_reason(q, k, v, layout, n_prefix)
            continue
        kc, vc = (layout.to_cubes(x[:, :, video]).contiguous() for x in (k, v))
        sel = bsa_select(layout.to_cubes(q[:, :, video]), kc, layout,
                         BSAConfig(keep_ratio=1.0, kv_threshold=0.6, threshold_mode="cumulative"), D ** -0.5)
        remainder = (cube_mean(kc, layout), cube_mean(vc, layout), sel.to_dense()) if pooled else None
        runs = []
        for kv_raster in (None, (k, v)):
            out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
            _, lse = block_sparse_attention_raster(q, None if kv_raster else kc, None if kv_raster else vc, layout,
                                                   sel.kv_count, sel.kv_index, out, n_prefix, D ** -0.5,
                                                   remainder=remainder, return_lse=True, hopper_kernel=True,
                                                   kv_raster=kv_raster)
            runs.append((out[:, :, video], lse))
        assert torch.isfinite(runs[0][0]).all(), name
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), name


def test_key_block_follows_the_shared_memory_budget():
    """Whole cubes up to 128 keys where they fit; a 99 KB consumer card takes 256-key cubes in 64-key pieces."""
    assert _key_block(64, 128, 64, 227 * 1024) == 64
    assert _key_block(256, 128, 64, 227 * 1024) == 128
    assert _key_block(256, 128, 64, 99 * 1024) == 64
    assert _key_block(27, 64, 64, 99 * 1024) == 32


BUDGET_CASES = [(cube, D, kb) for kb in (99, 163) for cube in ((4, 4, 4), (2, 8, 8), (4, 4, 8), (4, 8, 8))
                for D in (64, 128) if kb == 99 or D == 128]  # 227 KB (H100/H200) is every other GPU test


@pytest.mark.gpu
@pytest.mark.parametrize("cube, D, budget_kb", BUDGET_CASES,
                         ids=[f"{'x'.join(map(str, c))}-D{d}-{kb}KB" for c, d, kb in BUDGET_CASES])
def test_gpu_every_shared_memory_budget_launches(cube, D, budget_kb, monkeypatch):
    """The configs and key tiles chosen for a consumer card (99 KB), an A100 (163 KB) and an H100 (227 KB)
    launch on this GPU and match the reference (the GPU has at least as much shared memory as forced)."""
    major = torch.cuda.get_device_capability()[0]
    if kernel_module.shared_memory_budget(torch.device("cuda")) < budget_kb * 1024:
        pytest.skip("this GPU has less shared memory than forced")
    monkeypatch.setattr(kernel_module, "_device_facts", lambda device: (major, budget_kb * 1024, 0))
    grid, H = (9, 16, 16), 2
    layout = cube_layout(grid, cube, DEVICE)
    g = torch.Generator().manual_seed(budget_kb + D)
    q, k, v = (torch.randn(1, H, math.prod(grid), D, generator=g).to(DEVICE, torch.bfloat16) for _ in range(3))
    qc, kc, vc = (layout.to_cubes(x).contiguous() for x in (q, k, v))
    sel = bsa_select(qc, kc, layout, BSAConfig(cube_size=cube, keep_ratio=1.0, kv_threshold=0.6, threshold_mode="cumulative"), D ** -0.5)
    from comfyui_bsa.bsa_core.reference import cube_mean
    remainder = (cube_mean(kc, layout), cube_mean(vc, layout), sel.to_dense())
    ref = sparse_attention_reference(qc, kc, vc, layout, sel, D ** -0.5, pooled_remainder=True)
    out = torch.empty_like(q)
    block_sparse_attention_raster(q, kc, vc, layout, sel.kv_count, sel.kv_index, out, remainder=remainder)
    assert _rel_rms(out, layout.to_raster(ref)) < 1e-2
