"""What every bench script shares: the pack loaded as `comfyui_bsa`, the Wan shapes, the timers (GPU median,
back-to-back host / wall, host profile), the error measures, the video-like inputs with their cuDNN baseline,
and edited copies of a kernel module beside it."""
from __future__ import annotations

import contextlib
import cProfile
import importlib.util
import pathlib
import sys
import time

import torch
import triton

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
from pack import load_pack  # noqa: E402

load_pack()

from video_qkv import video_qkv  # noqa: E402  (bench/ is on sys.path: scripts run from there)

SHAPES = {"480p": ((21, 30, 52), 12), "720p": ((21, 45, 80), 40)}  # Wan 81 frames: latent grid, heads


def shape_of(name: str):
    """(grid, heads) of a SHAPES name, or of 'T,H,W/heads' (a token grid of any size, e.g. 9,30,52/12: Wan 480p at
    33 frames)."""
    if name in SHAPES:
        return SHAPES[name]
    try:
        grid, heads = name.split("/")
        T, H, W = (int(n) for n in grid.split(","))
        return (T, H, W), int(heads)
    except ValueError:
        raise SystemExit(f"shape {name!r}: one of {', '.join(SHAPES)} or T,H,W/heads") from None


def load_kernel_copy(path: str):
    """An edited copy of one of the pack's kernel modules, imported beside the committed one (A/B in one process)."""
    spec = importlib.util.spec_from_file_location(f"comfyui_bsa.kernels.{pathlib.Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def kv_permuted(enabled: bool = True):
    """BSA calls in the block permute K/V to cube order, as before the Gluon kernel read them from the raster (the
    A/B of that change)."""
    from comfyui_bsa.kernels import block_sparse_attention as kernel_module

    reason = kernel_module.raster_kv_reason
    if enabled:
        kernel_module.raster_kv_reason = lambda *args: "the benchmark's permuted run"
    try:
        yield
    finally:
        kernel_module.raster_kv_reason = reason


def ms(fn) -> float:
    """Median milliseconds of fn on the GPU (triton.testing.do_bench: L2 flushed between runs)."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def back_to_back_ms(call, calls: int, warmup: int = 0) -> tuple[float, float]:
    """(host ms, wall ms) a call, `calls` back to back after `warmup` untimed ones: host until the last call
    returned (its launch side), wall until the GPU finished."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host_ms = (time.perf_counter() - t0) * 1e3 / calls
    torch.cuda.synchronize()
    return host_ms, (time.perf_counter() - t0) * 1e3 / calls


def host_profile(call, calls: int) -> cProfile.Profile:
    """cProfile of `calls` calls' host side (the GPU finishes after the profile stops)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    torch.cuda.synchronize()
    return profiler


def errors(out, ref) -> tuple[float, float]:
    """(relative L2, cosine) of out against ref over the whole tensor."""
    a, b = out.float().flatten(), ref.float().flatten()
    return float((a - b).norm() / b.norm()), float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def video_inputs(shape: str):
    """(grid, heads, (q, k, v), dense output, dense ms) of a shape (`shape_of`): video-like bf16 Q/K/V on the GPU and
    cuDNN SDPA on them, the baseline every ratio is taken against."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    grid, heads = shape_of(shape)
    q, k, v = video_qkv(grid, heads, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_ms = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        dense_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return grid, heads, (q, k, v), dense_out, dense_ms


def flex_on_table(layout, q_index, kv_count, kv_index, qc, kc, vc):
    """FlexAttention on the very same work: kept queries packed per cube (Q block = Kq rows), keys in cube
    order (KV block = one cube); full cubes as full blocks, partial cubes as mask_mod blocks."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    B, H, N, S, _ = qc.shape
    Kq = q_index.shape[-1]
    D = qc.shape[-1]
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
