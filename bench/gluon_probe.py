"""Gluon (Triton 3.6) probe: block-sparse flash-attention forward on Hopper.

Why: Triton 3.6 cannot warp-specialise on sm90, so our Triton kernel stalls at
~400 TFLOP/s on kept 64x64 blocks. Gluon exposes wgmma / TMA / mbarrier
directly; this probe checks how far an explicit Hopper pipeline gets.

Kernel: non-causal FA forward, bf16 in, fp32 accumulate, HEAD_DIM=128,
BLOCK_N=64 keys per step, BLOCK_M in {64 (4 warps), 128 (8 warps = 2 WGs)}.
Each program = one query tile of one (b, h); it walks a LIST of KV blocks
(kv_count[tile], kv_index[tile, :]) through a NUM_STAGES TMA ring.
Variants (constexpr ASYNC_QK):
  basic : S = QK^T (sync wgmma) -> softmax -> O += PV (sync wgmma)
  async : FA3-style intra-warpgroup overlap: QK^T of block j+1 and PV of
          block j are in flight while softmax of block j+1 runs.
Assumption: L is a multiple of 128 (and of BLOCK_M); q/k/v contiguous [B,H,L,D].

  python bench/gluon_probe.py --compile-only   # sm90 cubin, no GPU needed
  python bench/gluon_probe.py                  # H200: correctness + timing
"""

import argparse
import math
import os
import subprocess
import tempfile

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

HEAD_DIM = 128
BLOCK_N = 64
LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- kernel
@gluon.jit
def _issue_kv_load(ring, tbl, step, NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
    """TMA K and V of list entry `step` into ring slot step % NUM_STAGES (no-op past the end)."""
    k_desc, v_desc, k_smem, v_smem, bars, _ = ring
    kv_index_ptr, tbl_base, kv_row0, n_blocks = tbl
    pred = step < n_blocks
    slot = step % NUM_STAGES
    blk = gl.load(kv_index_ptr + tbl_base + step, mask=pred, other=0)
    row = kv_row0 + blk * BLOCK_N
    bar = bars.index(slot)
    mbarrier.expect(bar, 2 * k_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [row, 0], bar, k_smem.index(slot), pred=pred)
    tma.async_copy_global_to_shared(v_desc, [row, 0], bar, v_smem.index(slot), pred=pred)


@gluon.jit
def _online_softmax(s, m_i, l_i, qk_scale):
    """One online-softmax step in the log2 domain; returns (p fp32, alpha, m_new, l_new)."""
    s = s * qk_scale
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - gl.expand_dims(m_new, 1))
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _release_slot(ring, tbl, step, NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr, WS: gl.constexpr):
    """Ring slot of list step `step` is consumed. WS: tell the loader warp. Else refill it ourselves."""
    gl.thread_barrier()  # all compute warps are past their wgmma reads of that slot
    if WS:
        mbarrier.arrive(ring[5].index(step % NUM_STAGES), pred=step >= 0)
    else:
        _issue_kv_load(ring, tbl, step + NUM_STAGES, NUM_STAGES, BLOCK_N)


