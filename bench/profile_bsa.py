"""Where one BSA call's time goes on the GPU: per-kernel time (torch.profiler), the sum of kernel time
per call against the call's wall time back to back (the gap is host work: launches, the host sync of
the KV cut, Python), at the node defaults unless flags say otherwise:

    python bench/profile_bsa.py [--shape 480p] [--cube 4x4x4] [--keep 1.0] [--mode statistical]
                                [--threshold 0.7] [--stat-lambda 1.0] [--no-pooled]
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_attention import SHAPES  # noqa: E402  (also loads the pack as comfyui_bsa)
from video_qkv import video_qkv  # noqa: E402

from comfyui_bsa.bsa_core.attention import bsa_attention  # noqa: E402
from comfyui_bsa.bsa_core.config import RECOMMENDED, parse_cube_size  # noqa: E402


def main():
    d = RECOMMENDED
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="480p", choices=sorted(SHAPES))
    parser.add_argument("--cube", default="x".join(map(str, d.cube_size)))
    parser.add_argument("--keep", type=float, default=d.keep_ratio)
    parser.add_argument("--mode", default=d.threshold_mode)
    parser.add_argument("--threshold", type=float, default=d.kv_threshold)
    parser.add_argument("--stat-lambda", type=float, default=d.stat_lambda)
    parser.add_argument("--no-pooled", action="store_true")
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    grid, heads = SHAPES[args.shape]
    q, k, v = video_qkv(grid, heads, device="cuda", dtype=torch.bfloat16)
    config = dataclasses.replace(d, cube_size=parse_cube_size(args.cube), keep_ratio=args.keep,
                                 threshold_mode=args.mode, kv_threshold=args.threshold,
                                 stat_lambda=args.stat_lambda, pooled_remainder=not args.no_pooled)

    def call():
        return bsa_attention(q, k, v, grid, config, backend="triton")

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        call()
    host_ms = (time.perf_counter() - t0) * 1e3 / args.calls  # until the last launch returned
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.calls
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            call()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_ms = sum(e.self_device_time_total for e in events) / 1e3 / args.calls
    print(f"device: {torch.cuda.get_device_name()}  {args.shape} grid {grid} heads {heads}  {config}")
    print(f"per call, {args.calls} back to back: wall {wall_ms:.2f} ms, host (launch side) {host_ms:.2f} ms, "
          f"GPU kernels {kernel_ms:.2f} ms, idle GPU {wall_ms - kernel_ms:.2f} ms")
    print(events.table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
