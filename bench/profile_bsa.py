"""Where one BSA call's time goes on the GPU: per-kernel time (torch.profiler), the sum of kernel time
per call against the call's wall time back to back (the gap is host work: launches, Python), the call's peak
memory above its inputs, and the fixed cost = wall time per call minus the kept blocks' work at cuDNN's per-FLOP
rate (cuDNN SDPA timed on the same inputs), at the node defaults unless flags say otherwise:

    python bench/profile_bsa.py [--shape 480p | T,H,W/heads] [--cube 4x4x4] [--keep 1.0] [--mode statistical]
                                [--threshold 0.7] [--stat-lambda 1.0] [--no-pooled] [--host-profile 25]
                                [--kv-permuted]

--host-profile N lists the N Python functions with the most own time on the launch side (cProfile).
--kv-permuted permutes K/V to cube order even where the Gluon Hopper kernel reads them from the raster.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SHAPES, back_to_back_ms, host_profile, kv_permuted, video_inputs  # noqa: E402  (also loads the pack as comfyui_bsa)

from comfyui_bsa.bsa_core.attention import bsa_attention, bsa_attention_op  # noqa: E402
from comfyui_bsa.bsa_core.call_graphs import replaying_calls  # noqa: E402
from comfyui_bsa.bsa_core.config import RECOMMENDED, parse_cube_size  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402


def main():
    d = RECOMMENDED
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="480p", help=f"{', '.join(SHAPES)} or T,H,W/heads")
    parser.add_argument("--cube", default="x".join(map(str, d.cube_size)))
    parser.add_argument("--keep", type=float, default=d.keep_ratio)
    parser.add_argument("--mode", default=d.threshold_mode)
    parser.add_argument("--threshold", type=float, default=d.kv_threshold)
    parser.add_argument("--stat-lambda", type=float, default=d.stat_lambda)
    parser.add_argument("--no-pooled", action="store_true")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rows", type=int, default=20, help="kernels listed")
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="also list the N functions with the most own host time per call (cProfile)")
    parser.add_argument("--kv-permuted", action="store_true", help="K/V permuted to cube order (the A/B)")
    args = parser.parse_args()
    with kv_permuted(args.kv_permuted):
        profile(args, d)


def profile(args, d):
    grid, heads, (q, k, v), _, dense_ms = video_inputs(args.shape)
    config = dataclasses.replace(d, cube_size=parse_cube_size(args.cube), keep_ratio=args.keep,
                                 threshold_mode=args.mode, kv_threshold=args.threshold,
                                 stat_lambda=args.stat_lambda, pooled_remainder=not args.no_pooled)

    def call():
        return bsa_attention(q, k, v, grid, config, backend="triton")

    for _ in range(3):
        _, selection = call()
    torch.cuda.synchronize()
    inputs_bytes = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()  # its output included, as the model holds it
    peak_mib = (torch.cuda.max_memory_allocated() - inputs_bytes) / 2**20
    layout = cube_layout(grid, config.cube_size, q.device)
    kv_tokens = layout.n_valid[selection.kv_index.clamp(min=0).long()] * (selection.kv_index >= 0)
    kept_flops = 4 * q.shape[-1] * float((selection.q_count.double() * kv_tokens.sum(-1).double()).sum())
    dense_flops = 4 * q.shape[-1] * float(q.shape[-2]) ** 2 * heads
    # the pooled remainder's own work: every kept query against one key per cube its cube skipped
    skipped = layout.num_cubes - selection.kv_count.double()
    pooled_flops = 4 * q.shape[-1] * float((selection.q_count.double() * skipped).sum()) * config.pooled_remainder
    host_ms, wall_ms = back_to_back_ms(call, args.calls)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            call()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_ms = sum(e.self_device_time_total for e in events) / 1e3 / args.calls
    print(f"device: {torch.cuda.get_device_name()}  {args.shape} grid {grid} heads {heads}  {config}")
    print(f"per call, {args.calls} back to back: wall {wall_ms:.2f} ms, host (launch side) {host_ms:.2f} ms, "
          f"GPU kernels {kernel_ms:.2f} ms, idle GPU {wall_ms - kernel_ms:.2f} ms; peak memory of a call above its "
          f"inputs {peak_mib:.0f} MiB")
    kept_ms = dense_ms * kept_flops / dense_flops
    pooled_ms = dense_ms * pooled_flops / dense_flops
    print(f"cuDNN SDPA {dense_ms:.2f} ms; kept KV cubes {100 * float(selection.kept_kv_fraction()):.2f} %, their work "
          f"at cuDNN's rate {kept_ms:.3f} ms; fixed cost = wall - that = {wall_ms - kept_ms:.3f} ms; "
          f"x{dense_ms / wall_ms:.2f} over cuDNN")
    if pooled_flops:
        print(f"the pooled remainder's own work (one key per skipped cube) at cuDNN's rate {pooled_ms:.3f} ms; fixed "
              f"cost net of it {wall_ms - kept_ms - pooled_ms:.3f} ms")
    # the same call replayed from a CUDA graph: what is left once the host launches cost nothing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    _, graph_ms = back_to_back_ms(graph.replay, args.calls, warmup=1)
    print(f"CUDA graph replay per call {graph_ms:.3f} ms (fixed cost {graph_ms - kept_ms:.3f} ms, net of the pooled "
          f"remainder's work {graph_ms - kept_ms - pooled_ms:.3f} ms, x{dense_ms / graph_ms:.2f} over cuDNN)")
    # as a sampling run replays it (bsa_core/call_graphs.py): the op, its inputs copied in and its outputs out
    with replaying_calls() as graphs:
        replay_host_ms, replay_ms = back_to_back_ms(lambda: bsa_attention_op(q, k, v, grid, config), args.calls,
                                                    warmup=2)
        replayed = graphs.replays
    print(f"replaying_calls: the op per call {replay_ms:.3f} ms back to back (host {replay_host_ms:.3f} ms; "
          f"{replayed} of {args.calls + 2} calls replayed), x{dense_ms / replay_ms:.2f} over cuDNN")
    print(events.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.host_profile:
        import pstats

        profiler = host_profile(call, args.calls)
        print(f"host side, {args.calls} calls (times are totals over them):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.host_profile)


if __name__ == "__main__":
    main()