@gluon.jit
def _attn_compute(
    ring,
    tbl,
    q_smem,
    q_bar,
    o_desc,
    q_row,
    qk_scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    ASYNC_QK: gl.constexpr,
    WS: gl.constexpr,
):
    """Consumer: QK^T, online softmax, PV over the KV list, then the O epilogue (TMA store)."""
    NUM_WARPS: gl.constexpr = gl.num_warps()
    k_smem, v_smem, ready_bars = ring[2], ring[3], ring[4]
    n_blocks = tbl[3]
    gl.static_assert(BLOCK_M == 16 * NUM_WARPS, "one 16-row wgmma slice per warp (M=64 per warpgroup)")
    # wgmma accumulator layouts: warps stacked along M, so S and O rows live in the
    # same threads -> row statistics and P (as register A operand) need no shuffles.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    srow: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow: gl.constexpr = gl.SliceLayout(1, o_layout)

    mbarrier.wait(q_bar, 0)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, srow)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, srow)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    if ASYNC_QK:
        # FA3-style: QK^T(j+1) and PV(j) are in flight while softmax(j+1) runs.
        if n_blocks > 0:
            mbarrier.wait(ready_bars.index(0), 0)
            s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
            p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            for j in range(n_blocks - 1):
                _release_slot(ring, tbl, j - 1, NUM_STAGES, BLOCK_N, WS)
                cur = j % NUM_STAGES
                nxt = (j + 1) % NUM_STAGES
                mbarrier.wait(ready_bars.index(nxt), ((j + 1) // NUM_STAGES) & 1)
                s_tok = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                o_tok = warpgroup_mma(p_op, v_smem.index(cur), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=[s_tok])  # QK^T(j+1) done, PV(j) may still run
                p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
                acc, p_op = warpgroup_mma_wait(0, deps=[o_tok, p_op])
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow), 1)
                p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            acc = warpgroup_mma(p_op, v_smem.index((n_blocks - 1) % NUM_STAGES), acc)
    else:
        for j in range(n_blocks):
            _release_slot(ring, tbl, j - 1, NUM_STAGES, BLOCK_N, WS)
            slot = j % NUM_STAGES
            mbarrier.wait(ready_bars.index(slot), (j // NUM_STAGES) & 1)
            s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow), 1)
            p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            acc = warpgroup_mma(p_op, v_smem.index(slot), acc)

    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, orow), 1)
    q_smem.store(out.to(o_desc.dtype))  # reuse the Q buffer for the epilogue
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
    tma.store_wait(0)


@gluon.jit
def _attn_loader(ring, tbl, q_desc, q_smem, q_bar, q_row, NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
    """1-warp TMA producer (WS only): Q once, then K/V of every list step into the ring."""
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    empty_bars = ring[5]
    for j in range(tbl[3]):
        # Fresh mbarriers count as "phase 1 complete", so the first lap does not block.
        mbarrier.wait(empty_bars.index(j % NUM_STAGES), ((j // NUM_STAGES) & 1) ^ 1)
        _issue_kv_load(ring, tbl, j, NUM_STAGES, BLOCK_N)


@gluon.jit
def _sparse_attn_fwd(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    kv_count_ptr,
    kv_index_ptr,
    seq_len,
    max_blocks,
    qk_scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    ASYNC_QK: gl.constexpr,
    WS: gl.constexpr,
):
    """Grid (L // BLOCK_M, B*H). WS=False: single partition, software-pipelined TMA ring.
    WS=True: extra 1-warp loader partition (gl.warp_specialize) feeding the ring."""
    tile = gl.program_id(0)
    bh = gl.program_id(1)
    tile_id = bh * (seq_len // BLOCK_M) + tile
    kv_row0 = bh * seq_len
    q_row = kv_row0 + tile * BLOCK_M
    n_blocks = gl.load(kv_count_ptr + tile_id)
    tbl_base = tile_id.to(gl.int64) * max_blocks

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=1)

    ring = (k_desc, v_desc, k_smem, v_smem, ready_bars, empty_bars)
    tbl = (kv_index_ptr, tbl_base, kv_row0, n_blocks)
    if WS:
        gl.warp_specialize(
            [
                (
                    _attn_compute,
                    (
                        ring,
                        tbl,
                        q_smem,
                        q_bar,
                        o_desc,
                        q_row,
                        qk_scale,
                        HEAD_DIM,
                        BLOCK_M,
                        BLOCK_N,
                        NUM_STAGES,
                        ASYNC_QK,
                        WS,
                    ),
                ),
                (_attn_loader, (ring, tbl, q_desc, q_smem, q_bar, q_row, NUM_STAGES, BLOCK_N)),
            ],
            [1],
            [40],
        )
    else:
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
        for i in gl.static_range(NUM_STAGES - 1):  # prologue: fill all but one slot
            _issue_kv_load(ring, tbl, i, NUM_STAGES, BLOCK_N)
        _attn_compute(
            ring, tbl, q_smem, q_bar, o_desc, q_row, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, ASYNC_QK, WS
        )


# --------------------------------------------------------------------------- host
def _v(block_m, async_qk, ws, stages=3):
    """Launch config. WS adds a 4-warp slot (1 loader warp); maxnreg keeps 1 CTA/SM
    (m128: 12 warps * 168 regs) or 2 CTAs/SM (m64: 8 warps * 128) within 64K regs."""
    nw = block_m // 16
    maxnreg = (168 if block_m == 128 else 128) if ws else None
    return {
        "block_m": block_m,
        "num_warps": nw,
        "num_stages": stages,
        "async_qk": async_qk,
        "ws": ws,
        "maxnreg": maxnreg,
    }


VARIANTS = {
    "m64_basic": _v(64, False, False),
    "m128_basic": _v(128, False, False),
    "m64_async": _v(64, True, False),
    "m128_async": _v(128, True, False),
    "m64_ws": _v(64, False, True),
    "m128_ws": _v(128, False, True),
    "m64_ws_async": _v(64, True, True),
    "m128_ws_async": _v(128, True, True),
}


def _layouts(block_m):
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m, HEAD_DIM], gl.bfloat16)
    kv_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], gl.bfloat16)
    return q_layout, kv_layout


