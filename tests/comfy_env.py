"""Real ComfyUI for tests: CPU mode, COMFYUI_PATH or <repo>/.comfyui/ComfyUI; skips when absent."""
from __future__ import annotations

import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COMFYUI_PATH = pathlib.Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui" / "ComfyUI").resolve()


def require_comfyui():
    """Import ComfyUI in CPU mode (once) or skip the calling test module."""
    if not (COMFYUI_PATH / "comfy").is_dir():
        pytest.skip(f"ComfyUI not found at {COMFYUI_PATH}: run tools/setup.sh or set COMFYUI_PATH",
                    allow_module_level=True)
    if str(COMFYUI_PATH) not in sys.path:
        sys.path.insert(0, str(COMFYUI_PATH))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu on import)
    return COMFYUI_PATH


@pytest.fixture(scope="session")
def tiny_wan_path(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tools"))
    from tiny_wan import write_tiny_wan
    return write_tiny_wan(tmp_path_factory.mktemp("models") / "tiny_wan2.1_t2v.safetensors")


@pytest.fixture(scope="session")
def tiny_wan(tiny_wan_path):
    """The tiny Wan 2.1 T2V loaded by ComfyUI's own loader (a ModelPatcher)."""
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(tiny_wan_path))
