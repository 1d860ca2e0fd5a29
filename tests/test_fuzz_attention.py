"""Property-based tests (hypothesis) of the public entry point, the node's attention override and the
Triton pipeline (interpreter on CPU): every call either matches the reference / its spec or, through
the override, runs dense with a logged reason; never an exception, never NaN/Inf.

Budgets are fixed and derandomized so CI is deterministic; tiny shapes keep the file under a minute.
The properties take a size `Profile`: this file runs them on CPU (reference + interpreter kernels,
tiny), tests/test_gpu_profile.py runs the same code on CUDA with the Triton kernels at video sizes."""
import logging
import math
import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    # before anything imports triton (ComfyUI may): the kernels then run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from comfyui_bsa.bsa_core import BSAConfig, bsa_attention, cube_layout
from comfyui_bsa.bsa_core.attention import choose_backend
from comfyui_bsa.bsa_core.reference import (
    block_logits,
    bsa_attention_reference,
    keep_counts,
    pooled_cubes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_TOKENS = 600  # video tokens per call
MAX_ROWS = 2000  # batch * heads * tokens (the float64 oracle is [B, H, L, L])
CUBES = [(4, 4, 4), (2, 8, 8), (4, 4, 8), (4, 8, 8)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DENSE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ORACLE_PAIRS = 1 << 25  # batch * heads * tokens^2 up to which the float64 [B, H, L, L] oracle is used


@dataclass(frozen=True)
class Profile:
    """Where and how large the properties run. max_pairs caps batch * heads * tokens^2 (the cost of the
    dense comparisons) where max_rows (batch * heads * tokens) is not enough; None: no cap."""
    name: str
    device: str
    max_rows: int
    max_pairs: int | None = None
    mass_slack: float = 1e-5  # kept KV mass may fall this far below kv_threshold (float rounding)


CPU = Profile("cpu", "cpu", MAX_ROWS)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors


unit = st.one_of(st.sampled_from([1.0, 1e-6, 0.05, 0.5, 0.999999]),
                 st.floats(min_value=0.0, max_value=1.0, exclude_min=True))


@st.composite
def grids(draw, max_tokens=MAX_TOKENS, max_axis=(5, 17, 64)):
    """(T, H, W) with T 1..5, H 1..17, W 1..64 by default (primes and sub-cube sizes included),
    T*H*W <= max_tokens."""
    T = draw(st.integers(1, max_axis[0]))
    H = draw(st.integers(1, min(max_axis[1], max_tokens // T)))
    W = draw(st.integers(1, min(max_axis[2], max_tokens // (T * H))))
    return T, H, W


cubes = st.one_of(st.sampled_from(CUBES), st.tuples(*[st.integers(1, 4)] * 3))


@st.composite
def configs(draw, cube=cubes, pooled=None):
    """pooled: a strategy for pooled_remainder (None: the field is left at its default)."""
    mode = draw(st.sampled_from(["cumulative", "statistical"]))
    extra = {} if pooled is None else {"pooled_remainder": draw(pooled)}
    return BSAConfig(cube_size=draw(cube), keep_ratio=draw(unit), kv_threshold=draw(unit), threshold_mode=mode,
                     stat_lambda=draw(st.floats(-10, 10)), min_blocks=draw(st.integers(1, 12)), **extra)


def make_qkv(B, H, L, D, dtype, kind, seed, magnitude=1.0, strided=False, device="cpu"):
    """Random, all-zero, constant or duplicated-token (tie-heavy) inputs; strided: [B, L, H, D] memory seen
    as [B, H, L, D], what the override hands over. Drawn on `device` (its own generator)."""
    g = torch.Generator(device).manual_seed(seed)
    q, k, v = (magnitude * torch.randn(B, H, L, D, generator=g, device=device) for _ in range(3))
    if kind == "zeros":
        q, k = torch.zeros_like(q), torch.zeros_like(k)
    elif kind == "constant":
        q, k = torch.ones_like(q), -torch.ones_like(k)
    elif kind == "duplicated":  # every token a copy of one of 3: ties in every similarity
        pick = torch.randint(0, min(3, L), (L,), generator=g, device=device)
        q, k = q[..., pick, :], k[..., pick, :]
    if strided:
        return tuple(x.to(dtype).transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    return tuple(x.to(dtype).contiguous() for x in (q, k, v))


def check_selection(sel, layout, config, q_cubes, k_cubes, scale, mass_slack=1e-5):
    """The selection table obeys BSA_SPEC.md, whatever the inputs (ties included). On any one device."""
    B, H, N = sel.kv_count.shape
    S = layout.cube_volume
    dev = sel.kv_count.device
    valid = layout.slot_valid
    # queries: ceil(r n) per cube, centre kept, each kept slot its own source, sources in range
    assert torch.equal(sel.q_count.long(), keep_counts(layout.n_valid, config.keep_ratio).expand(B, H, N))
    kept = sel.kept_query_mask()
    assert not (kept & ~valid).any(), "a padding slot is kept"
    assert kept.gather(-1, layout.centre_slot.view(1, 1, N, 1).expand(B, H, N, 1)).all(), "centre not kept"
    src = sel.q_source.long()
    assert ((src >= 0) == valid).all()
    assert (src < sel.q_count[..., None].long()).all()
    src_slot = sel.q_index.long().gather(-1, src.clamp(min=0))
    assert (src_slot >= 0).all() and kept.gather(-1, src_slot).all(), "a source is not a kept query"
    slots = torch.arange(S, device=dev).expand(B, H, N, S)
    assert torch.equal(torch.where(kept, src_slot, slots), slots), "a kept query copies another one"
    # a dropped query copies the kept query most similar to it (float32 cosine, small slack for fp ties)
    qn = torch.nn.functional.normalize(q_cubes.float(), dim=-1)
    kept_idx = sel.q_index.long().clamp(min=0)
    cos = qn @ qn.gather(-2, kept_idx[..., None].expand(*kept_idx.shape, qn.shape[-1])).transpose(-1, -2)
    cos = cos.masked_fill((sel.q_index < 0)[..., None, :], -2.0)  # [B,H,N,S,Kq]
    chosen = cos.gather(-1, src.clamp(min=0)[..., None])[..., 0]
    assert ((chosen >= cos.amax(-1) - 1e-3) | ~valid).all(), "a dropped query copies a less similar query"
    # KV cubes: ascending, in range, own cube, min_blocks, the threshold rule
    idx, count = sel.kv_index.long(), sel.kv_count.long()
    pos = torch.arange(idx.shape[-1], device=dev)
    live = pos < count[..., None]
    assert ((idx >= 0) == live).all() and (idx < N).all()
    assert (idx[..., 1:] > idx[..., :-1])[live[..., 1:]].all(), "kv_index not strictly ascending"
    dense = sel.to_dense()
    assert dense.diagonal(dim1=-2, dim2=-1).all(), "own cube missing"
    assert (count >= min(config.min_blocks, N)).all()
    q_bar, k_bar = pooled_cubes(q_cubes, k_cubes, layout, sel.q_count, sel.q_index)
    z = block_logits(q_bar, k_bar, layout, scale)
    if config.threshold_mode == "cumulative":
        mass = (torch.softmax(z.double(), -1) * dense).sum(-1)
        assert (mass >= min(config.kv_threshold, 1.0) - mass_slack).all(), "kept mass below kv_threshold"
    else:
        # the kernels pool and reduce in another fp32 order: blocks within 1e-4 std of the cut may go either way
        std = z.std(-1, unbiased=False, keepdim=True)
        need = z >= z.mean(-1, keepdim=True) + config.stat_lambda * std + 1e-4 * std
        assert not (need & ~dense).any(), "a block above mean + lambda std is missing"


def cube_and_slot_of_token(layout):
    """Per video token (raster order): its cube and its slot in the cube, [Lv] each."""
    dev = layout.slot_valid.device
    token = layout.token_of_slot.view(layout.num_cubes, layout.cube_volume)
    cube_of = torch.empty(layout.num_tokens, dtype=torch.long, device=dev)
    slot_of = torch.empty(layout.num_tokens, dtype=torch.long, device=dev)
    valid = layout.slot_valid
    cube_of[token[valid]] = torch.arange(layout.num_cubes, device=dev)[:, None].expand_as(token)[valid]
    slot_of[token[valid]] = torch.arange(layout.cube_volume, device=dev)[None].expand_as(token)[valid]
    return cube_of, slot_of


def source_tokens(layout, sel, n_prefix):
    """[B, H, Lv]: the token whose output each video token copies (the kept query of its source)."""
    token = layout.token_of_slot.view(layout.num_cubes, layout.cube_volume)
    cube_of, slot_of = cube_and_slot_of_token(layout)
    src_pos = sel.q_source.long()[..., cube_of, slot_of]  # [B,H,Lv]
    src_slot = sel.q_index.long()[..., cube_of, :].gather(-1, src_pos[..., None])[..., 0]
    return token[cube_of, src_slot] + n_prefix


def oracle(q, k, v, layout, sel, scale, n_prefix, n_suffix):
    """Float64 dense-masked attention on the same selection, written independently of the reference."""
    B, H, L, D = q.shape
    q, k, v = q.double(), k.double(), v.double()
    video = torch.arange(n_prefix, L - n_suffix, device=q.device)
    cube_of, _ = cube_and_slot_of_token(layout)
    allowed = torch.ones(B, H, L, L, dtype=torch.bool, device=q.device)
    dense = sel.to_dense()  # [B,H,N,N]
    allowed[..., video[:, None], video[None, :]] = dense[..., cube_of[:, None], cube_of[None, :]]
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    out = torch.softmax(logits, -1) @ v
    # every video token takes the row of its source (the kept query it copies)
    src_token = source_tokens(layout, sel, n_prefix)
    out[..., video, :] = out.gather(-2, src_token[..., None].expand(B, H, len(video), D))
    return out, src_token


def compute_dtype(dtype, backend):
    """The dtype the attention multiplies in: the kernels compute fp32 inputs in bf16 (documented)."""
    return torch.bfloat16 if backend == "triton" and dtype == torch.float32 else dtype


def dense_attention(q, k, v, scale):
    """SDPA in float64 on CPU; float32 on CUDA (the math backend's float64 [L, L] does not fit at video sizes)."""
    precision = torch.float32 if q.is_cuda else torch.float64
    return torch.nn.functional.scaled_dot_product_attention(q.to(precision), k.to(precision), v.to(precision),
                                                            scale=scale).double()


def entry_point_cases(grid=None, config=None, D=None):
    """Strategies of check_entry_point's arguments; a profile passes its own grids, configs, head dims."""
    return {"grid": grids() if grid is None else grid, "config": configs() if config is None else config,
            "B": st.integers(1, 4), "H": st.integers(1, 40),
            "D": st.sampled_from([64, 128, 24, 80]) if D is None else D, "dtype": st.sampled_from(DTYPES), "n_prefix": st.integers(0, 9), "n_suffix": st.integers(0, 9),
            "kind": st.sampled_from(["randn", "randn", "randn", "zeros", "constant", "duplicated"]),
            "magnitude": st.sampled_from([1.0, 0.01, 8.0]), "scale": st.sampled_from([None, 0.05, 1.0]),
            "strided": st.booleans(), "seed": st.integers(0, 2**16)}


def check_entry_point(profile, grid, config, B, H, D, dtype, n_prefix, n_suffix, kind, magnitude, scale, strided,
                      seed):
    """bsa_attention (backend auto: the kernels on CUDA where they fit) obeys the spec and equals attention
    on its own selection: the float64 oracle where it fits, else the reference on that selection.
    Returns what ran, for a summary."""
    L = n_prefix + math.prod(grid) + n_suffix
    layout = cube_layout(grid, config.cube_size, profile.device)
    rows = max(L, layout.num_cubes * layout.cube_volume)  # padded cubes cost like tokens
    max_rows = profile.max_rows if profile.max_pairs is None else min(profile.max_rows, profile.max_pairs // rows)
    H = max(1, min(H, max_rows // (B * rows)))
    B = max(1, min(B, max_rows // (H * rows)))
    q, k, v = make_qkv(B, H, L, D, dtype, kind, seed, magnitude, strided, profile.device)
    out, sel = bsa_attention(q, k, v, grid, config, n_prefix=n_prefix, n_suffix=n_suffix, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    backend = choose_backend(q)[0]
    s = 1.0 / math.sqrt(D) if scale is None else scale
    video = slice(n_prefix, L - n_suffix)
    extra = torch.cat([torch.arange(n_prefix), torch.arange(L - n_suffix, L)]).to(q.device)
    # the kernels' fp16 similarity may break near-ties differently from the reference: the spec check of
    # their selection runs on tie-free inputs (as tests/test_pipeline.py does)
    if backend == "reference" or kind == "randn":
        check_selection(sel, layout, config, layout.to_cubes(q[..., video, :]), layout.to_cubes(k[..., video, :]), s,
                        profile.mass_slack)
    # what the attention multiplies: fp32 inputs rounded to bf16 on the kernels (extra rows stay exact SDPA)
    seen = compute_dtype(dtype, backend)
    qs, ks, vs = (x.to(seen).to(dtype) for x in (q, k, v))
    if B * H * L * L <= ORACLE_PAIRS and not getattr(config, "pooled_remainder", False):
        expected, _ = oracle(qs, ks, vs, layout, sel, s, n_prefix, n_suffix)
    else:
        expected = bsa_attention_reference(qs.float(), ks.float(), vs.float(), layout, config, s, n_prefix, n_suffix,
                                           selection=sel)[0].double()
    if seen != dtype and extra.numel():
        expected[..., extra, :] = dense_attention(q.index_select(-2, extra), k, v, s)
    # dropped query rows are bitwise their source rows
    src_token = source_tokens(layout, sel, n_prefix)
    source_rows = out.gather(-2, src_token[..., None].expand(*src_token.shape, D))
    assert torch.equal(out[..., video, :], source_rows)
    # output rounding of the dtype, plus the fp32 compute error, which grows with the logits' spread
    fp32_error = 1e-5 * magnitude * magnitude ** 2 * s * math.sqrt(D)
    tol = TOL[seen] * max(1.0, magnitude) + fp32_error
    assert torch.allclose(out.double(), expected, atol=tol, rtol=tol), float((out.double() - expected).abs().max())
    if config.is_dense:
        assert bool((sel.kv_count == layout.num_cubes).all()) and bool((sel.q_count.long() == layout.n_valid).all())
        sdpa = dense_attention(qs, ks, vs, s)
        if seen != dtype and extra.numel():
            sdpa[..., extra, :] = dense_attention(q.index_select(-2, extra), k, v, s)
        tol = DENSE_TOL[seen] * max(1.0, magnitude) + fp32_error
        assert torch.allclose(out.double(), sdpa, atol=tol, rtol=tol), float((out.double() - sdpa).abs().max())
    return {"L": L, "B": B, "H": H, "D": D, "backend": backend}


@FUZZ
@given(**entry_point_cases())
def test_entry_point_matches_oracle(**case):
    check_entry_point(CPU, **case)


@FUZZ
@given(grid=grids(), config=configs(), B=st.integers(1, 2), H=st.integers(1, 4), D=st.sampled_from([16, 24]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       bad=st.sampled_from(["none", "grid", "prefix", "suffix", "rank", "dtype", "zero_grid"]))
def test_entry_point_rejects_with_value_error(grid, config, B, H, D, dtype, seed, bad):
    """Calls BSA cannot take raise ValueError naming the argument (never another exception)."""
    L = math.prod(grid)
    q, k, v = make_qkv(B, H, L, D, dtype, "randn", seed)
    kwargs = {}
    if bad == "grid":
        grid = (grid[0], grid[1], grid[2] + 1)
    elif bad == "prefix":
        kwargs["n_prefix"] = 1
    elif bad == "suffix":
        kwargs["n_suffix"] = -1
    elif bad == "rank":
        q = q[0]
    elif bad == "dtype":
        q = q.double()
    elif bad == "zero_grid":
        grid = (0, *grid[1:])
    if bad == "none":
        out, _ = bsa_attention(q, k, v, grid, config, **kwargs)
        assert torch.isfinite(out).all()
    else:
        names = {"grid": "grid", "prefix": "n_prefix", "suffix": "n_suffix", "rank": "q", "dtype": "q",
                 "zero_grid": "grid"}
        with pytest.raises(ValueError, match=rf"^{names[bad]} |n_suffix / grid"):
            bsa_attention(q, k, v, grid, config, **kwargs)


# ---- the node's override through ComfyUI's real attention function ---------------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def comfy_attention():
    from comfy_env import require_comfyui
    require_comfyui()
    import comfy.ldm.modules.attention as module
    return module


def set_layout(run, grid, n_prefix=0, n_suffix=0):
    """What the model wrapper tells the run at the start of a forward."""
    from comfyui_bsa.bsa_core.adapters import TokenLayout
    run.begin_forward(TokenLayout("test", grid, n_prefix, n_suffix,
                                  reason=None if grid is not None else "unknown video grid"))


def a_run(config, dense_blocks=(), min_tokens=0):
    """A sampling run's state as the OUTER_SAMPLE wrapper makes it, for driving the override directly."""
    from comfyui_bsa.bsa_core.patch import BlockRanges, BSAOptions, BSARun
    return BSARun(BSAOptions(config, 0.0, 1.0, BlockRanges.of(dense_blocks), min_tokens))


def override_cases(grid=None, config=None, heads=None, D=None):
    """Strategies of check_override's arguments; a profile passes its own grids, configs, heads, head dims."""
    return {"grid": grids(300) if grid is None else grid, "config": configs() if config is None else config,
            "B": st.integers(1, 3), "heads": st.integers(1, 6) if heads is None else heads,
            "D": st.sampled_from([64, 24, 80]) if D is None else D, "dtype": st.sampled_from(DTYPES),
            "case": st.sampled_from(["self", "self", "self", "declared_extra", "key_mask", "cross", "mask",
                                     "extra_tokens", "no_grid", "wrong_grid", "sigma_outside", "dense_block",
                                     "short"]),
            "skip_reshape": st.booleans(), "seed": st.integers(0, 2**16)}


def check_override(profile, comfy_attention, grid, config, B, heads, D, dtype, case, skip_reshape, seed):
    """ComfyUI's attention with the override: BSA (bitwise what bsa_attention gives) or dense with one logged
    reason. Returns what ran, for a summary."""
    from comfyui_bsa.bsa_core.patch import OVERRIDE_KEY, log, make_override

    n_prefix, n_suffix = (3, 4) if case in ("declared_extra", "extra_tokens", "key_mask") else (0, 0)
    L = n_prefix + math.prod(grid) + n_suffix
    if profile.max_pairs is not None:
        heads = max(1, min(heads, profile.max_pairs // (B * L * L)))
    Lk = 7 if case == "cross" else L
    dev = profile.device
    g = torch.Generator(dev).manual_seed(seed)
    shape = (lambda n: (B, heads, n, D)) if skip_reshape else (lambda n: (B, n, heads * D))
    q = torch.randn(shape(L), generator=g, device=dev).to(dtype)
    k, v = (torch.randn(shape(Lk), generator=g, device=dev).to(dtype) for _ in range(2))
    mask = (0.1 * torch.randn(L, Lk, generator=g, device=dev)).to(dtype) if case == "mask" else None
    if case == "key_mask":  # hides some extra (text / reference) keys from every query: BSA honours it exactly
        mask = torch.ones(1, L, dtype=torch.bool, device=dev)
        extra = torch.cat([torch.arange(n_prefix), torch.arange(L - n_suffix, L)]).to(dev)
        mask[0, extra[torch.randperm(len(extra), generator=g, device=dev)[:1 + seed % len(extra)]]] = False
    patch = a_run(config, dense_blocks={0} if case == "dense_block" else (), min_tokens=L + 1 if case == "short" else 0)
    patch.in_window = case != "sigma_outside"  # the step's start_percent..end_percent decision
    layout_grid = {"no_grid": None, "wrong_grid": (grid[0] + 1, *grid[1:])}.get(case, grid)
    declared = (n_prefix, n_suffix) if case in ("declared_extra", "key_mask") else (0, 0)
    set_layout(patch, layout_grid, *declared)
    options = {OVERRIDE_KEY: make_override(patch, None)}
    call = {"mask": mask, "skip_reshape": skip_reshape, "skip_output_reshape": skip_reshape}
    records = _Records()
    level = log.level
    log.addHandler(records)
    log.setLevel(logging.INFO)
    try:
        outs = [comfy_attention.optimized_attention(q, k, v, heads, transformer_options=options, **call)
                for _ in range(2)]
    finally:
        log.removeHandler(records)
        log.setLevel(level)
    plain = comfy_attention.optimized_attention(q, k, v, heads, **call)
    for out in outs:
        assert out.shape == plain.shape and out.dtype == plain.dtype and torch.isfinite(out).all()
    qh, kh, vh = (t if skip_reshape else t.unflatten(-1, (heads, D)).transpose(1, 2) for t in (q, k, v))
    # the kernels compute fp32 inputs in bf16: BSA-vs-dense comparisons take that dtype's tolerance
    seen = compute_dtype(dtype, choose_backend(qh)[0])
    stats = patch.stats.as_dict()
    assert stats["sparse_calls"] + stats["dense_calls"] == 2
    assert not any(r.startswith("BSA failed") for r in stats["dense_reasons"]), stats
    if case == "key_mask":
        assert stats["sparse_calls"] == 2, stats
        if config.is_dense:
            tol = DENSE_TOL[seen]
            assert torch.allclose(outs[0].float(), plain.float(), atol=tol, rtol=tol)
    elif case in ("self", "declared_extra"):
        assert stats["sparse_calls"] == 2, stats
        expected, _ = bsa_attention(qh, kh, vh, grid, config, n_prefix=n_prefix, n_suffix=n_suffix)
        expected = expected if skip_reshape else expected.transpose(1, 2).flatten(-2)
        assert torch.equal(outs[0], expected) and torch.equal(outs[1], expected)
    else:
        # dense_block: only block 0 of the forward is listed; the second call is block 1 and goes sparse
        assert stats["dense_calls"] == (1 if case == "dense_block" else 2), stats
        (reason,) = stats["dense_reasons"]
        assert [line for line in records.lines if "dense:" in line] == [f"[BSA] dense: {reason}"]
        tol = DENSE_TOL[dtype]
        assert torch.allclose(outs[0].float(), plain.float(), atol=tol, rtol=tol)
    return {"L": L, "B": B, "H": heads, "D": D, "case": case, "sparse": stats["sparse_calls"]}


@FUZZ
@given(**override_cases())
def test_override_sparse_or_dense_with_reason(comfy_attention, **case):
    check_override(CPU, comfy_attention, **case)


# ---- the Triton pipeline (interpreter without CUDA) ------------------------------------------------

@settings(FUZZ, max_examples=8)
@given(grid=grids(48), config=configs(cube=st.sampled_from([(2, 2, 2), (2, 2, 4), (1, 4, 4), (4, 4, 4)])),
       H=st.integers(1, 2), D=st.sampled_from([32, 64]), dtype=st.sampled_from(DTYPES),
       n_prefix=st.integers(0, 3), n_suffix=st.integers(0, 3),
       kind=st.sampled_from(["randn", "randn", "duplicated"]), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_pipeline_fuzz(grid, config, H, D, dtype, n_prefix, n_suffix, kind, strided, seed):
    """fp32 inputs run the kernels in bf16 (their documented behaviour): a bf16-sized tolerance."""
    pytest.importorskip("triton")
    from comfyui_bsa.bsa_core import attention
    from comfyui_bsa.bsa_core.reference import bsa_attention_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    L = n_prefix + math.prod(grid) + n_suffix
    q, k, v = (x.to(device) for x in make_qkv(1, H, L, D, dtype, kind, seed, strided=strided))
    layout = cube_layout(grid, config.cube_size, device)
    scale = 1.0 / math.sqrt(D)
    out, sel, _ = attention._bsa_attention_triton(q, k, v, layout, config, scale, n_prefix, n_suffix)
    assert out.dtype == dtype and torch.isfinite(out).all()
    sel_cpu = type(sel)(*(t.cpu() for t in (sel.q_count, sel.q_index, sel.q_source, sel.kv_count, sel.kv_index)))
    layout_cpu = cube_layout(grid, config.cube_size)
    video = slice(n_prefix, L - n_suffix)
    qc, kc = (layout_cpu.to_cubes(x[..., video, :].cpu()) for x in (q, k))
    # the kernels' fp16 similarity may break near-ties differently: keep the cosine slack loose there
    if kind == "randn":
        check_selection(sel_cpu, layout_cpu, config, qc, kc, scale)
    ref, _ = bsa_attention_reference(q, k, v, layout, config, scale, n_prefix, n_suffix, selection=sel)
    err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-6))
    assert err < 2e-2, err


def test_triton_pipeline_one_kept_query_per_cube():
    """Found by the fuzz test: one kept query per cube made the default packing 64 cubes per program,
    past the kernel's 32-cube limit (a ValueError, so a dense fallback on GPU)."""
    pytest.importorskip("triton")
    from comfyui_bsa.bsa_core import attention
    from comfyui_bsa.bsa_core.reference import bsa_attention_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid, config = (1, 2, 3), BSAConfig((4, 4, 4), keep_ratio=0.05, kv_threshold=0.5,
                                        threshold_mode="cumulative", pooled_remainder=False)
    q, k, v = (x.to(device) for x in make_qkv(1, 1, math.prod(grid), 32, torch.float16, "randn", 0))
    layout = cube_layout(grid, config.cube_size, device)
    out, sel, _ = attention._bsa_attention_triton(q, k, v, layout, config, 32 ** -0.5, 0, 0)
    assert int(sel.q_index.shape[-1]) == 1
    ref, _ = bsa_attention_reference(q, k, v, layout, config, 32 ** -0.5, selection=sel)
    assert torch.allclose(out.float(), ref.float(), atol=2e-3)
