"""Loads the pack as the package `comfyui_bsa` (ComfyUI imports the folder as a package too)."""
import importlib.util
import os
import pathlib
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter without CUDA. Set before any test module imports ComfyUI,
    # which imports triton: a kernel test collected later would set it too late.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_pack():
    if "comfyui_bsa" not in sys.modules:
        spec = importlib.util.spec_from_file_location("comfyui_bsa", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_bsa"] = module
        spec.loader.exec_module(module)
    return sys.modules["comfyui_bsa"]


_load_pack()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: one intra-op thread is faster, and two threads crawl when another
    process holds a core. Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
