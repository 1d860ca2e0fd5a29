"""The attention kernel alone on the node's own tables (video-like Q/K/V, Wan shapes), against cuDNN SDPA
on the same inputs in the same run, and the whole BSA call beside it. A script, not a test:

    python bench/kernel_variants.py [--shapes 480p,720p] [--settings stat1,stat1.5,stat2.5,cum0.9]
                                    [--dtypes bf16,fp16] [--head-dims 128,64] [--portable G1P64]
                                    [--gluon-candidates path/to/candidate_hopper.py,...]

Rows: keep_ratio 1 (raster Q/O), pooled remainder on, 4x4x4 cubes; G1 = one query cube per program
(64-row tiles), G2 = two neighbouring cubes over the union of their lists (128-row tiles,
each row masked to its own cube's list); P = pooled keys per step; gluon = the Gluon Hopper kernel
(`kernels/block_sparse_attention_hopper.py`, the default where it runs: one cube per program, 64 pooled keys
per step; gluon-rk the same reading K/V from the raster, what the whole call does on it). head_dim 64 runs twice
the heads (LTX-Video's shape: same work).
--gluon-candidates times edited copies of the Gluon module (same launch function) as further rows on the same
tables in the same process, the way a kernel change is measured before it replaces the committed one; the
"max|d|" column is each row's largest difference from the table's first row.
TFLOP/s count useful work: each query row against its own cube's list plus the pooled keys; "exec" counts
what the kernel runs, whole 64 x 64 steps (each tile's list, for the Gluon kernel's packed tiles of partial cubes
their union, then ceil(N / 64) pooled blocks). The gluon row also
gives the build's registers, shared memory and programs per SM (cuOccupancyMaxActiveBlocksPerMultiprocessor).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import math
import pathlib
import re
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SHAPES, errors, kv_permuted, load_kernel_copy, ms, video_qkv  # noqa: E402  (also loads the pack as comfyui_bsa)

from comfyui_bsa.bsa_core.attention import bsa_attention  # noqa: E402
from comfyui_bsa.bsa_core.config import RECOMMENDED  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.bsa_core.gpu_select import select_triton  # noqa: E402
from comfyui_bsa.kernels import block_sparse_attention as kernel_module  # noqa: E402
from comfyui_bsa.kernels.block_sparse_attention import (  # noqa: E402
    block_sparse_attention_raster, hopper_path_reason, plan_block_sparse)
from comfyui_bsa.kernels.cube_permute import permute_qkv  # noqa: E402
from comfyui_bsa.kernels.packed_tiles import packed_tiles, packed_union  # noqa: E402

SETTINGS = {"stat1": ("statistical", 1.0), "stat1.5": ("statistical", 1.5), "stat2.5": ("statistical", 2.5),
            "cum0.9": ("cumulative", 0.9)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _config(name):
    mode, value = SETTINGS[name]
    extra = {"stat_lambda": value} if mode == "statistical" else {"kv_threshold": value}
    return dataclasses.replace(RECOMMENDED, threshold_mode=mode, **extra)


@contextlib.contextmanager
def gluon_module(module):
    """Route the kernel wrapper's Gluon launches to `module` (None: the committed one) for the block."""
    committed = kernel_module._import_hopper
    if module is not None:
        kernel_module._import_hopper = lambda: (module, None)
    try:
        yield
    finally:
        kernel_module._import_hopper = committed


