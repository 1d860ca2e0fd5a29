"""Seconds until the first BSA call of a process returns (Triton compile + autotune, or their disk
caches), at the node defaults on Wan 480p video-like Q/K/V, then the time of a warm call:

    TRITON_CACHE_DIR=/tmp/tc python3 bench/first_call.py     # run it twice: cold, then from the caches
"""
from __future__ import annotations

import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SHAPES, video_qkv  # noqa: E402  (also loads the pack as comfyui_bsa)

from comfyui_bsa.bsa_core.attention import bsa_attention  # noqa: E402
from comfyui_bsa.bsa_core.config import RECOMMENDED  # noqa: E402


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    grid, heads = SHAPES["480p"]
    q, k, v = video_qkv(grid, heads, device="cuda", dtype=torch.bfloat16)
    call = lambda: bsa_attention(q, k, v, grid, RECOMMENDED, backend="triton")  # noqa: E731
    first, warm = timed(call), timed(call)
    print(f"{torch.cuda.get_device_name()}: first call {first:.2f} s, next call {1e3 * warm:.2f} ms")


if __name__ == "__main__":
    main()
