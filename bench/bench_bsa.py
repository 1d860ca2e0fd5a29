"""End-to-end BSA (permute + pool + select + attention + scatter) vs cuDNN SDPA, FlexAttention on the
same block table and comfy-kitchen's sol_attn, on Wan shapes with video-like Q/K/V. A script, not a test:

    PYTHONPATH=.ck python bench/bench_bsa.py [--shapes 480p,720p]

Every time is the median of triton.testing.do_bench on the same card in the same run; the error of
every sparse output is against dense attention on the same inputs (relative L2 and cosine).
TFLOP/s of ours count kept blocks only: 4 * D * sum(kept queries * valid keys of the selected cubes).
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_attention import SHAPES, _flex_setup, _ms  # noqa: E402  (also loads the pack as comfyui_bsa)
from video_qkv import video_qkv  # noqa: E402

from comfyui_bsa.bsa_core.attention import bsa_attention  # noqa: E402
from comfyui_bsa.bsa_core.config import BSAConfig  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.bsa_core.reference import sparse_attention_reference  # noqa: E402
from comfyui_bsa.kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from comfyui_bsa.kernels.bsa_select import select_triton  # noqa: E402
from comfyui_bsa.kernels.cube_permute import cube_permute  # noqa: E402
from comfyui_bsa.kernels.output_scatter import output_scatter  # noqa: E402

SETTINGS = [  # (cube, keep_ratio, mode, kv_threshold or lambda)
    ((4, 4, 4), 0.5, "cumulative", 0.5),
    ((4, 4, 4), 0.5, "cumulative", 0.7),
    ((4, 4, 4), 0.5, "cumulative", 0.9),
    ((4, 4, 4), 0.5, "statistical", 2.0),
    ((4, 4, 8), 0.5, "cumulative", 0.5),
    ((4, 4, 8), 0.5, "cumulative", 0.7),
    ((4, 4, 8), 0.5, "cumulative", 0.9),
    ((2, 8, 8), 0.5, "cumulative", 0.7),
    ((4, 4, 4), 1.0, "cumulative", 0.7),
    ((4, 4, 8), 1.0, "cumulative", 0.5),
    ((4, 4, 8), 1.0, "statistical", 2.0),
]


def _errors(out, ref):
    a, b = out.float().flatten(), ref.float().flatten()
    return float((a - b).norm() / b.norm()), float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _config(cube, keep, mode, value):
    if mode == "statistical":
        return BSAConfig(cube, keep_ratio=keep, threshold_mode=mode, stat_lambda=value, kv_threshold=1.0, pooled_remainder=False)
    return BSAConfig(cube, keep_ratio=keep, kv_threshold=value, threshold_mode="cumulative", pooled_remainder=False)


def bench_setting(q, k, v, grid, config, dense_out, dense_ms, flex: bool):
    scale = 1.0 / math.sqrt(q.shape[-1])
    layout = cube_layout(grid, config.cube_size, q.device)
    total = _ms(lambda: bsa_attention(q, k, v, grid, config, backend="triton"))
    out, sel = bsa_attention(q, k, v, grid, config, backend="triton")
    rel, cos = _errors(out, dense_out)

    qc = cube_permute(q, layout)
    kc, k_bar = cube_permute(k, layout, with_mean=True)
    vc = cube_permute(v, layout)
    t_perm = _ms(lambda: (cube_permute(q, layout), cube_permute(k, layout, with_mean=True), cube_permute(v, layout)))
    t_sel = _ms(lambda: select_triton(qc, kc, layout, config, scale, k_bar=k_bar))
    attn = lambda: block_sparse_attention(qc, kc, vc, sel.q_index, sel.kv_count, sel.kv_index,  # noqa: E731
                                          layout.slot_valid, scale)
    t_attn = _ms(attn)
    out_kept = attn()
    full = torch.empty_like(q)
    t_scatter = _ms(lambda: output_scatter(out_kept, sel.q_source, layout, full))

    kv_tokens = layout.n_valid[sel.kv_index.clamp(min=0).long()] * (sel.kv_index >= 0)
    flops = 4 * q.shape[-1] * float((sel.q_count.double() * kv_tokens.sum(-1).double()).sum())
    row = dict(total=total, speedup=dense_ms / total, perm=t_perm, sel=t_sel, attn=t_attn, scatter=t_scatter,
               overhead=(t_perm + t_sel + t_scatter) / total, tflops=flops / t_attn / 1e9, rel=rel, cos=cos,
               kv=100 * float(sel.kept_kv_fraction()), q=100 * float(sel.kept_query_fraction(layout.n_valid)))
    if flex:
        run = _flex_setup(layout, sel.q_index, sel.kv_count, sel.kv_index, qc, kc, vc)
        run()
        row["flex"] = _ms(run)
    return row, (out, sel, layout, qc, kc, vc, scale)


def check_against_reference(state, heads=2):
    """Kernel pipeline vs the pure-torch reference on the same selection (first heads only)."""
    out, sel, layout, qc, kc, vc, scale = state
    from comfyui_bsa.bsa_core.selection import BSASelection
    part = BSASelection(*(t[:, :heads] for t in (sel.q_count, sel.q_index, sel.q_source, sel.kv_count, sel.kv_index)))
    ref = layout.to_raster(sparse_attention_reference(qc[:, :heads], kc[:, :heads], vc[:, :heads], layout, part, scale))
    return _errors(out[:, :heads], ref)[0]


def sol_rows(q, k, v, dense_out, dense_ms):
    from pareto_bsa import sol_rows as sol_points  # pareto_bsa imports this module: import here, not at the top

    for row in sol_points("", q, k, v, dense_out, dense_ms):
        print(f"  sol_attn {row['mode']}={row['value']:<6} {row['ms']:8.2f} ms  x{row['speedup']:5.1f}  "
              f"relL2 {row['rel_l2']:.3f}  cos {row['cos']:.4f}")


def video_inputs(shape: str):
    """(grid, heads, (q, k, v), dense output, dense ms) of a Wan shape: video-like bf16 Q/K/V on the GPU and
    cuDNN SDPA on them, the baseline every ratio is taken against."""
    grid, heads = SHAPES[shape]
    q, k, v = video_qkv(grid, heads, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_ms = _ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        dense_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return grid, heads, (q, k, v), dense_out, dense_ms


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="480p,720p")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for name in args.shapes.split(","):
        grid, heads, (q, k, v), dense_out, dense_ms = video_inputs(name)
        print(f"\n{name}: grid {grid}, {heads} heads, L={math.prod(grid)}, video-like bf16; cuDNN SDPA {dense_ms:.2f} ms")
        print("  cube  r    mode        p/lam  kvkept  total ms  speed-up  perm  select  attn  scatter  ovh%  "
              "TFLOP/s  flex ms  relL2  cos")
        for i, (cube, keep, mode, value) in enumerate(SETTINGS):
            config = _config(cube, keep, mode, value)
            row, state = bench_setting(q, k, v, grid, config, dense_out, dense_ms, flex=(cube == (4, 4, 4)))
            flex = f"{row['flex']:7.2f}" if "flex" in row else "      -"
            print(f"  {'x'.join(map(str, cube))} {keep:.2f} {mode:11s} {value:4.2f} {row['kv']:6.1f}% "
                  f"{row['total']:8.2f}  x{row['speedup']:6.2f} {row['perm']:5.2f} {row['sel']:6.2f} {row['attn']:5.2f} "
                  f"{row['scatter']:6.2f}  {100 * row['overhead']:4.1f}  {row['tflops']:7.0f}  {flex}  {row['rel']:.3f} "
                  f"{row['cos']:.4f}")
            if i == 0:
                print(f"  (pipeline vs reference on the same selection, 2 heads: rel L2 {check_against_reference(state):.2e})")
            del state
        sol_rows(q, k, v, dense_out, dense_ms)
        del q, k, v, dense_out
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
