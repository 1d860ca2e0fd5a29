"""The host's work in one attention call as a sampling run makes it: ComfyUI's optimized_attention on [B, L, H*D]
inputs, dense (ComfyUI's own, torch SDPA on cuDNN) and with the BSA override, replayed from a CUDA graph (inside
`replaying_calls`, as a run does) and launched. Per call, back to back: host time until the call returned and wall
time until the GPU finished; then the functions with the most own host time per call in the replayed calls
(cProfile). A script, not a test:

    python3 bench/host_probe.py [--shape 2,30,52/12] [--calls 200] [--rows 25]

On the GPU machine carry [".whl", ".comfy_min"] as bench/e2e_wan.py says (COMFYUI_PATH=.comfy_min/ComfyUI).
"""
from __future__ import annotations

import argparse
import math
import pathlib
import pstats
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import back_to_back_ms, host_profile, shape_of  # noqa: E402  (also loads the pack as comfyui_bsa)
from e2e_wan import bootstrap_comfyui, comfyui_path  # noqa: E402

from comfyui_bsa.bsa_core.adapters import TokenLayout  # noqa: E402
from comfyui_bsa.bsa_core.call_graphs import replaying_calls  # noqa: E402
from comfyui_bsa.bsa_core.config import RECOMMENDED  # noqa: E402
from comfyui_bsa.bsa_core.patch import OVERRIDE_KEY, BlockRanges, BSAOptions, BSARun, make_override  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="2,30,52/12", help="T,H,W/heads of the token grid (head_dim 128)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rows", type=int, default=25, help="functions listed")
    args = parser.parse_args()
    bootstrap_comfyui(comfyui_path(), cpu=False)
    import comfy.ldm.modules.attention as attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    grid, heads = shape_of(args.shape)
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, math.prod(grid), heads * 128, generator=g, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    run = BSARun(BSAOptions(RECOMMENDED, 0.0, 1.0, BlockRanges(), 0))
    layout = TokenLayout("wan", grid, 0, 0)
    bsa_options = {OVERRIDE_KEY: make_override(run, None)}

    def bsa_call():
        run.begin_forward(layout)
        return attention.optimized_attention(q, k, v, heads, transformer_options=bsa_options)

    def dense_call():
        return attention.optimized_attention(q, k, v, heads, transformer_options={})

    print(f"device {torch.cuda.get_device_name()}; grid {grid} = {math.prod(grid)} tokens, {heads} heads; "
          f"{args.calls} calls back to back")
    with torch.inference_mode(), sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        rows = {"dense (ComfyUI, cuDNN)": back_to_back_ms(dense_call, args.calls, warmup=2),
                "BSA launched": back_to_back_ms(bsa_call, args.calls, warmup=2)}
        with replaying_calls() as graphs:
            rows["BSA replayed"] = back_to_back_ms(bsa_call, args.calls, warmup=2)
            profile = host_profile(bsa_call, args.calls)
            replays = graphs.replays
    for label, (host_ms, wall_ms) in rows.items():
        print(f"{label:24s} host {host_ms:.3f} ms, wall {wall_ms:.3f} ms a call")
    print(f"{replays} calls replayed; {run.stats.sparse_calls} sparse calls, dense reasons "
          f"{dict(run.stats.dense_reasons) or 'none'}")
    stats = pstats.Stats(profile)
    total = sum(row[2] for row in stats.stats.values())  # own time
    print(f"cProfile of {args.calls} replayed calls: own time {total * 1e3 / args.calls:.3f} ms a call (profiler "
          f"overhead included); the functions with the most, in us a call:")
    top = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:args.rows]
    for (file, line, name), (_, ncalls, own, cumulative, _) in top:
        where = f"{pathlib.Path(file).parent.name}/{pathlib.Path(file).name}:{line}" if line else file
        print(f"{own * 1e6 / args.calls:8.1f} own {cumulative * 1e6 / args.calls:8.1f} cum "
              f"{ncalls / args.calls:5.1f}x  {name}  {where}")


if __name__ == "__main__":
    main()