def _constexprs(cfg):
    return {
        "HEAD_DIM": HEAD_DIM,
        "BLOCK_M": cfg["block_m"],
        "BLOCK_N": BLOCK_N,
        "NUM_STAGES": cfg["num_stages"],
        "ASYNC_QK": cfg["async_qk"],
        "WS": cfg["ws"],
    }


def _options(cfg):
    opts = {"num_warps": cfg["num_warps"]}
    if cfg["maxnreg"]:
        opts["maxnreg"] = cfg["maxnreg"]
    return opts


def sparse_attention(
    q, k, v, kv_count, kv_index, block_m=128, num_warps=None, num_stages=3, async_qk=False, ws=False, maxnreg=None
):
    """O = block-sparse attention. q,k,v: [B,H,L,128] bf16 contiguous, L % 128 == 0.
    kv_count: int32 [B*H*(L//block_m)], kv_index: int32 [same, max_blocks] (64-key block ids
    within the same (b, h); each row's first kv_count entries are used)."""
    B, H, L, D = q.shape
    assert D == HEAD_DIM and L % 128 == 0 and L % block_m == 0
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    cfg = {
        "block_m": block_m,
        "num_warps": num_warps or block_m // 16,
        "num_stages": num_stages,
        "async_qk": async_qk,
        "ws": ws,
        "maxnreg": maxnreg,
    }
    o = torch.empty_like(q)
    q2, k2, v2, o2 = (t.reshape(B * H * L, D) for t in (q, k, v, o))
    q_layout, kv_layout = _layouts(block_m)
    q_desc = TensorDescriptor.from_tensor(q2, [block_m, D], q_layout)
    o_desc = TensorDescriptor.from_tensor(o2, [block_m, D], q_layout)
    k_desc = TensorDescriptor.from_tensor(k2, [BLOCK_N, D], kv_layout)
    v_desc = TensorDescriptor.from_tensor(v2, [BLOCK_N, D], kv_layout)
    n_tiles = L // block_m
    assert kv_count.numel() == B * H * n_tiles and kv_index.shape[0] == B * H * n_tiles
    qk_scale = LOG2E / math.sqrt(D)  # softmax scale folded into the exp2 domain
    _sparse_attn_fwd[(n_tiles, B * H)](
        q_desc,
        k_desc,
        v_desc,
        o_desc,
        kv_count,
        kv_index,
        L,
        kv_index.shape[1],
        qk_scale,
        **_constexprs(cfg),
        **_options(cfg),
    )
    return o


