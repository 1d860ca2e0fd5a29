"""Per-kernel GPU time of one BSA call (torch.profiler), to see which stage dominates:

    python bench/profile_bsa.py [--shape 480p] [--cube 4x4x4] [--keep 0.5] [--threshold 0.5]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_attention import SHAPES  # noqa: E402  (also loads the pack as comfyui_bsa)
from video_qkv import video_qkv  # noqa: E402

from comfyui_bsa.bsa_core.attention import bsa_attention  # noqa: E402
from comfyui_bsa.bsa_core.config import BSAConfig, parse_cube_size  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="480p")
    parser.add_argument("--cube", default="4x4x4")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    grid, heads = SHAPES[args.shape]
    q, k, v = video_qkv(grid, heads, device="cuda", dtype=torch.bfloat16)
    config = BSAConfig(parse_cube_size(args.cube), keep_ratio=args.keep, kv_threshold=args.threshold)
    for _ in range(3):
        bsa_attention(q, k, v, grid, config, backend="triton")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        bsa_attention(q, k, v, grid, config, backend="triton")
        torch.cuda.synchronize()
    print(f"device: {torch.cuda.get_device_name()}  {args.shape} cube {args.cube} keep {args.keep} p {args.threshold}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
