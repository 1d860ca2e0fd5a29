"""ComfyUI-BSA: Bidirectional Sparse Attention for video diffusion models in ComfyUI.

ComfyUI imports this folder as a package; the nodes (and with them ComfyUI's API) are imported only
when ComfyUI asks for the extension, so bsa_core and kernels stay importable without ComfyUI.

Outside ComfyUI (`pip install .` installs this folder as the package `comfyui_bsa`):

    out, selection = comfyui_bsa.bsa_attention(q, k, v, grid, comfyui_bsa.RECOMMENDED)

q, k, v are [B, H, L, D] with L = T*H*W video tokens in raster order, `grid` = (T, H, W); `out` is
[B, H, L, D] and `selection` (a BSASelection) says which queries and KV cubes were kept. For diffusers'
Wan, see comfyui_bsa.integrations.diffusers_wan.
"""
from .bsa_core.attention import bsa_attention
from .bsa_core.config import RECOMMENDED, BSAConfig
from .bsa_core.selection import BSASelection

__all__ = ["bsa_attention", "BSAConfig", "BSASelection", "RECOMMENDED", "comfy_entrypoint"]

WEB_DIRECTORY = "./web"  # frontend: old widget order migration, only the active mode's sparsity slider shown


async def comfy_entrypoint():
    from .nodes import BSAExtension

    return BSAExtension()
