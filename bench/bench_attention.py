"""Block-sparse attention kernel vs cuDNN SDPA (dense), FlexAttention (same block table) and
comfy-kitchen's sol_attn, on Wan sizes. A script, not a test:

    PYTHONPATH=.ck python bench/bench_attention.py [--shapes 480p,720p] [--tables random,local,video]

Tables (kept queries: bsa_core's real query selection at --keep-ratio, 0.5 by default; KV cubes per query cube):
  random  own cube + uniformly random cubes, per-head share spread over [4 %, 10 %] (worst case for
          packing several query cubes into one program: neighbours share almost nothing);
  local   own cube + the nearest cubes in 3D, same per-head shares (neighbours share most of it);
  pair    local lists, shared by each pair of consecutive cubes (selection made per 2-cube group: the
          2-cube union wastes nothing; the kernel's ceiling for G=2); quad: the same per 4 cubes (G=4);
  video   bsa_select on bench/video_qkv.py's video-like Q/K (480p only; threshold --video-threshold).
TFLOP/s of sparse providers count kept blocks only: 4 * D * sum(kept queries * selected cubes * 64).
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch
import triton

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from pack import load_pack  # noqa: E402

load_pack()

from comfyui_bsa.bsa_core.config import BSAConfig  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.bsa_core.reference import bsa_select, select_queries  # noqa: E402
from comfyui_bsa.bsa_core.selection import mask_to_index  # noqa: E402
from comfyui_bsa.kernels.block_sparse_attention import (  # noqa: E402
    block_sparse_attention, plan_block_sparse, scatter_kept)

SHAPES = {"480p": ((21, 30, 52), 12), "720p": ((21, 45, 80), 40)}
D = 128


def _ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _rel(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def _synthetic_table(layout, H, kind, gen):
    """kv_count [1,H,N], kv_index [1,H,N,K]: own cube + (random | nearest) cubes, share 4..10 % by head."""
    N = layout.num_cubes
    dev = layout.n_valid.device
    shares = torch.linspace(0.04, 0.10, H)[torch.randperm(H, generator=gen)]
    nt, nh, nw = layout.cubes_per_axis
    c = torch.arange(N, device=dev)
    xyz = torch.stack([c // (nh * nw), (c // nw) % nh, c % nw], -1).float()
    keep = torch.zeros(1, H, N, N, dtype=torch.bool, device=dev)
    for h in range(H):
        k = max(1, round(float(shares[h]) * N))
        if kind == "random":
            score = torch.rand(N, N, generator=gen).to(dev)
        else:  # nearest first, ties broken at random
            score = -torch.cdist(xyz, xyz) + 0.01 * torch.rand(N, N, generator=gen).to(dev)
        score.fill_diagonal_(float("inf"))
        keep[0, h].scatter_(-1, score.topk(k, -1).indices, True)
    return mask_to_index(keep)


def _flex_setup(layout, q_index, kv_count, kv_index, qc, kc, vc):
    """FlexAttention on the very same work: kept queries packed per cube (Q block = Kq rows), keys in cube
    order (KV block = one cube); full cubes as full blocks, partial cubes as mask_mod blocks."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    B, H, N, S, _ = qc.shape
    Kq = q_index.shape[-1]
    q_pack = qc.gather(-2, q_index.clamp(min=0).long()[..., None].expand(B, H, N, Kq, D)).reshape(B, H, N * Kq, D)
    k_flat, v_flat = kc.reshape(B, H, N * S, D), vc.reshape(B, H, N * S, D)
    full_cube = layout.n_valid == S
    valid = kv_index >= 0
    is_full = full_cube[kv_index.clamp(min=0).long()] & valid

    def compact(sel):
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)
        idx = kv_index.gather(-1, order).where(torch.arange(sel.shape[-1], device=sel.device) < sel.sum(-1, keepdim=True), 0)
        out = torch.zeros(B, H, N, N, dtype=torch.int32, device=sel.device)
        out[..., : idx.shape[-1]] = idx
        return sel.sum(-1).to(torch.int32), out

    full_n, full_i = compact(is_full)
    part_n, part_i = compact(valid & ~is_full)
    slot_ok = layout.slot_valid.reshape(-1)

    def mask_mod(b, h, q_idx, kv_idx):
        return slot_ok[kv_idx]

    block_mask = BlockMask.from_kv_blocks(part_n, part_i, full_n, full_i, BLOCK_SIZE=(Kq, S), mask_mod=mask_mod,
                                          seq_lengths=(N * Kq, N * S))
    flex = torch.compile(flex_attention, dynamic=False)
    # Flex's default tile (128 x 64) does not divide a 32-row query block: give it the block's own sizes
    options = {"BLOCK_M": Kq, "BLOCK_N": S}

    def run():
        return flex(q_pack, k_flat, v_flat, block_mask=block_mask, kernel_options=options)

    return run


