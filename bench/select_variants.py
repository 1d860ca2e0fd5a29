"""The KV selection alone (`kernels/kv_select.py`) on the bench's video-like pooled Q/K, against edited copies of
the module on the same inputs in the same process, the way a selection change is measured before it replaces the
committed one. A script, not a test:

    python bench/select_variants.py [--shapes 480p,720p] [COPY.py ...]

Per shape and setting (statistical 1 and 2.5, cumulative 0.9): ms of a whole `kv_select` (logits + cut, the mask
the pooled remainder reads included), the first call's seconds (compile + tune; Triton's cache makes later
processes fast), and whether each copy's count / lists / mask equal the committed module's.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SHAPES, load_kernel_copy, ms, video_qkv  # noqa: E402  (also loads the pack as comfyui_bsa)

from comfyui_bsa.bsa_core.config import RECOMMENDED  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.kernels import kv_select as committed  # noqa: E402
from comfyui_bsa.kernels.cube_permute import permute_qkv  # noqa: E402

SETTINGS = (("statistical", 1.0), ("statistical", 2.5), ("cumulative", 0.9))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="480p,720p")
    parser.add_argument("copies", nargs="*", help="edited copies of kernels/kv_select.py")
    args = parser.parse_args()
    modules = {"committed": committed, **{pathlib.Path(p).stem: load_kernel_copy(p) for p in args.copies}}
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for shape in args.shapes.split(","):
        grid, heads = SHAPES[shape]
        q, k, v = video_qkv(grid, heads, device="cuda", dtype=torch.bfloat16)
        layout = cube_layout(grid, (4, 4, 4), q.device)
        _, q_bar, _, k_bar, *_ = permute_qkv(q, k, v, layout)
        scale = 1 / math.sqrt(q.shape[-1])
        print(f"\n{shape}: {layout.num_cubes} cubes, {heads} heads")
        for mode, value in SETTINGS:
            extra = {"stat_lambda": value} if mode == "statistical" else {"kv_threshold": value}
            config = dataclasses.replace(RECOMMENDED, threshold_mode=mode, **extra)
            reference = None
            for name, module in modules.items():
                def select():
                    return module.kv_select(q_bar, k_bar, layout, config, scale, return_mask=True)
                start = time.perf_counter()
                result = select()
                torch.cuda.synchronize()
                first = time.perf_counter() - start
                reference = result if reference is None else reference
                same = all(torch.equal(a, b) for a, b in zip(result, reference))
                print(f"  {mode} {value}: {name:16s} {ms(select):7.3f} ms  first call {first:5.2f} s  "
                      f"same as committed: {same}", flush=True)


if __name__ == "__main__":
    main()
