"""The KV selection past 2,048 cubes (where `kv_select`'s row kernel runs 8 or 16 warps) against the pure-torch
reference on the same pooled Q / K, and its time. A script, not a test:

    python bench/select_large_grids.py

Grids: (21, 68, 120) (3,060 cubes of 4x4x4, a 1080p-like latent) and (33, 90, 160) (8,280), two heads of random
pooled Q / K (head_dim 128). Per setting: the share of rows whose count and whole list equal the reference's (a
block on the threshold may move with the reductions' order), the mean list length and the ms of a `kv_select`.
"""
from __future__ import annotations

import pathlib
import sys

import torch
import triton

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (loads the pack as comfyui_bsa)

from comfyui_bsa.bsa_core import reference  # noqa: E402
from comfyui_bsa.bsa_core.config import BSAConfig  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.bsa_core.selection import mask_to_index  # noqa: E402
from comfyui_bsa.kernels.kv_select import kv_select  # noqa: E402

GRIDS = ((21, 68, 120), (33, 90, 160))
CONFIGS = (("stat 1", BSAConfig(threshold_mode="statistical", stat_lambda=1.0)),
           ("stat 2.5", BSAConfig(threshold_mode="statistical", stat_lambda=2.5)),
           ("cum 0.9", BSAConfig(threshold_mode="cumulative", kv_threshold=0.9)))


def main():
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    g = torch.Generator(device="cuda").manual_seed(0)
    scale = 128 ** -0.5
    for grid in GRIDS:
        layout = cube_layout(grid, (4, 4, 4), "cuda")
        q_bar, k_bar = (torch.randn(1, 2, layout.num_cubes, 128, device="cuda", generator=g) * 0.3 for _ in range(2))
        for name, config in CONFIGS:
            count, index = kv_select(q_bar, k_bar, layout, config, scale)
            ref_count, ref_index = mask_to_index(reference.select_kv(
                reference.block_logits(q_bar, k_bar, layout, scale), config))
            lists = (index[..., :ref_index.shape[-1]] == ref_index).all(-1)
            t = triton.testing.do_bench(lambda: kv_select(q_bar, k_bar, layout, config, scale), return_mode="median")
            same_count = float((count == ref_count).float().mean())
            print(f"grid {grid} ({layout.num_cubes} cubes) {name}: counts equal {same_count:.4f}, "
                  f"lists equal {float(lists.float().mean()):.4f}, "
                  f"max |count diff| {int((count - ref_count).abs().max())}, "
                  f"mean list {float(count.float().mean()):.1f}, {t:.3f} ms (2 heads)", flush=True)


if __name__ == "__main__":
    main()