def run(shape, dtype_name, head_dim, settings, portable, candidates=()):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    grid, heads = SHAPES[shape]
    heads = heads * 128 // head_dim
    q, k, v = video_qkv(grid, heads, head_dim=head_dim, device="cuda", dtype=DTYPES[dtype_name])
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_ms = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        dense_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    scale = 1.0 / math.sqrt(head_dim)
    layout = cube_layout(grid, (4, 4, 4), q.device)
    N, S = layout.num_cubes, layout.cube_volume
    L = q.shape[-2]
    print(f"\n{shape} {dtype_name} head_dim {head_dim}: grid {grid}, {heads} heads; cuDNN SDPA {dense_ms:.2f} ms "
          f"({4 * head_dim * L * L * heads / dense_ms / 1e9:.0f} TFLOP/s)")
    print(f"  {'setting':8s} {'kv%':>5s} {'tile':6s} {'kernel ms':>9s} {'TFLOP/s':>7s} {'x cuDNN':>7s}  "
          f"{'exec':>5s} {'call ms':>8s} {'x cuDNN':>7s} {'relL2':>6s} {'kernel relL2':>6s} {'max|d|':>7s}")
    _, q_bar, kc, k_bar, vc, k_pooled, v_pooled = permute_qkv(q, k, v, layout)
    for name in settings:
        config = _config(name)
        call = lambda: bsa_attention(q, k, v, grid, config, backend="triton")  # noqa: E731
        out, _ = call()
        call_ms = ms(call)
        with kv_permuted():
            permuted_call_ms = ms(call)
        rel, _ = errors(out, dense_out)
        sel, mask = select_triton(None, None, layout, config, scale, k_bar=k_bar, q_bar=q_bar, return_mask=True)
        kv_tokens = layout.n_valid[sel.kv_index.clamp(min=0).long()] * (sel.kv_index >= 0)
        useful = 4 * head_dim * (float(kv_tokens.sum().double()) * S + float(L) * heads * N)
        per_step = 4 * head_dim * S * S
        variants = [(f"G{group}P{pool}", group, pool, False, None) for group, pool in ((1, 64), (1, 128), (2, 64))]
        variants = [v for v in variants if v[0] in portable]
        if hopper_path_reason(q, head_dim, S, 1, False) is None:
            variants.append(("gluon", 1, 64, True, None))
            if kernel_module.raster_kv_reason(q, k, v, layout) is None:
                variants.append(("gluon-rk", 1, 64, True, None))
        for tile, module in candidates:
            with gluon_module(module):
                if hopper_path_reason(q, head_dim, S, 1, False) is None:
                    variants.append((tile, 1, 64, True, module))
        first = None
        for tile, group, pool, hopper, module in variants:
            plan = plan_block_sparse(sel.kv_count, sel.kv_index, group)
            result = torch.empty_like(q)
            with gluon_module(module):
                raster = tile.endswith("-rk")
                kernel_ms = ms(lambda: block_sparse_attention_raster(
                    q, None if raster else kc, None if raster else vc, layout, sel.kv_count, sel.kv_index, result, 0,
                    scale, plan=plan, remainder=(k_pooled, v_pooled, mask), pool_block=pool, hopper_kernel=hopper,
                    kv_raster=(k, v) if raster else None))
            executed = per_step * _steps(sel, mask, layout, heads, packed=hopper and hasattr(
                module or kernel_module._hopper_module()[0], "packed_tiles"))
            kernel_rel, _ = errors(result, dense_out)
            first = result if first is None else first
            diff = f"{(result.float() - first.float()).abs().max().item():7.1e}"
            print(f"  {name:8s} {100 * float(mask.float().mean()):5.1f} {tile:6s} {kernel_ms:9.3f} "
                  f"{useful / kernel_ms / 1e9:7.0f} {executed / kernel_ms / 1e9:5.0f} {dense_ms / kernel_ms:7.2f}  "
                  f"{call_ms:8.3f} {dense_ms / call_ms:7.2f} {rel:6.3f} {kernel_rel:6.3f} {diff:>7s} "
                  f"{_occupancy(module) if hopper and name == settings[0] else ''}", flush=True)
        print(f"  {name:8s} whole call with the K/V permute: {permuted_call_ms:.3f} ms, "
              f"x{dense_ms / permuted_call_ms:.2f} (the call above: {call_ms:.3f} ms, x{dense_ms / call_ms:.2f})",
              flush=True)


def _steps(sel, mask, layout, heads, packed) -> float:
    """64 x 64 steps a kernel runs: each tile's list (a packed tile's union) plus ceil(N / 64) pooled blocks."""
    N = layout.num_cubes
    pooled = -(-N // layout.cube_volume)
    if not packed:
        return float(sel.kv_count.sum().double()) + heads * N * pooled
    tiles = packed_tiles(layout)
    union, _ = packed_union(mask.to(torch.bool).contiguous().view(torch.uint8), tiles.members, N)
    n_tiles = tiles.singles.numel() + tiles.num_packed
    selected = sel.kv_count[..., tiles.singles.long()].sum().double() + union.sum().double()
    return float(selected) + heads * n_tiles * pooled


def _occupancy(module=None):
    """Registers, shared memory and resident programs per SM of the Gluon kernel's latest build."""
    fn = (module or kernel_module._hopper_module()[0])._hopper_block_sparse_fwd
    kernel = list(fn.device_caches[torch.cuda.current_device()][0].values())[-1]
    threads = int(re.search(r"\.reqntid (\d+)", kernel.asm["ptx"]).group(1))  # the loader warp's group included
    blocks = ctypes.c_int(0)
    error = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(blocks), ctypes.c_void_p(kernel.function), threads, ctypes.c_size_t(kernel.metadata.shared))
    return f"regs {kernel.n_regs} threads {threads} smem {kernel.metadata.shared} CTAs/SM {blocks.value} (rc {error})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="480p")
    parser.add_argument("--settings", default="stat1,stat1.5,stat2.5,cum0.9")
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--head-dims", default="128")
    parser.add_argument("--portable", default="G1P64,G1P128,G2P64", help="portable kernel rows")
    parser.add_argument("--gluon-candidates", default="", metavar="PATHS",
                        help="edited copies of kernels/block_sparse_attention_hopper.py timed as further rows")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    paths = [path for path in args.gluon_candidates.split(",") if path]
    candidates = [(pathlib.Path(path).stem, load_kernel_copy(path)) for path in paths]
    for shape in args.shapes.split(","):
        for dtype_name in args.dtypes.split(","):
            for head_dim in (int(d) for d in args.head_dims.split(",")):
                run(shape, dtype_name, head_dim, args.settings.split(","), args.portable.split(","), candidates)


if __name__ == "__main__":
    main()
