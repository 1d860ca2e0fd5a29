"""A few launches of the Gluon attention kernel alone on the node's own tables (video-like Q/K/V, a Wan shape),
for a profiler to look at one of them: what stalls its warps, how busy its tensor pipe and L2 are. E.g.

    ncu -k regex:_hopper_block_sparse -s 2 -c 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python bench/one_launch.py [--shape 480p] [--setting stat1] [--candidate path/to/candidate_hopper.py]

(`-s 2` skips the first two launches: the build's and a warm one.) --candidate launches an edited copy of the
Gluon module instead of the committed one, as `kernel_variants.py --gluon-candidates` times it. ncu runs the
SM at its base clock: compare its percentages, not its durations, with do_bench's times.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SHAPES, load_kernel_copy, video_qkv  # noqa: E402  (also loads the pack as comfyui_bsa)
from kernel_variants import SETTINGS, _config, gluon_module  # noqa: E402

from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.bsa_core.gpu_select import select_triton  # noqa: E402
from comfyui_bsa.kernels.block_sparse_attention import (  # noqa: E402
    block_sparse_attention_raster, plan_block_sparse)
from comfyui_bsa.kernels.cube_permute import permute_qkv  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="480p", choices=sorted(SHAPES))
    parser.add_argument("--setting", default="stat1", choices=sorted(SETTINGS))
    parser.add_argument("--candidate", help="an edited copy of kernels/block_sparse_attention_hopper.py")
    parser.add_argument("--launches", type=int, default=3)
    args = parser.parse_args()
    grid, heads = SHAPES[args.shape]
    q, k, v = video_qkv(grid, heads, device="cuda", dtype=torch.bfloat16)
    layout = cube_layout(grid, (4, 4, 4), q.device)
    scale = q.shape[-1] ** -0.5
    _, q_bar, k_cubes, k_bar, v_cubes, k_pooled, v_pooled = permute_qkv(q, k, v, layout)
    sel, mask = select_triton(None, None, layout, _config(args.setting), scale, k_bar=k_bar, q_bar=q_bar,
                              return_mask=True)
    plan = plan_block_sparse(sel.kv_count, sel.kv_index, 1)
    out = torch.empty_like(q)
    with gluon_module(load_kernel_copy(args.candidate) if args.candidate else None):
        for _ in range(args.launches):
            block_sparse_attention_raster(q, k_cubes, v_cubes, layout, sel.kv_count, sel.kv_index, out, 0, scale,
                                          plan=plan, remainder=(k_pooled, v_pooled, mask), hopper_kernel=True)
    torch.cuda.synchronize()
    print(f"{args.launches} launches, {args.shape} {args.setting}, {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
