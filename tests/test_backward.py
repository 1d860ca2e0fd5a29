"""Autograd of bsa::attention (bsa_core/backward.py) against autograd of the float32 reference for the same
selection, against dense attention at dense settings, and its largest temporary (no O(L^2) tensor)."""
import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch

from comfyui_bsa.bsa_core import BSAConfig, cube_layout
from comfyui_bsa.bsa_core.attention import bsa_attention_op
from comfyui_bsa.bsa_core.reference import bsa_attention_reference, bsa_select

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors


def rms_rel(a, b):
    return float((a.float() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def op_and_reference_grads(B, H, D, grid, cube, n_prefix, n_suffix, config, dtype, seed=0):
    """(gradients of the op, gradients of the float32 reference, kept KV fraction) for one random call."""
    L = n_prefix + math.prod(grid) + n_suffix
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    grad_out = torch.randn(B, H, L, D, generator=g)
    out, _, kept_kv = bsa_attention_op(q, k, v, grid, config, n_prefix=n_prefix, n_suffix=n_suffix)
    got = torch.autograd.grad(out, [q, k, v], grad_out.to(dtype))

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    layout = cube_layout(grid, config.cube_size)
    scale = 1.0 / math.sqrt(D)
    video = slice(n_prefix, L - n_suffix)
    selection = bsa_select(layout.to_cubes(q32.detach()[..., video, :]), layout.to_cubes(k32.detach()[..., video, :]),
                           layout, config, scale)
    ref, _ = bsa_attention_reference(q32, k32, v32, layout, config, scale, n_prefix, n_suffix, selection=selection)
    expected = torch.autograd.grad(ref, [q32, k32, v32], grad_out)
    return got, expected, float(kept_kv)


CASES = [  # B, H, D, grid, cube, n_prefix, n_suffix, keep_ratio, threshold_mode, pooled_remainder
    (1, 2, 16, (4, 4, 4), (2, 2, 2), 0, 0, 1.0, "cumulative", False),
    (2, 3, 16, (3, 5, 6), (2, 2, 4), 0, 0, 0.5, "cumulative", False),
    (2, 2, 16, (3, 5, 6), (2, 2, 4), 3, 0, 1.0, "statistical", True),
    (1, 2, 32, (5, 6, 7), (4, 4, 4), 0, 5, 0.3, "statistical", False),
    (2, 2, 16, (3, 4, 5), (2, 2, 2), 2, 4, 0.5, "cumulative", True),
    (1, 3, 16, (2, 7, 9), (2, 4, 4), 4, 3, 0.6, "statistical", True),
    (1, 2, 16, (2, 3, 3), (4, 4, 4), 2, 2, 0.5, "cumulative", True),  # one partial cube
]


def case_id(case):
    B, H, D, grid, cube, n_prefix, n_suffix, keep, mode, pooled = case
    return (f"B{B}-H{H}-D{D}-T{'x'.join(map(str, grid))}-c{'x'.join(map(str, cube))}-x{n_prefix}+{n_suffix}"
            f"-r{keep}-{mode[:4]}-{'pooled' if pooled else 'nopool'}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_gradients_equal_autograd_of_the_reference(case, dtype):
    B, H, D, grid, cube, n_prefix, n_suffix, keep, mode, pooled = case
    config = BSAConfig(cube, keep_ratio=keep, kv_threshold=0.6, threshold_mode=mode, stat_lambda=0.5,
                       pooled_remainder=pooled)
    got, expected, kept_kv = op_and_reference_grads(B, H, D, grid, cube, n_prefix, n_suffix, config, dtype)
    if math.prod(grid) > math.prod(cube):
        assert kept_kv < 1.0, "the case must skip KV cubes to test the sparse gradient"
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip("qkv", got, expected):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert rms_rel(a, b) < tolerance, f"d{name}: rel RMS {rms_rel(a, b):.2e}"


def test_dense_settings_give_dense_gradients():
    """r = p = 1 (cumulative, no remainder) is dense attention: its gradients are SDPA's."""
    grid, n_prefix, n_suffix = (3, 5, 6), 2, 3
    L = n_prefix + math.prod(grid) + n_suffix
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, L, 16, generator=g).requires_grad_() for _ in range(3))
    grad_out = torch.randn(2, 2, L, 16, generator=g)
    dense = BSAConfig((2, 2, 4), keep_ratio=1.0, kv_threshold=1.0, threshold_mode="cumulative", pooled_remainder=False)
    out, _, _ = bsa_attention_op(q, k, v, grid, dense, n_prefix=n_prefix, n_suffix=n_suffix)
    got = torch.autograd.grad(out, [q, k, v], grad_out)
    expected = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v), [q, k, v], grad_out)
    for a, b in zip(got, expected):
        assert rms_rel(a, b) < 1e-5


