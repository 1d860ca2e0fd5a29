"""Reliability on CPU: bounded temporaries, independent and resettable patch state, a 50-run soak,
bad node inputs rejected at execute with the accepted range in the message."""
import gc
import logging
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from comfyui_bsa.bsa_core import BSAConfig, bsa_attention
from comfyui_bsa.bsa_core import reference as reference_module
from comfyui_bsa.bsa_core.reference import keep_counts
from comfyui_bsa.bsa_core.cubes import cube_layout


class LargestTemporary(TorchDispatchMode):
    """The largest storage any aten op creates while active (deterministic, unlike RSS)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.nbytes:
                self.nbytes, self.op = t.untyped_storage().nbytes(), f"{func} -> {tuple(t.shape)} {t.dtype}"
        return out


# ---- memory ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [4, 16], ids=["L4096", "L16384"])
def test_largest_temporary_is_linear_in_tokens(monkeypatch, T):
    """No temporary grows like L^2/S: the largest is an attention chunk, one [B,H,L,D]-sized tensor,
    a cube row of logits, or a cubes x cubes selection table (O(N^2), what BSA_SPEC allows)."""
    chunk = 1 << 16
    monkeypatch.setattr(reference_module, "_CHUNK_ELEMENTS", chunk)
    B, H, D, grid, cube = 1, 1, 8, (T, 32, 32), (4, 4, 4)
    config = BSAConfig(cube_size=cube, keep_ratio=0.05, kv_threshold=0.5)
    L = math.prod(grid)
    layout = cube_layout(grid, cube)
    N, S = layout.num_cubes, layout.cube_volume
    Kq = int(keep_counts(layout.n_valid, config.keep_ratio).max())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    bound = max(4 * chunk,  # one chunk of fp32 logits
                4 * B * H * Kq * N * S,  # one cube row of logits when a row alone exceeds the chunk
                8 * B * H * N * S * D,  # a [B,H,L,D] tensor in a 64-bit type
                8 * B * H * N * N * 2)  # selection tables [B,H,N,N] (int64 sort, with slack)
    largest = LargestTemporary()
    with largest:
        out, _ = bsa_attention(q, k, v, grid, config)
    print(f"L={L}: largest temporary {largest.nbytes / 1e6:.2f} MB ({largest.op}), bound {bound / 1e6:.2f} MB")
    assert torch.isfinite(out).all()
    assert largest.nbytes <= bound, f"L={L}: {largest.op} is {largest.nbytes / 1e6:.2f} MB > {bound / 1e6:.2f} MB"


def test_default_chunk_bounds_the_attention_temporary():
    """With the shipped chunk size, the logits of 2 heads x 16k tokens stay one 64 MiB chunk."""
    grid = (16, 32, 32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, math.prod(grid), 8, generator=g) for _ in range(3))
    largest = LargestTemporary()
    with largest:
        bsa_attention(q, k, v, grid, BSAConfig(keep_ratio=0.05, kv_threshold=0.5))
    assert largest.nbytes <= 4 * reference_module._CHUNK_ELEMENTS, largest.op
