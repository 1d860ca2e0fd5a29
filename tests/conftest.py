"""Loads the pack as the package `comfyui_bsa` (ComfyUI imports the folder as a package too)."""
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


sys.path.insert(0, str(REPO / "tools"))
from pack import load_pack  # noqa: E402

load_pack()


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
