"""GPU profile of the property suite: the properties of tests/test_fuzz_attention.py (same code, a larger
size profile) on CUDA with the Triton kernels at video sizes, and the growth of peak GPU memory with the
token count. Every test is marked gpu: skipped without CUDA.

    python3 -m pytest -q -s -m gpu tests/test_gpu_profile.py

-s prints one summary line per test (sizes, examples run, peak MiB). Derandomized: the same examples
on every run. Grids go up to 64 per axis and ~32k tokens; the fp32 reference on the kernel's own
selection stands in for the float64 oracle where [B, H, L, L] does not fit.
"""
import functools
import gc
import math
import time
from collections import Counter

import pytest
import test_fuzz_attention as fuzz
import torch
from comfyui_bsa.bsa_core import BSAConfig, bsa_attention, cube_layout
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from test_fuzz_attention import comfy_attention  # noqa: F401  (fixture: ComfyUI's attention module)

pytestmark = pytest.mark.gpu

MAX_TOKENS = 32768  # video tokens per entry-point call (Wan 2.1 480p x 81 frames is 21 x 30 x 52 = 32760)
OVERRIDE_TOKENS = 4096  # ComfyUI's own attention runs next to BSA in every override example
# max_pairs caps batch * heads * tokens^2, the cost of the dense-masked comparisons (under ~1 s an example);
# the kernels' selection sums kept mass in fp32 over up to 512 cubes: a looser slack than on CPU
GPU = fuzz.Profile("gpu", "cuda", max_rows=1 << 20, max_pairs=1 << 33, mass_slack=1e-4)
# Budgets: on a fresh H100 most of an example's time is compiling + autotuning the kernels for its
# shapes (50 entry-point examples took 193 s there); these keep the file near 3-4 minutes. No shrinking:
# a failure reports the example as drawn, with its reproduce blob.
GPU_FUZZ = settings(fuzz.FUZZ, max_examples=30, phases=[Phase.explicit, Phase.generate])
GPU_OVERRIDE_FUZZ = settings(GPU_FUZZ, max_examples=20)

# the shipped cubes plus non-power-of-2 volumes (another kernel path); few shapes: each compiles kernels
CUBES = st.sampled_from([*fuzz.CUBES, (2, 2, 2), (3, 3, 3), (1, 3, 5)])
POOLED = st.booleans()
# fixed shapes next to random ones: video sizes, all-prime axes, grids smaller than one cube
NAMED_GRIDS = [(21, 30, 52), (31, 31, 31), (8, 64, 64), (13, 61, 37), (1, 1, 1), (1, 3, 5), (64, 1, 1), (2, 64, 64)]


def grids(max_tokens):
    return st.one_of(fuzz.grids(max_tokens, (64, 64, 64)),
                     st.sampled_from([g for g in NAMED_GRIDS if math.prod(g) <= max_tokens]))


# keep_ratio = kv_threshold = 1 (cumulative) is dense attention: one example in four, to compare with SDPA
CONFIGS = st.one_of(fuzz.configs(cube=CUBES, pooled=POOLED), fuzz.configs(cube=CUBES, pooled=POOLED),
                    fuzz.configs(cube=CUBES, pooled=POOLED),
                    st.builds(BSAConfig, cube_size=CUBES, keep_ratio=st.just(1.0), kv_threshold=st.just(1.0),
                              threshold_mode=st.just("cumulative")))
HEAD_DIMS = st.sampled_from([64, 128, 80])  # 80: no kernel for it, the reference runs on the GPU


class Tally:
    """Examples run and peak GPU memory of one test, for its summary line."""

    def __init__(self, name):
        self.name, self.cases, self.start = name, [], time.perf_counter()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()

    def add(self, case):
        self.cases.append(case)

    def line(self):
        tokens = sorted(c["L"] for c in self.cases)
        rows = max(c["B"] * c["H"] * c["L"] for c in self.cases)
        kinds = Counter(c.get("backend", c.get("case")) for c in self.cases)
        return (f"[gpu profile] {self.name}: {len(self.cases)} examples, tokens {tokens[0]}..{tokens[-1]} "
                f"(median {tokens[len(tokens) // 2]}), max batch*heads*tokens {rows}, "
                f"{dict(sorted(kinds.items()))}, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB, "
                f"{time.perf_counter() - self.start:.0f} s on {torch.cuda.get_device_name()}")


def test_entry_point_fuzz_gpu():
    """bsa_attention on CUDA (the Triton pipeline; head_dim 80 the reference): spec-valid selection, output
    equal to attention on that selection and, at keep_ratio = kv_threshold = 1, to SDPA; always finite."""
    tally = Tally("entry point")

    @GPU_FUZZ
    @given(**fuzz.entry_point_cases(grid=grids(MAX_TOKENS), config=CONFIGS, D=HEAD_DIMS))
    def run(**case):
        tally.add(fuzz.check_entry_point(GPU, **case))

    run()
    print(tally.line())
    assert tally.cases