def _sol_attn(qc, kc, vc):
    try:
        import comfy_kitchen as ck
        if not ck.sol_attn_is_available(qc.device):
            return None, "sol_attn not available on this device"
    except Exception as e:  # noqa: BLE001 - any import failure only drops the provider
        return None, f"comfy_kitchen import failed: {type(e).__name__}: {e}"
    B, H, N, S, _ = qc.shape
    q, k, v = (x.reshape(B, H, N * S, D).transpose(1, 2).contiguous() for x in (qc, kc, vc))
    return (lambda: ck.sol_attn(q, k, v, topk_ratio=0.10, tail=False)), "ok"


def _variant(text):
    """'G2-P2-head[-tma]' -> (cubes_per_program, kv_per_iter, schedule, use_tma)."""
    g, p, sched, *tma = text.split("-")
    return int(g[1:]), int(p[1:]), sched, bool(tma)


def bench_shape(name, tables, variants, video_threshold, gen, keep_ratio=0.5):
    grid, H = SHAPES[name]
    dev = "cuda"
    layout = cube_layout(grid, (4, 4, 4), dev)
    L, N, S = math.prod(grid), layout.num_cubes, layout.cube_volume
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    dense_flop = 4.0 * L * L * D * H
    rows = []

    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t_cudnn = _ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    rows.append((name, "-", "cudnn-sdpa dense", t_cudnn, dense_flop / t_cudnn / 1e9, "", ""))
    print(f"[{name}] L={L} H={H} cubes={N}  cuDNN SDPA dense {t_cudnn:.2f} ms "
          f"({dense_flop / t_cudnn / 1e9:.0f} TFLOP/s)", flush=True)

    qc, kc, vc = (layout.to_cubes(x).contiguous() for x in (q, k, v))
    sol, why = _sol_attn(qc, kc, vc)
    if sol is not None:
        t_sol = _ms(sol)
        rows.append((name, "own topk 10%", "comfy-kitchen sol_attn", t_sol, float("nan"), f"{t_cudnn / t_sol:.2f}x", "all queries"))
    else:
        print(f"[{name}] sol_attn skipped: {why}", flush=True)

    _, q_index, q_source = select_queries(qc, layout, keep_ratio)
    for table in tables:
        if table == "video":
            if name != "480p":
                continue
            sys.path.insert(0, str(REPO / "bench"))
            from video_qkv import video_qkv
            q, k, v = video_qkv(grid, H, D, device=dev, seed=1)
            qc, kc, vc = (layout.to_cubes(x).contiguous() for x in (q, k, v))
            sel = bsa_select(qc, kc, layout, BSAConfig(keep_ratio=keep_ratio, kv_threshold=video_threshold,
                                                       threshold_mode="cumulative", pooled_remainder=False), D ** -0.5)
            q_index, q_source, kv_count, kv_index = sel.q_index, sel.q_source, sel.kv_count, sel.kv_index
        elif table in ("pair", "quad"):  # KV chosen per 2 / 4 cubes (local lists): the union wastes nothing
            kv_count, kv_index = _synthetic_table(layout, H, "local", gen)
            step = 2 if table == "pair" else 4
            for r in range(1, step):
                kv_count[..., r::step], kv_index[..., r::step, :] = kv_count[..., 0::step], kv_index[..., 0::step, :]
        else:
            kv_count, kv_index = _synthetic_table(layout, H, table, gen)
        kept_q = (q_index >= 0).sum(-1).double()
        flop = 4.0 * D * S * float((kept_q * kv_count.double()).sum())
        share = float(kv_count.double().mean() / N)
        print(f"[{name}/{table}] KV kept {100 * share:.1f}% (per head {kv_count.double().mean(-1).div(N).mul(100).min():.1f}"
              f"..{kv_count.double().mean(-1).div(N).mul(100).max():.1f}%), kept queries "
              f"{float(kept_q.sum() / layout.n_valid.sum() / H):.2f}", flush=True)
        outs = {}
        for var in variants:
            g, p, sched, tma = _variant(var)
            make_plan = lambda g=g, sched=sched: plan_block_sparse(kv_count, kv_index, layout.slot_valid, g, sched)
            plan = make_plan()
            fn = lambda p=p, tma=tma, plan=plan: block_sparse_attention(
                qc, kc, vc, q_index, kv_count, kv_index, layout.slot_valid, kv_per_iter=p, use_tma=tma, plan=plan)
            outs[var] = fn()
            t = _ms(fn)
            t_plan = _ms(make_plan)
            rows.append((name, table, f"bsa-triton {var}", t, flop / t / 1e9, f"{t_cudnn / t:.2f}x",
                         f"+plan {t_plan:.3f} ms"))
            print(f"  bsa-triton {var}: {t:.3f} ms {flop / t / 1e9:.0f} TFLOP/s (plan {t_plan:.3f} ms)", flush=True)
        try:
            flex = _flex_setup(layout, q_index, kv_count, kv_index, qc, kc, vc)
            o_flex = flex().reshape(outs[variants[0]].shape)
            t = _ms(flex)
            live = (q_index >= 0)[..., None]
            err = max(_rel(outs[var] * live, o_flex * live) for var in variants)
            best = min(r[3] for r in rows if r[0] == name and r[1] == table)
            rows.append((name, table, "flex (same table)", t, flop / t / 1e9, f"{t_cudnn / t:.2f}x",
                         f"ours vs flex err {err:.1e}; best ours {t / best:.2f}x faster"))
            print(f"  flex: {t:.3f} ms {flop / t / 1e9:.0f} TFLOP/s; max rel err ours vs flex {err:.2e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  flex failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if table == "video":
            out = layout.to_raster(scatter_kept(outs[variants[0]], q_source, layout.slot_valid))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            err = _rel(out, ref)
            rows[-1] = rows[-1][:-1] + (rows[-1][-1] + f"; BSA vs dense {err:.3f}",)
            print(f"  BSA (r={keep_ratio}, p={video_threshold}) vs dense SDPA rel RMS {err:.3f}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="480p,720p")
    ap.add_argument("--tables", default="random,local,pair,quad,video")
    ap.add_argument("--variants", default="G1-P2-head,G2-P1-head-tma,G4-P1-head-tma",
                    help="G query cubes per program, P KV cubes per inner step, launch schedule head|lpt")
    ap.add_argument("--video-threshold", type=float, default=0.5)
    ap.add_argument("--keep-ratio", type=float, default=0.5, help="query keep ratio of every table")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    gen = torch.Generator().manual_seed(0)
    variants = args.variants.split(",")
    rows = []
    for name in args.shapes.split(","):
        rows += bench_shape(name, args.tables.split(","), variants, args.video_threshold, gen, args.keep_ratio)
        torch.cuda.empty_cache()
    print(f"\n{'shape':6} {'table':13} {'provider':26} {'ms':>9} {'TFLOP/s':>8} {'vs cuDNN':>9}  note")
    for shape, table, prov, t, tf, ratio, note in rows:
        print(f"{shape:6} {table:13} {prov:26} {t:9.3f} {tf:8.0f} {ratio:>9}  {note}")
    from comfyui_bsa.kernels.block_sparse_attention import _block_sparse_attn_fwd
    for key, cfg in getattr(_block_sparse_attn_fwd, "cache", {}).items():
        print(f"autotune {key[:5]} -> {cfg}")


if __name__ == "__main__":
    main()
