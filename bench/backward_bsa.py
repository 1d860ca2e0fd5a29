"""Forward + backward of one BSA call vs cuDNN SDPA forward + backward (video-like Q/K/V, Wan shapes), and
the gradients' error against dense attention's. A script, not a test:

    python bench/backward_bsa.py [--shapes 480p] [--settings stat1,stat1.5] [--profile]

fwd+bwd is what training runs: bsa::attention's forward (it saves its LSE), then autograd, whose backward
recomputes the call's selection and runs the block-sparse backward kernels (bsa_core/gpu_backward.py); bwd is
that backward alone. Times are do_bench medians on the same card in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import errors, ms, video_inputs  # noqa: E402  (also loads the pack as comfyui_bsa)

from comfyui_bsa.bsa_core.attention import bsa_attention, bsa_attention_op  # noqa: E402
from comfyui_bsa.bsa_core.config import RECOMMENDED  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.bsa_core.gpu_backward import bsa_attention_backward_triton  # noqa: E402

SETTINGS = {"stat1": ("statistical", 1.0), "stat1.5": ("statistical", 1.5), "cum0.9": ("cumulative", 0.9)}


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="480p")
    parser.add_argument("--settings", default="stat1,stat1.5")
    parser.add_argument("--profile", action="store_true", help="per-kernel GPU time of each setting's backward")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for shape in args.shapes.split(","):
        grid, heads, (q, k, v), _, _ = video_inputs(shape)
        grad = torch.randn_like(q)
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]

        def dense_fwd_bwd():
            out = torch.nn.functional.scaled_dot_product_attention(*leaves)
            return torch.autograd.grad(out, leaves, grad)

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense_ms = ms(dense_fwd_bwd)
            dense_grads = dense_fwd_bwd()
        print(f"\n{shape}: grid {grid}, {heads} heads; cuDNN SDPA forward + backward {dense_ms:.2f} ms")
        print(f"  {'setting':8s} {'fwd+bwd ms':>10s} {'x cuDNN':>7s} {'bwd ms':>7s}  rel L2 of dq, dk, dv vs dense")
        scale = 1.0 / math.sqrt(q.shape[-1])
        for name in args.settings.split(","):
            mode, value = SETTINGS[name]
            extra = {"stat_lambda": value} if mode == "statistical" else {"kv_threshold": value}
            config = dataclasses.replace(RECOMMENDED, threshold_mode=mode, **extra)
            layout = cube_layout(grid, config.cube_size, q.device)

            def fwd_bwd():  # what training runs: the op's forward, then autograd through its saved LSE
                out = bsa_attention_op(*leaves, grid, config, backend="triton")[0]
                return torch.autograd.grad(out, leaves, grad)

            out, _, lse = bsa_attention(q, k, v, grid, config, backend="triton", return_lse=True)

            def backward():
                return bsa_attention_backward_triton(q, k, v, grad, layout, config, scale, out=out, lse=lse)

            grads = fwd_bwd()
            total, bwd = ms(fwd_bwd), ms(backward)
            rels = ", ".join(f"{errors(a, b)[0]:.3f}" for a, b in zip(grads, dense_grads))
            print(f"  {name:8s} {total:10.2f} {dense_ms / total:7.2f} {bwd:7.2f}  {rels}", flush=True)
            if args.profile:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    backward()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