def test_no_gradient_through_the_fractions():
    """The kept fractions are counts of the selection: differentiable code may use them, they pass nothing back."""
    q, k, v = (torch.randn(1, 2, 64, 16).requires_grad_() for _ in range(3))
    out, kept_queries, kept_kv = bsa_attention_op(q, k, v, (4, 4, 4), BSAConfig((2, 2, 2), keep_ratio=0.5))
    assert not kept_queries.requires_grad and not kept_kv.requires_grad
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_no_float64_path():
    """gradcheck needs float64; the op takes fp16/bf16/fp32 (the reference computes in float32), so the
    float32 reference's autograd above is the check instead."""
    q = torch.randn(1, 1, 64, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        bsa_attention_op(q, q, q, (4, 4, 4), BSAConfig((2, 2, 2)))


_MEASURE = r"""
import json, math, sys
import torch
sys.path.insert(0, sys.argv[1])
import conftest  # noqa: F401  (loads the pack as comfyui_bsa)
from memory_probe import LargestTemporary
from comfyui_bsa.bsa_core import BSAConfig, backward, reference
from comfyui_bsa.bsa_core.attention import bsa_attention_op

args = json.loads(sys.argv[2])
torch.set_num_threads(1)
backward._CHUNK_ELEMENTS = reference._CHUNK_ELEMENTS = args["chunk"]
grid = tuple(args["grid"])
g = torch.Generator().manual_seed(0)
L = args["n_prefix"] + math.prod(grid)
q, k, v = (torch.randn(1, args["H"], L, args["D"], generator=g).requires_grad_() for _ in range(3))
config = BSAConfig(cube_size=(4, 4, 4), keep_ratio=args["keep"], kv_threshold=0.5, threshold_mode="cumulative",
                   pooled_remainder=True)
out, _, _ = bsa_attention_op(q, k, v, grid, config, n_prefix=args["n_prefix"])
largest = LargestTemporary()
with largest:
    grads = torch.autograd.grad(out, [q, k, v], torch.ones_like(out))
print(json.dumps({"nbytes": largest.nbytes, "op": largest.op, "finite": all(bool(torch.isfinite(t).all()) for t in grads)}))
"""


@pytest.mark.parametrize("keep", [0.05, 1.0])
def test_backward_largest_temporary_is_linear_in_tokens(keep):
    """16k tokens, 2 heads: no backward temporary grows like L^2 (1 GiB of fp32 logits here); the largest is a
    chunk of logits or gathered keys, a [B,H,L,D] gradient, a cubes x cubes selection table or the
    selection's per-cube query similarities [B,H,N,S,S]. Measured in a
    child process with a TorchDispatchMode, like test_reliability's forward check."""
    chunk, H, D, n_prefix, grid = 1 << 16, 2, 8, 16, (16, 32, 32)
    N, S = 256, 64
    bound = max(4 * 4 * chunk,  # a chunk of fp32 logits / gathered keys, a few to a chunk
                8 * H * (n_prefix + N * S) * D,  # a [B,H,L,D] tensor in a 64-bit type
                8 * H * N * N * 2,  # selection tables
                4 * H * N * S * S)  # the recomputed query selection's similarities within each cube
    args = dict(chunk=chunk, grid=grid, H=H, D=D, keep=keep, n_prefix=n_prefix)
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(pathlib.Path(__file__).parent), json.dumps(args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"largest backward temporary {got['nbytes'] / 1e6:.2f} MB ({got['op']}), bound {bound / 1e6:.2f} MB")
    assert got["finite"]
    assert got["nbytes"] <= bound, f"{got['op']} is {got['nbytes'] / 1e6:.2f} MB > {bound / 1e6:.2f} MB"
