"""What FP8 (e4m3) would cost the pooled remainder in accuracy, before any kernel is written: BSA's output with the
pooled remainder exact (the pure-torch reference's math) against the same with its FP8 version simulated (Q and the
pooled keys rounded to e4m3 with a per-head scale for the pooled logits, the pooled probabilities and mean values
rounded to e4m3 for P V-bar, the row sum kept in fp32: FlashAttention-3's FP8 recipe), both against dense, on the
bench's video-like Q/K/V. CPU, no GPU needed:

    python bench/fp8_pooled_error.py [--grid 9,16,24] [--heads 4] [--stat-lambdas 1,1.5,2.5]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import errors, video_qkv  # noqa: E402  (also loads the pack as comfyui_bsa)

from comfyui_bsa.bsa_core.config import RECOMMENDED  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.bsa_core.reference import bsa_select, cube_mean  # noqa: E402

E4M3_MAX = 448.0


def e4m3(x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """x through float8_e4m3fn and back, x * scale rounded (scale: per head, broadcast over the rest)."""
    return (x * scale).to(torch.float8_e4m3fn).float() / scale


def head_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-head scale that maps the head's largest |x| to e4m3's largest finite value."""
    return E4M3_MAX / x.abs().amax(dim=tuple(range(2, x.dim())), keepdim=True).clamp(min=1e-12)


def bsa_pooled(q_cubes, k_cubes, v_cubes, layout, selection, scale, fp8: bool) -> torch.Tensor:
    """keep_ratio 1: every query over its cube's selected keys plus one pooled key per skipped cube, one softmax;
    with fp8 the pooled part as an FP8 kernel would compute it. [B, H, N, S, D] fp32."""
    B, H, N, S, D = q_cubes.shape
    q, keys, values = q_cubes.float(), k_cubes.float().reshape(B, H, N * S, D), v_cubes.float().reshape(B, H, N * S, D)
    k_bar, v_bar = cube_mean(k_cubes, layout), cube_mean(v_cubes, layout)
    log_n = torch.log(layout.n_valid.float())
    q_pool, k_pool, v_pool = q, k_bar, v_bar
    if fp8:
        q_pool, k_pool, v_pool = e4m3(q, head_scale(q)), e4m3(k_bar, head_scale(k_bar)), e4m3(v_bar, head_scale(v_bar))
    cube_mask = selection.to_dense()
    out = torch.empty_like(q)
    for n in range(N):
        allowed = (cube_mask[:, :, n, :, None] & layout.slot_valid).reshape(B, H, 1, N * S)
        exact = (torch.einsum("bhqd,bhkd->bhqk", q[:, :, n], keys) * scale).masked_fill(~allowed, float("-inf"))
        pooled = torch.einsum("bhqd,bhmd->bhqm", q_pool[:, :, n], k_pool) * scale + log_n
        pooled = pooled.masked_fill(cube_mask[:, :, n, None, :], float("-inf"))
        row_max = torch.maximum(exact.amax(-1, keepdim=True), pooled.amax(-1, keepdim=True))
        p_exact, p_pooled = torch.exp(exact - row_max), torch.exp(pooled - row_max)
        row_sum = p_exact.sum(-1, keepdim=True) + p_pooled.sum(-1, keepdim=True)  # fp32 in the kernel either way
        if fp8:
            p_pooled = e4m3(p_pooled)  # <= 1: no scale, as FlashAttention-3 feeds P to its FP8 P V
        out[:, :, n] = (p_exact @ values + p_pooled @ v_pool) / row_sum
    return out * layout.slot_valid[..., None]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default="9,16,24")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--stat-lambdas", default="1,1.5,2.5")
    args = parser.parse_args()
    grid = tuple(int(x) for x in args.grid.split(","))
    q, k, v = video_qkv(grid, args.heads, dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(q.shape[-1])
    layout = cube_layout(grid, (4, 4, 4), q.device)
    dense = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    qc, kc, vc = (layout.to_cubes(x) for x in (q, k, v))
    print(f"grid {grid}, {args.heads} heads, head_dim {q.shape[-1]}, bf16 video-like Q/K/V; rel L2 against dense")
    print(f"  {'stat_lambda':>11s} {'kept KV':>7s} {'pooled exact':>12s} {'pooled FP8':>10s} {'FP8 vs exact':>12s}")
    for lam in (float(x) for x in args.stat_lambdas.split(",")):
        config = dataclasses.replace(RECOMMENDED, threshold_mode="statistical", stat_lambda=lam)
        selection = bsa_select(qc, kc, layout, config, scale)
        exact, fp8 = (layout.to_raster(bsa_pooled(qc, kc, vc, layout, selection, scale, f)) for f in (False, True))
        print(f"  {lam:11.2f} {100 * float(selection.kept_kv_fraction()):6.1f}% {errors(exact, dense)[0]:12.4f} "
              f"{errors(fp8, dense)[0]:10.4f} {errors(fp8, exact)[0]:12.4f}", flush=True)


if __name__ == "__main__":
    main()
