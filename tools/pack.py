"""Imports this repository as the package `comfyui_bsa`, the way ComfyUI imports a custom-node folder
(as a package, so the pack's relative imports work); tests and bench scripts share it."""
import importlib.util
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_pack(name: str = "comfyui_bsa"):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
