"""The call's first pass alone (`kernels/cube_permute.permute_qkv`: Q's mean, K's and V's means and, where the
attention kernel needs them, their cubes; one launch) at Wan shapes, against the bytes it must move at the card's
copy bandwidth (a device-to-device copy timed in the same run). A script, not a test:

    python bench/permute_qkv.py [--shapes 480p,720p] [--warps 4,2,1]

--warps times the pass at each warp count a program (the committed one is `cube_permute._QKV_WARPS`).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SHAPES, ms, video_qkv  # noqa: E402  (also loads the pack as comfyui_bsa)

from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.kernels import cube_permute  # noqa: E402
from comfyui_bsa.kernels.cube_permute import permute_qkv  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="480p,720p")
    parser.add_argument("--warps", default=str(cube_permute._QKV_WARPS), metavar="COUNTS",
                        help="warps a program to time, comma-separated (default: the committed count)")
    args = parser.parse_args()
    warp_counts = [int(n) for n in args.warps.split(",")]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for shape in args.shapes.split(","):
        grid, heads = SHAPES[shape]
        q, k, v = video_qkv(grid, heads, device="cuda", dtype=torch.bfloat16)
        layout = cube_layout(grid, (4, 4, 4), q.device)
        size = q.numel() * q.element_size()
        source = torch.empty(2 * q.numel(), dtype=q.dtype, device=q.device)
        target = torch.empty_like(source)
        rate = 4 * size / ms(lambda: target.copy_(source)) / 1e6  # a copy reads and writes: GB/s of traffic
        print(f"\n{shape}: {tuple(q.shape)} {q.dtype}, {size / 1e6:.0f} MB a tensor; a copy moves {rate:.0f} GB/s")
        for kv_cubes in (True, False):
            moved = size * (3 + 2 * kv_cubes)  # Q, K, V read; K, V written with their cubes (the means are small)
            for warps in warp_counts:
                cube_permute._QKV_WARPS = warps
                took = ms(lambda: permute_qkv(q, k, v, layout, kv_cubes=kv_cubes))  # noqa: B023
                print(f"  K/V cubes written: {str(kv_cubes):5s} {warps} warps {1e3 * took:7.1f} us, "
                      f"{moved / took / 1e6:5.0f} GB/s ({moved / took / 1e6 / rate:4.0%} of a copy's)", flush=True)


if __name__ == "__main__":
    main()