@pytest.mark.parametrize("cube", fuzz.CUBES, ids=lambda cube: "x".join(map(str, cube)))
def test_entry_point_wan_480p_each_node_cube(cube):
    """The same property on Wan 2.1 at 480p x 81 frames (21 x 30 x 52 tokens, head_dim 128, bf16) with each
    cube size the node offers: the workload the kernels are tuned for, every run."""
    tally = Tally(f"entry point, Wan 480p, cube {cube}")
    tally.add(fuzz.check_entry_point(GPU, grid=(21, 30, 52), config=BSAConfig(cube, keep_ratio=0.5, kv_threshold=0.9,
                                                                              threshold_mode="cumulative", pooled_remainder=False),
                                     B=1, H=8, D=128, dtype=torch.bfloat16, n_prefix=0, n_suffix=0, kind="randn",
                                     magnitude=1.0, scale=None, strided=False, seed=0))
    print(tally.line())


def test_override_fuzz_gpu(comfy_attention):  # noqa: F811  (the fixture imported above)
    """ComfyUI's attention with the node's override on CUDA: sparse (bitwise bsa_attention) or dense with one
    logged reason; masks, cross-attention, extra tokens, no / wrong grid. Skips without ComfyUI."""
    tally = Tally("override")

    @GPU_OVERRIDE_FUZZ
    @given(**fuzz.override_cases(grid=grids(OVERRIDE_TOKENS), config=CONFIGS, heads=st.integers(1, 40),
                                 D=HEAD_DIMS))
    def run(**case):
        tally.add(fuzz.check_override(GPU, comfy_attention, **case))

    run()
    print(tally.line())
    assert tally.cases


# ---- peak memory: O(L) + O(cubes^2), never O(L^2) ----------------------------------------------------

MEMORY_GRIDS = [(8, 32, 32), (16, 32, 64)]  # 8192 and 32768 tokens: 4x the tokens, 16x the cube pairs
MEMORY_CONFIG = BSAConfig((4, 4, 4), keep_ratio=0.5, kv_threshold=0.9,
                          threshold_mode="cumulative", pooled_remainder=False)
B, HEADS, D = 1, 4, 128


def _entry_point_call(grid):
    q, k, v = (torch.randn(B, HEADS, math.prod(grid), D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return (q, k, v), lambda q, k, v: bsa_attention(q, k, v, grid, MEMORY_CONFIG, backend="triton")[0]


def _override_call(attention_module, grid):
    """ComfyUI's attention on [B, L, heads * D] through the node's override, as a model's block calls it."""
    from comfyui_bsa.bsa_core.patch import OVERRIDE_KEY, make_override

    patch = fuzz.a_run(MEMORY_CONFIG)
    fuzz.set_layout(patch, grid)
    options = {OVERRIDE_KEY: make_override(patch, None)}

    def call(q, k, v):
        out = attention_module.optimized_attention(q, k, v, HEADS, transformer_options=options)
        assert patch.stats.dense_calls == 0, patch.stats.as_dict()
        return out

    qkv = tuple(torch.randn(B, math.prod(grid), HEADS * D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return qkv, call


def extra_peak(make_call, grid) -> tuple[int, int]:
    """(peak allocated during one call minus the inputs and the output, bytes of the inputs)."""
    inputs, call = make_call(grid)
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = call(*inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    assert torch.isfinite(out).all()
    return peak - base - out.numel() * out.element_size(), sum(x.numel() * x.element_size() for x in inputs)


@pytest.mark.parametrize("path", ["entry_point", "override"])
def test_peak_memory_grows_linearly(path, request):
    """Selection + kernels allocate O(L) + O(cubes^2): 4x the tokens grow the extra peak about 4x (O(L^2)
    would give 16x), and it stays under c1 * [B,H,L,D] bytes + c2 * cubes^2 * heads * 4 bytes."""
    if path == "override":
        module = request.getfixturevalue("comfy_attention")  # skips without ComfyUI
        make_call = functools.partial(_override_call, module)
    else:
        make_call = _entry_point_call
    for grid in MEMORY_GRIDS:  # compile + autotune (its benchmark buffers) before anything is measured
        inputs, call = make_call(grid)
        call(*inputs)
        del inputs, call
    measured = {}
    for grid in MEMORY_GRIDS:
        L = math.prod(grid)
        N = cube_layout(grid, MEMORY_CONFIG.cube_size).num_cubes
        extra, inputs = extra_peak(make_call, grid)
        one = B * HEADS * L * D * 2  # one bf16 [B, H, L, D] tensor
        bound = 8 * one + 16 * B * HEADS * N * N * 4 + (8 << 20)
        measured[L] = extra
        print(f"[gpu profile] peak memory {path}: grid {grid} L={L} cubes={N}: extra peak {extra / 2**20:.1f} MiB "
              f"(= {extra / one:.2f} x [B,H,L,D] bf16; inputs {inputs / 2**20:.0f} MiB), bound {bound / 2**20:.0f} MiB")
        assert extra <= bound, f"L={L}: extra peak {extra / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    small, large = (measured[math.prod(g)] for g in MEMORY_GRIDS)
    ratio = large / max(small, 1)
    print(f"[gpu profile] peak memory {path}: 4x tokens -> extra peak x{ratio:.2f} (O(L) ~4, O(L^2) 16) "
          f"on {torch.cuda.get_device_name()}")
    assert ratio < 8, f"extra peak grew x{ratio:.2f} for 4x the tokens: not O(L)"
