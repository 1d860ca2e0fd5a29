"""The pure-torch reference: dense at r = p = 1, and the selection rules of BSA_SPEC.md."""
import math

import pytest
import torch

from comfyui_bsa.bsa_core import BSAConfig, bsa_attention, cube_layout
from comfyui_bsa.bsa_core.reference import block_logits, keep_counts, select_kv, select_queries

DENSE = BSAConfig(keep_ratio=1.0, kv_threshold=1.0, threshold_mode="cumulative", pooled_remainder=False)


def qkv(B, H, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g) for _ in range(3)]


def rms_rel(a, b):
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


@pytest.mark.parametrize("B,H,grid,cube,n_prefix,n_suffix", [
    (1, 2, (4, 4, 4), (4, 4, 4), 0, 0),
    (2, 3, (5, 6, 7), (4, 4, 4), 0, 0),
    (2, 2, (3, 5, 9), (2, 8, 8), 3, 0),
    (1, 2, (5, 4, 6), (4, 4, 8), 0, 5),
    (2, 2, (2, 3, 3), (4, 4, 4), 2, 4),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_dense_settings_equal_sdpa(B, H, grid, cube, n_prefix, n_suffix):
    L = n_prefix + math.prod(grid) + n_suffix
    q, k, v = qkv(B, H, L, 16)
    out, _ = bsa_attention(q, k, v, grid, BSAConfig(cube_size=cube, keep_ratio=1.0, kv_threshold=1.0,
                                                    threshold_mode="cumulative", pooled_remainder=False),
                           n_prefix=n_prefix, n_suffix=n_suffix)
    assert rms_rel(out, torch.nn.functional.scaled_dot_product_attention(q, k, v)) < 1e-5


def test_scale_is_used():
    q, k, v = qkv(1, 2, 64, 16)
    out, _ = bsa_attention(q, k, v, (4, 4, 4), DENSE, scale=0.3)
    assert rms_rel(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)) < 1e-5


# ---- query selection ------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [0.05, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("grid", [(4, 4, 4), (5, 6, 7)], ids=str)
def test_kept_queries_centre_and_count(grid, r):
    layout = cube_layout(grid, (4, 4, 4))
    q, _, _ = qkv(2, 2, math.prod(grid), 8)
    q_count, q_index, q_source = select_queries(layout.to_cubes(q), layout, r)
    expected = torch.ceil(torch.round(layout.n_valid.double() * r * 1e6) / 1e6).clamp(min=1)
    assert torch.equal(q_count[0, 0].long(), expected.long())
    assert torch.equal(q_count.long(), keep_counts(layout.n_valid, r).expand_as(q_count))
    assert (q_index == layout.centre_slot[:, None]).any(-1).all(), "the cube centre is always kept"


def test_dropped_query_copies_most_similar_kept_query():
    grid = (4, 4, 4)
    layout = cube_layout(grid, (4, 4, 4))
    q, _, _ = qkv(1, 2, 64, 8, seed=3)
    qc = layout.to_cubes(q)
    _, q_index, q_source = select_queries(qc, layout, 0.25)
    qn = torch.nn.functional.normalize(qc, dim=-1)[0, :, 0]  # [H, S, D]
    for h in range(2):
        kept = q_index[0, h, 0].long()
        sims = qn[h] @ qn[h, kept].T  # [S, Kq]
        assert torch.equal(q_source[0, h, 0].long(), sims.argmax(-1)), "source = most similar kept query"
        assert torch.equal(q_source[0, h, 0, kept].long(), torch.arange(len(kept))), "kept queries are their own source"


def test_centre_of_full_cube_is_geometric():
    layout = cube_layout((4, 4, 4), (4, 4, 4))
    assert int(layout.centre_slot[0]) == (2 * 4 + 2) * 4 + 2


# ---- KV selection ---------------------------------------------------------------------------------

def logits(N=12, seed=0, scale=3.0):
    return scale * torch.randn(1, 1, N, N, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_cumulative_keeps_crossing_block_and_no_more(p):
    z = logits()
    keep = select_kv(z, BSAConfig(kv_threshold=p, threshold_mode="cumulative", pooled_remainder=False, keep_ratio=0.5))
    mass = torch.softmax(z, -1)
    for n in range(z.shape[-2]):
        order = torch.argsort(mass[0, 0, n], descending=True)
        cum = torch.cumsum(mass[0, 0, n, order], 0)
        crossing = int((cum < p).sum())  # position of the block whose mass crosses p
        top = set(order[: crossing + 1].tolist())
        kept = set(torch.nonzero(keep[0, 0, n]).flatten().tolist())
        assert top <= kept, "every block up to and including the crossing one"
        assert kept - top <= {n}, "nothing beyond the crossing block except the own cube"


def test_own_cube_and_min_blocks():
    z = logits(N=10)
    z[..., torch.arange(10), torch.arange(10)] = -30.0  # own cube has no mass
    for min_blocks in (1, 3, 7):
        keep = select_kv(z, BSAConfig(kv_threshold=0.05, min_blocks=min_blocks,
                                      threshold_mode="cumulative", pooled_remainder=False, keep_ratio=0.5))
        assert keep[0, 0].diagonal().all()
        assert (keep.sum(-1) >= min_blocks).all()


def test_kept_set_grows_with_threshold():
    z = logits(seed=4)
    previous = torch.zeros_like(z, dtype=torch.bool)
    for p in torch.linspace(0.05, 1.0, 20).tolist():
        keep = select_kv(z, BSAConfig(kv_threshold=min(p, 1.0), threshold_mode="cumulative", pooled_remainder=False, keep_ratio=0.5))
        assert (keep | ~previous).all(), f"p={p} dropped a block a smaller p kept"
        previous = keep
    assert previous.all()


def test_partial_cube_weighted_by_real_size():
    # grid 5 x 4 x 4 with 4x4x4 cubes: cube 0 full (64), cube 1 one frame (16 tokens)
    layout = cube_layout((5, 4, 4), (4, 4, 4))
    q_bar = torch.zeros(1, 1, 2, 8)
    k_bar = torch.zeros(1, 1, 2, 8)
    z = block_logits(q_bar, k_bar, layout, scale=1.0)
    assert torch.allclose(z[0, 0, 0], torch.log(torch.tensor([64.0, 16.0])))
    assert torch.allclose(torch.softmax(z, -1)[0, 0, 0], torch.tensor([0.8, 0.2]))


@pytest.mark.parametrize("lam", [-0.5, 0.0, 1.0, 2.0])
def test_statistical_keeps_z_above_mean_plus_lambda_sigma(lam):
    z = logits(N=16, seed=5)
    keep = select_kv(z, BSAConfig(threshold_mode="statistical", stat_lambda=lam, keep_ratio=0.5, pooled_remainder=False))
    threshold = z.mean(-1, keepdim=True) + lam * z.std(-1, unbiased=False, keepdim=True)
    eye = torch.eye(16, dtype=torch.bool)
    top1 = torch.nn.functional.one_hot(z.argmax(-1), 16).bool()  # min_blocks = 1: the top block
    assert torch.equal(keep, (z >= threshold) | eye | top1)


@pytest.mark.parametrize("grid, cube, n_suffix", [((4, 4, 8), (2, 2, 4), 0), ((3, 5, 6), (2, 2, 4), 3)],
                         ids=["full-cubes", "partial-cubes-text"])
def test_pooled_remainder_is_exact_when_keys_are_constant_per_cube(grid, cube, n_suffix):
    """With every key and value constant inside its cube, a pooled cube n*exp(q.k_bar)*v_bar is exactly the
    cube's attention: BSA at any threshold (r = 1) then equals dense SDPA; without the term it does not."""
    B, H, D = 2, 2, 16
    layout = cube_layout(grid, cube)
    q, k, v = qkv(B, H, math.prod(grid) + n_suffix, D, seed=3)
    cube_of_token = torch.empty(layout.num_tokens, dtype=torch.long)
    cube_of_token[layout.token_of_slot[layout.slot_valid.flatten()]] = torch.arange(
        layout.num_cubes).repeat_interleave(layout.n_valid)
    g = torch.Generator().manual_seed(4)
    for x in (k, v):
        x[..., :layout.num_tokens, :] = 2 * torch.randn(B, H, layout.num_cubes, D, generator=g)[:, :, cube_of_token]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for p in (0.05, 0.5):
        config = BSAConfig(cube, keep_ratio=1.0, kv_threshold=p, pooled_remainder=True, threshold_mode="cumulative")
        out, selection = bsa_attention(q, k, v, grid, config, n_suffix=n_suffix)
        assert float(selection.kept_kv_fraction()) < 1.0
        assert rms_rel(out, dense) < 1e-5
        plain, _ = bsa_attention(q, k, v, grid, BSAConfig(cube, keep_ratio=1.0, kv_threshold=p,
                                                          threshold_mode="cumulative", pooled_remainder=False), n_suffix=n_suffix)
        assert rms_rel(plain, dense) > 1e-3


def test_pooled_remainder_is_a_no_op_when_everything_is_kept():
    q, k, v = qkv(1, 2, 5 * 6 * 7, 16, seed=5)
    out, _ = bsa_attention(q, k, v, (5, 6, 7), BSAConfig(keep_ratio=1.0, kv_threshold=1.0, pooled_remainder=True,
                                                         threshold_mode="cumulative"))
    assert rms_rel(out, torch.nn.functional.scaled_dot_product_attention(q, k, v)) < 1e-5


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
def test_to_dense_inverts_mask_to_index_in_any_chunking(monkeypatch, chunk):
    """BSASelection.to_dense builds the mask a few heads at a time (bounded int64 temporary): the same mask
    whatever the chunk, and the inverse of mask_to_index, also with extra -1 padding columns."""
    from comfyui_bsa.bsa_core import selection as selection_module
    g = torch.Generator().manual_seed(9)
    mask = (torch.rand(2, 5, 17, 17, generator=g) < 0.3) | torch.eye(17, dtype=torch.bool)
    count, index = selection_module.mask_to_index(mask)
    padded = torch.nn.functional.pad(index, (0, 4), value=-1)
    monkeypatch.setattr(selection_module, "_DENSE_CHUNK", chunk)
    for idx in (index, padded):
        sel = selection_module.BSASelection(count, idx, count, count, idx)
        assert torch.equal(sel.to_dense(), mask)
