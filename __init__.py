"""ComfyUI-BSA: Bidirectional Sparse Attention for video diffusion models in ComfyUI.

ComfyUI imports this folder as a package; the nodes (and with them ComfyUI's API) are imported only
when ComfyUI asks for the extension, so bsa_core and kernels stay importable without ComfyUI.
"""

WEB_DIRECTORY = "./web"  # the frontend migration of workflows saved with the old widget order


async def comfy_entrypoint():
    from .nodes import BSAExtension

    return BSAExtension()
