"""Writes docs/icon.png, the Comfy Registry icon (pyproject's [tool.comfy] Icon): the KV cubes each query
cube attends (amber) in one head of a BSA call at the node's defaults on video-like Q/K, as the BSA
Report's heat-map draws them.  python tools/make_icon.py"""
import pathlib
import sys

import torch
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools"), str(REPO / "bench")]
from pack import load_pack  # noqa: E402

load_pack()
from comfyui_bsa import RECOMMENDED, bsa_attention  # noqa: E402
from comfyui_bsa.bsa_core.report import heatmap_image  # noqa: E402
from video_qkv import video_qkv  # noqa: E402

ICON_PIXELS = 256


def main():
    grid = (8, 16, 16)  # 32 cubes of 4x4x4
    q, k, v = video_qkv(grid, heads=3, head_dim=64, dtype=torch.float32)
    _, selection = bsa_attention(q, k, v, grid, RECOMMENDED, backend="reference")
    image = heatmap_image(selection.to_dense()[0, 2])[0]
    pixels = (image * 255).round().to(torch.uint8).numpy()
    icon = Image.fromarray(pixels).resize((ICON_PIXELS, ICON_PIXELS), Image.NEAREST)
    path = REPO / "docs" / "icon.png"
    icon.save(path, optimize=True)
    print(f"wrote {path} ({ICON_PIXELS}x{ICON_PIXELS}, {selection.kv_count[0, 2].float().mean():.1f} of "
          f"{selection.num_cubes} KV cubes a query cube)")


if __name__ == "__main__":
    main()
