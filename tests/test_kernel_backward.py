"""Backward kernels of the block-sparse attention vs autograd of the float32 reference, given one selection.

Without CUDA the kernels run in Triton's interpreter on tiny shapes (TRITON_INTERPRET is set before the
kernel modules are imported, only when there is no GPU)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from comfyui_bsa.bsa_core.config import BSAConfig  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.bsa_core.reference import bsa_select, cube_mean, sparse_attention_reference  # noqa: E402
from comfyui_bsa.kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from comfyui_bsa.kernels.block_sparse_attention_bwd import block_sparse_attention_backward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [  # (B, H, grid, cube, D, keep_ratio, mode, threshold, E, pooled)
    (1, 2, (3, 5, 6), (2, 2, 4), 16, 1.0, "cumulative", 0.6, 0, False),
    (1, 2, (3, 5, 6), (2, 2, 4), 16, 1.0, "statistical", 0.5, 5, True),
    (2, 1, (3, 4, 5), (2, 2, 2), 32, 0.5, "cumulative", 0.7, 3, True),
    (1, 2, (2, 4, 8), (2, 2, 4), 16, 0.6, "statistical", 0.0, 0, False),
]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{'x'.join(map(str, c[2]))}-c{'x'.join(map(str, c[3]))}-D{c[4]}"
                         f"-r{c[5]}-{c[6][:4]}{c[7]}-E{c[8]}-pooled{int(c[9])}")
def test_gradients_match_reference_autograd(case):
    B, H, grid, cube, D, r, mode, p, E, pooled = case
    g = torch.Generator().manual_seed(7)
    layout = cube_layout(grid, cube, DEVICE)
    N, S = layout.num_cubes, layout.cube_volume
    valid = layout.slot_valid[..., None].float()
    # values representable in bf16: the reference sees exactly what the kernels multiply
    qc, kc, vc = ((torch.randn(B, H, N, S, D, generator=g).to(DEVICE) * valid).bfloat16().float() for _ in range(3))
    ke, ve = (torch.randn(B, H, E, D, generator=g).to(DEVICE).bfloat16().float() for _ in range(2))
    scale = D ** -0.5
    config = BSAConfig(cube_size=cube, keep_ratio=r, threshold_mode=mode, kv_threshold=p if mode == "cumulative" else 1.0,
                       stat_lambda=p, pooled_remainder=pooled)
    sel = bsa_select(qc, kc, layout, config, scale)
    grad = torch.randn(B, H, N, S, D, generator=g).to(DEVICE) * valid

    leaves = [x.clone().requires_grad_(True) for x in (qc, kc, vc, ke, ve)]
    out_ref = sparse_attention_reference(*leaves[:3], layout, sel, scale, leaves[3], leaves[4], pooled_remainder=pooled)
    want = torch.autograd.grad((out_ref * grad).sum(), leaves, allow_unused=True)

    remainder = (cube_mean(kc, layout), cube_mean(vc, layout), sel.to_dense()) if pooled else None
    q16, k16, v16, ke16, ve16 = (x.bfloat16() for x in (qc, kc, vc, ke, ve))
    out_kept, lse = block_sparse_attention(q16, k16, v16, sel.q_index, sel.kv_count, sel.kv_index, layout.slot_valid,
                                           scale, ke16, ve16, remainder=remainder, return_lse=True)
    # a dropped query's gradient goes to the kept query it copied
    src = sel.q_source.clamp(min=0).long()[..., None].expand(B, H, N, S, D)
    grad_kept = torch.zeros(*out_kept.shape, dtype=torch.float32, device=DEVICE).scatter_add_(-2, src, grad)
    dq, dk, dv, dke, dve = block_sparse_attention_backward(
        q16, k16, v16, sel.q_index, sel.kv_count, sel.kv_index, layout.slot_valid, out_kept, lse, grad_kept, scale,
        ke16, ve16, remainder=remainder)  # dk, dv hold the pooled keys' share
    slot = torch.where(sel.q_index >= 0, sel.q_index, S).long()[..., None].expand(*dq.shape)  # padding -> slot S
    dq_cubes = torch.zeros(B, H, N, S + 1, D, device=DEVICE).scatter_(-2, slot, dq)[..., :S, :]
    # padding slots are no tokens: the reference's cube_mean still hands them a gradient, compare real slots
    for name, got, ref in (("dq", dq_cubes, want[0]), ("dk", dk, want[1]), ("dv", dv, want[2])):
        assert torch.isfinite(got).all(), name
        assert _rel(got * valid, ref * valid) < 3e-2, (name, _rel(got * valid, ref * valid))
    if E:
        assert _rel(dke, want[3]) < 3e-2 and _rel(dve, want[4]) < 3e-2, (_rel(dke, want[3]), _rel(dve, want[4]))


@pytest.mark.parametrize("N", [1, 7, 40])
def test_transposed_table_equals_sorted_reference(N):
    """Per KV cube, the query cubes that selected it (ascending, -1 padded): the sort-free build vs an argsort."""
    from comfyui_bsa.bsa_core.selection import mask_to_index
    from comfyui_bsa.kernels.block_sparse_attention_bwd import _transposed
    g = torch.Generator().manual_seed(N)
    mask = (torch.rand(2, 3, N, N, generator=g) < 0.3) | torch.eye(N, dtype=torch.bool)
    kv_count, kv_index = mask_to_index(mask, width=N)
    want = mask_to_index(mask.transpose(-1, -2), width=N)
    for got, ref in zip(_transposed(kv_count.to(DEVICE), kv_index.to(DEVICE), N), want):
        assert torch.equal(got.cpu(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("pooled", [False, True], ids=["no-pooled", "pooled"])
def test_gpu_wan_480p_gradients_match_reference_autograd(pooled):
    """Wan 480p grid (21 x 30 x 52, partial cubes), one head, node-like selection, 77 extra keys."""
    case = (1, 1, (21, 30, 52), (4, 4, 4), 128, 1.0, "statistical", 1.0, 77, pooled)
    test_gradients_match_reference_autograd(case)


PIPELINE_CASES = [  # (grid, cube, dtype, n_prefix, n_suffix, keep_ratio, mode, value, pooled)
    ((3, 5, 6), (2, 2, 4), torch.bfloat16, 2, 3, 1.0, "statistical", 0.5, True),
    ((3, 5, 6), (2, 2, 4), torch.bfloat16, 0, 0, 1.0, "statistical", 0.5, True),  # the video alone: written in place
    ((3, 4, 5), (2, 2, 2), torch.float16, 0, 4, 0.5, "cumulative", 0.7, False),
    ((3, 4, 5), (2, 2, 2), torch.bfloat16, 0, 0, 0.5, "statistical", 0.5, True),  # kept lists, the video alone
    ((2, 4, 8), (2, 2, 4), torch.float32, 3, 0, 1.0, "cumulative", 0.6, True),
]


@pytest.mark.parametrize("saved", [False, True], ids=["forward-again", "saved-lse"])
@pytest.mark.parametrize("case", PIPELINE_CASES, ids=lambda c: f"T{'x'.join(map(str, c[0]))}-{str(c[2])[6:]}-pre{c[3]}"
                         f"-suf{c[4]}-r{c[5]}-{c[6][:4]}-pooled{int(c[8])}")
def test_call_gradients_match_reference_autograd(case, saved):
    """The whole call's backward on the kernels (selection recomputed) vs autograd of the reference call:
    with the forward run again, or from the output and LSE the call's forward saved (what the op does)."""
    from comfyui_bsa.bsa_core import attention
    from comfyui_bsa.bsa_core.gpu_backward import bsa_attention_backward_triton
    from comfyui_bsa.bsa_core.reference import bsa_attention_reference
    from comfyui_bsa.bsa_core.gpu_select import select_triton
    from comfyui_bsa.kernels.cube_permute import permute_qkv

    grid, cube, dtype, n_prefix, n_suffix, r, mode, value, pooled = case
    g = torch.Generator().manual_seed(3)
    layout = cube_layout(grid, cube, DEVICE)
    L, D, B, H = n_prefix + layout.num_tokens + n_suffix, 16, 1, 2
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(DEVICE, dtype) for _ in range(3))
    grad = torch.randn(B, H, L, D, generator=g).to(DEVICE)
    scale = D ** -0.5
    config = BSAConfig(cube_size=cube, keep_ratio=r, threshold_mode=mode, stat_lambda=value,
                       kv_threshold=value if mode == "cumulative" else 1.0, pooled_remainder=pooled)
    seen = torch.bfloat16 if dtype == torch.float32 else dtype  # what the kernels multiply
    qs, ks, vs = (x.to(seen) for x in (q, k, v))
    qc, _, kc, k_bar, *_ = permute_qkv(qs, ks, vs, layout, n_prefix, q_cubes=True, q_mean=r >= 1.0)
    q_bar = permute_qkv(qs, ks, vs, layout, n_prefix, q_cubes=False)[1] if r >= 1.0 else None
    sel = select_triton(qc, kc, layout, config, scale, k_bar=k_bar, q_bar=q_bar)
    leaves = [x.to(seen).float().requires_grad_(True) for x in (q, k, v)]
    out, _ = bsa_attention_reference(*leaves, layout, config, scale, n_prefix, n_suffix, selection=sel)
    want = torch.autograd.grad(out, leaves, grad)
    forward = {}
    if saved:
        out_call, _, lse = attention._bsa_attention_triton(q, k, v, layout, config, scale, n_prefix, n_suffix)
        assert lse.shape == (B, H, *attention.lse_shape(grid, cube, r)), tuple(lse.shape)
        forward = {"out": out_call, "lse": lse}
    got = bsa_attention_backward_triton(q, k, v, grad, layout, config, scale, n_prefix, n_suffix, **forward)
    video = slice(n_prefix, n_prefix + layout.num_tokens)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert _rel(a[..., video, :], b[..., video, :]) < 3e-2, (name, _rel(a[..., video, :], b[..., video, :]))
        assert _rel(a, b) < 3e-2, (name, "with extra rows", _rel(a, b))
