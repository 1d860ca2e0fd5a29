"""Build the Gluon Hopper attention kernel for sm90 on a machine without a GPU and print what decides its speed
before any device time is spent: registers and spills, shared memory and whether two programs fit an SM, the
widths of its global loads and stores, ptxas's performance warnings (a serialised wgmma pipeline), and the
instructions in each MMA loop's body (a step's issue slots, where the body has no branch). Needs Triton 3.6 (the
release the kernel is built for), e.g.

    pip download triton==3.6.0 --no-deps --only-binary=:all: --python-version 3.11 \\
        --platform manylinux_2_27_x86_64 -d /tmp/t36
    python3 -m zipfile -e /tmp/t36/triton-3.6.0-*.whl /tmp/t36/site
    chmod +x /tmp/t36/site/triton/backends/nvidia/bin/*
    PYTHONPATH=/tmp/t36/site python3 tools/gluon_build_check.py [MODULE.py] [--head-dim 128] [--dtype bf16]
                                  [--max-registers N] [--stages N] [--kv-raster] [--ptx OUT.ptx] [--sass OUT.sass]

MODULE.py defaults to kernels/block_sparse_attention_hopper.py; an edited copy builds the same way (its relative
imports resolve in kernels/; then time it with `bench/kernel_variants.py --gluon-candidates`). Integer arguments
are built as the launcher specialises them on the GPU: pointers and strides divisible by 16.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import pathlib
import re
import subprocess
import sys
import tempfile
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sass_loops import innermost_loops  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SM90_SHARED_PER_SM = 228 * 1024  # bytes; each resident program also takes 1 KB the driver reserves
CONSTEXPRS = ("HEAD_DIM", "CUBE", "CT", "CH", "CW", "NUM_STAGES", "MEMBERS", "Q_IN_REGISTERS", "TILE_LAYOUT",
              "KV_RASTER", "HAS_REMAINDER")
_PACKAGE = "_bsa_build_check"  # the module's relative imports (`.packed_tiles`) resolve in kernels/


def load_module(path: pathlib.Path):
    if _PACKAGE not in sys.modules:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(REPO / "kernels")]
        sys.modules[_PACKAGE] = package
    spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def signature(fn, module, head_dim: int, dtype: str, kv_raster: bool = False) -> dict:
    """Triton signature strings of the kernel's arguments, by name (the launch in hopper_block_sparse_attention;
    kv_raster: K/V read from the raster through 5-D boxes)."""
    gl = module.gl
    element = gl.bfloat16 if dtype == "bf16" else gl.float16
    rows = repr(gl.NVMMASharedLayout.get_default_for([module.CUBE, head_dim], element))
    box = [1, 4, 4, 4, head_dim]
    kv = (f"tensordesc<{dtype}[{', '.join(map(str, box))}],"
          f"{gl.NVMMASharedLayout.get_default_for(box, element)!r}>" if kv_raster else
          f"tensordesc<{dtype}[{module.CUBE}, {head_dim}],{rows}>")
    per_head = repr(gl.NVMMASharedLayout.get_default_for([1, module.CUBE, head_dim], element))
    types = {"Q": f"*{dtype}", "Out": f"*{dtype}", "Lse": "*fp32", "log2n_ptr": "*fp32", "key_bias_ptr": "*fp32",
             "attended_ptr": "*u8", "order_ptr": "*i32", "tiles_ptr": "*i32", "members_ptr": "*i32",
             "row_token_ptr": "*i32", "row_slot_ptr": "*i32", "row_member_ptr": "*i32", "count_ptr": "*i32",
             "index_ptr": "*i32", "ucount_ptr": "*i32", "uindex_ptr": "*i32", "qk_scale": "fp32",
             "k_desc": kv, "v_desc": kv,
             "kbar_desc": f"tensordesc<{dtype}[1, {module.CUBE}, {head_dim}],{per_head}>",
             "vbar_desc": f"tensordesc<{dtype}[1, {module.CUBE}, {head_dim}],{per_head}>",
             "bias_desc": f"tensordesc<fp32[1, {module.CUBE}],{gl.NVMMASharedLayout(0, 32)!r}>"}
    sig = {}
    for name in fn.arg_names:
        if name in CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name in ("H", "N", "BH", "n_singles", "n_packed", "KG", "KU", "n_pool_steps", "n_prefix", "GT", "GH",
                      "GW", "NH", "NW", "raster_grid", "raster_rows") or name.startswith("stride_"):
            sig[name] = "i32"
        else:
            raise SystemExit(f"gluon_build_check: no type for the kernel's argument {name!r}; add it to signature()")
    return sig


def build(module, head_dim: int, dtype: str, max_registers: int | None = None, stages: int | None = None,
          kv_raster: bool = False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = module._hopper_block_sparse_fwd
    sig = signature(fn, module, head_dim, dtype, kv_raster)
    # the module's build for this head_dim (older copies: one ring depth and register cap for every head_dim, or
    # no Q-in-registers flag)
    own_stages, own_registers, *q_in_registers = getattr(module, "_BUILD_BY_HEAD_DIM", {}).get(
        head_dim, (getattr(module, "_STAGES", 3), getattr(module, "_MAX_REGISTERS", 128)))
    values = {"HEAD_DIM": head_dim, "CUBE": module.CUBE, "CT": 4, "CH": 4, "CW": 4,
              "NUM_STAGES": stages or own_stages, "MEMBERS": getattr(module, "MAX_MEMBERS", 4),
              "Q_IN_REGISTERS": bool(q_in_registers and q_in_registers[0]),
              "TILE_LAYOUT": module.gl.NVMMASharedLayout.get_default_for(
                  [module.CUBE, head_dim], module.gl.bfloat16 if dtype == "bf16" else module.gl.float16),
              "KV_RASTER": kv_raster, "HAS_REMAINDER": True}
    constants = {(fn.arg_names.index(name),): values[name] for name in CONSTEXPRS if name in fn.arg_names}
    aligned = [i for i, name in enumerate(fn.arg_names) if sig[name].startswith("*") or name.startswith("stride_")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(GluonASTSource(fn, sig, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": getattr(module, "_NUM_WARPS", 4),  # older copies: the literals
                                   "maxnreg": max_registers or own_registers})


def mma_loops(sass: str) -> list[tuple[int, int, collections.Counter]]:
    """(first, last address, opcode counts) of every innermost loop of the SASS that issues tensor-core MMAs (HGMMA,
    QGMMA for FP8): the static body, so both sides of a branch inside it count (a packed tile's loop holds the
    selected and the pooled steps' masking)."""
    code = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", sass)]
    found = []
    for first, last in innermost_loops(code):
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                                  for address, text in code if first <= address <= last)
        if ops["HGMMA"] or ops["QGMMA"]:  # 16-bit or FP8 (e4m3 / e5m2) tensor-core MMAs
            found.append((first, last, ops))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("module", nargs="?", default=str(REPO / "kernels" / "block_sparse_attention_hopper.py"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--max-registers", type=int, help="register cap a thread (what-if; default the module's)")
    parser.add_argument("--stages", type=int, help="K/V ring depth (what-if; default the module's)")
    parser.add_argument("--kv-raster", action="store_true", help="the build that reads K/V from the raster")
    parser.add_argument("--ptx", help="write the PTX here")
    parser.add_argument("--sass", help="write the SASS here")
    args = parser.parse_args()
    module = load_module(pathlib.Path(args.module))
    kernel = build(module, args.head_dim, args.dtype, args.max_registers, args.stages, args.kv_raster)
    import triton

    tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        ptx_file = pathlib.Path(tmp) / "kernel.ptx"
        ptx_file.write_text(kernel.asm["ptx"])
        # what ptxas says it had to give up, e.g. C7514: every wgmma serialised (an MMA in flight across a loop's
        # back edge) -- the build still succeeds, only slower
        report = subprocess.run([str(tools / "ptxas"), "-v", "--gpu-name", "sm_90a", str(ptx_file), "-o",
                                 str(pathlib.Path(tmp) / "again.cubin")], capture_output=True, text=True,
                                check=True).stderr
    if args.sass:
        pathlib.Path(args.sass).write_text(sass)
    if args.ptx:
        pathlib.Path(args.ptx).write_text(kernel.asm["ptx"])
    ptx = kernel.asm["ptx"]
    threads = int(re.search(r"\.reqntid (\d+)", ptx).group(1))
    registers = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)  # ptxas puts register spills in the stack frame
    spills = len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\s", sass))
    shared = kernel.metadata.shared
    per_program = -(-(shared + 1024) // 128) * 128
    print(f"{pathlib.Path(args.module).name}, sm90, {args.dtype}, head_dim {args.head_dim}, "
          f"Triton {triton.__version__}")
    print(f"  threads {threads}, registers {registers} a thread, stack frame {stack} B, "
          f"{spills} spill loads / stores (STL / LDL in the SASS)")
    print(f"  shared memory {shared} B: {SM90_SHARED_PER_SM // per_program} programs per SM by shared memory "
          f"({per_program} B each with the driver's 1 KB), {65536 // (threads * int(registers))} by registers")
    losses = re.findall(r"Potential Performance Loss: (.*)", report)
    print("  ptxas performance warnings: " + ("; ".join(losses) if losses else "none"))
    accesses = collections.Counter(re.findall(r"\b((?:ld|st)\.global[.\w]*)", ptx))
    print("  global accesses in the PTX: " + ", ".join(f"{n} x {op}" for op, n in sorted(accesses.items())))
    for first, last, ops in mma_loops(sass):
        print(f"  MMA loop {first:#x}-{last:#x}: {sum(ops.values())} instructions in its body: "
              + ", ".join(f"{n} {op}" for op, n in ops.most_common(10)))


if __name__ == "__main__":
    main()