def compile_only(names):
    """Build variants to sm90 cubins via GluonASTSource + triton.compile (no GPU)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    target = GPUTarget("cuda", 90, 32)
    _ensure_executable_tools()
    ok = 0
    for name in names:
        cfg = VARIANTS[name]
        block_m = cfg["block_m"]
        q_layout, kv_layout = _layouts(block_m)
        consts = _constexprs(cfg)
        sig = {
            "q_desc": f"tensordesc<bf16[{block_m}, {HEAD_DIM}],{q_layout!r}>",
            "k_desc": f"tensordesc<bf16[{BLOCK_N}, {HEAD_DIM}],{kv_layout!r}>",
            "v_desc": f"tensordesc<bf16[{BLOCK_N}, {HEAD_DIM}],{kv_layout!r}>",
            "o_desc": f"tensordesc<bf16[{block_m}, {HEAD_DIM}],{q_layout!r}>",
            "kv_count_ptr": "*i32",
            "kv_index_ptr": "*i32",
            "seq_len": "i32",
            "max_blocks": "i32",
            "qk_scale": "fp32",
            **{k: "constexpr" for k in consts},
        }
        src = GluonASTSource(_sparse_attn_fwd, sig, consts)
        try:
            kern = triton.compile(src, target=target, options=_options(cfg))
        except Exception as e:  # noqa: BLE001  keep going: report every variant
            msg = [l for l in str(e).strip().splitlines() if l.strip()]
            print(f"{name:14s} FAILED: {type(e).__name__}: {' | '.join(msg[-8:])}")
            continue
        ok += 1
        print(
            f"{name:14s} compiled  warps={cfg['num_warps']}{'+4(ws)' if cfg['ws'] else ''} "
            f"stages={cfg['num_stages']} smem={kern.metadata.shared} B  {_res_usage(kern.asm['cubin'])}"
        )
    return ok


def _ensure_executable_tools():
    """An unpacked wheel may ship ptxas/cuobjdump without +x: use executable temp copies."""
    import shutil
    import stat

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    tmp = None
    for tool in ("ptxas", "cuobjdump"):
        path, env = os.path.join(bindir, tool), f"TRITON_{tool.upper()}_PATH"
        if os.path.exists(path) and not os.access(path, os.X_OK) and env not in os.environ:
            if tmp is None:
                import atexit

                tmp = tempfile.mkdtemp(prefix="gluon_probe_bin_")
                atexit.register(shutil.rmtree, tmp, True)
            dst = shutil.copy(path, os.path.join(tmp, tool))
            os.chmod(dst, os.stat(dst).st_mode | stat.S_IXUSR)
            os.environ[env] = dst


def _res_usage(cubin):
    """Registers / spills from cuobjdump -res-usage (ptxas figures), if available."""
    exe = os.environ.get(
        "TRITON_CUOBJDUMP_PATH", os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    )
    if not os.access(exe, os.X_OK):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([exe, "-res-usage", f.name], capture_output=True, text=True, check=False).stdout
    line = [l.strip() for l in out.splitlines() if "REG:" in l]
    return line[0] if line else ""


# --------------------------------------------------------------------------- bench
def _tables(B, H, L, block_m, keep, device, seed=0):
    """kv_count / kv_index for each query tile; keep=None -> every KV block."""
    n_tiles, n_kv = L // block_m, L // BLOCK_N
    rows = B * H * n_tiles
    if keep is None:
        idx = torch.arange(n_kv, dtype=torch.int32, device=device).expand(rows, n_kv).contiguous()
        return torch.full((rows,), n_kv, dtype=torch.int32, device=device), idx
    n_keep = max(1, round(keep * n_kv))
    g = torch.Generator(device="cpu").manual_seed(seed)
    score = torch.rand(rows, n_kv, generator=g)
    first = (torch.arange(rows) % n_tiles) * (block_m // BLOCK_N)
    for d in range(block_m // BLOCK_N):  # KV blocks under the query tile are always kept
        score[torch.arange(rows), first + d] = 2.0
    idx = score.topk(n_keep, dim=1).indices.sort(dim=1).values.to(torch.int32)
    return torch.full((rows,), n_keep, dtype=torch.int32).to(device), idx.contiguous().to(device)


def _ref_tile(q, k, v, idx_row, b, h, tile, block_m):
    """fp32 torch reference for one query tile over the listed KV blocks."""
    cols = (idx_row.long()[:, None] * BLOCK_N + torch.arange(BLOCK_N, device=q.device)).flatten()
    qs = q[b, h, tile * block_m : (tile + 1) * block_m].float()
    s = qs @ k[b, h, cols].float().T / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ v[b, h, cols].float()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench(args, names):
    """Correctness vs cuDNN SDPA (full list) and a torch reference (sparse list), then timings."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    B, H, L, D = args.B, args.H, args.L, HEAD_DIM
    dev = "cuda"
    print(f"device: {torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    print(f"shape B={B} H={H} L={L} D={D}  keep={args.keep:.3f}")
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = sdpa(q, k, v)
        ms = triton.testing.do_bench(lambda: sdpa(q, k, v))
    dense_flops = 4 * D * B * H * L * L
    print(f"{'cudnn dense':24s} {ms:8.3f} ms  {dense_flops / ms * 1e-9:7.1f} TFLOP/s")
    for name in names:
        kw = dict(VARIANTS[name])
        block_m = kw["block_m"]
        try:
            cnt, idx = _tables(B, H, L, block_m, None, dev)
            out = sparse_attention(q, k, v, cnt, idx, **kw)
            err = _rel(out, ref)
            ms = triton.testing.do_bench(lambda cnt=cnt, idx=idx, kw=kw: sparse_attention(q, k, v, cnt, idx, **kw))
            print(f"{name + ' full':24s} {ms:8.3f} ms  {dense_flops / ms * 1e-9:7.1f} TFLOP/s  relL2={err:.2e}")
            cnt, idx = _tables(B, H, L, block_m, args.keep, dev)
            out = sparse_attention(q, k, v, cnt, idx, **kw)
            errs = [
                _rel(out[0, 0, t * block_m : (t + 1) * block_m], _ref_tile(q, k, v, idx[t], 0, 0, t, block_m))
                for t in range(2)
            ]
            ms = triton.testing.do_bench(lambda cnt=cnt, idx=idx, kw=kw: sparse_attention(q, k, v, cnt, idx, **kw))
            flops = 4 * D * block_m * BLOCK_N * cnt.sum().item()
            print(
                f"{name + ' sparse':24s} {ms:8.3f} ms  {flops / ms * 1e-9:7.1f} TFLOP/s  "
                f"relL2(2 tiles)={max(errs):.2e}  kept={cnt[0].item()}/{L // BLOCK_N}"
            )
        except Exception as e:  # noqa: BLE001  report and go on
            print(f"{name:24s} FAILED: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile-only", action="store_true", help="build sm90 cubins, no GPU needed")
    ap.add_argument("--variants", default="", help=f"comma list from {list(VARIANTS)}")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--L", type=int, default=32768)
    ap.add_argument("--stages", type=int, default=0, help="override NUM_STAGES of the K/V ring")
    ap.add_argument("--keep", type=float, default=0.14)
    args = ap.parse_args()
    print(f"triton {triton.__version__} from {os.path.dirname(triton.__file__)}")
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    if args.stages:
        for n in names:
            VARIANTS[n] = dict(VARIANTS[n], num_stages=args.stages)
    if args.compile_only:
        raise SystemExit(0 if compile_only(names) > 0 else 1)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --compile-only here, the benchmark needs an H100/H200")
    bench(args, names)


if __name__ == "__main__":
    main()
