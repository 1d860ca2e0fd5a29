"""No host synchronisation in a sparse call: ComfyUI's attention with the node's override on video shapes of
Wan (video only), HunyuanVideo (text after the video, a text padding mask) and LTX-Video (guide frames
after the video), run under torch.cuda.set_sync_debug_mode("error"), which raises on any device-to-host
read or synchronising copy. Marked gpu: skipped without CUDA.

    python3 -m pytest -q -s -m gpu tests/test_gpu_sync.py

The first call of each shape compiles and tunes the kernels and works out the mask's plan (host reads
allowed there, once per shape or mask); the checked call is a second model call with the same layout and
the same mask tensor, as every block and step of a sampling run makes it.
"""
import math

import pytest
import torch
from test_fuzz_attention import comfy_attention  # noqa: F401  (fixture: ComfyUI's attention module)

from comfyui_bsa.bsa_core.adapters import TokenLayout
from comfyui_bsa.bsa_core.config import RECOMMENDED
from comfyui_bsa.bsa_core.patch import OVERRIDE_KEY, BlockRanges, BSAOptions, BSARun, make_override

pytestmark = pytest.mark.gpu

# family -> (grid, heads, head_dim, tokens after the video, hidden text tokens (mask) or None, layout)
SHAPES = {
    "wan-480p": ((21, 30, 52), 12, 128, 0, None),
    "hunyuan-text": ((9, 30, 40), 24, 128, 256, 100),
    "ltxv-guides": ((8, 16, 24), 32, 64, 16 * 24, None),
}


def text_mask(n_tokens: int, n_hidden: int, device) -> torch.Tensor:
    """HunyuanVideo's additive key mask: 0 = attend, -inf on the padded text tokens at the end. [1, 1, 1, L]."""
    mask = torch.zeros(1, 1, 1, n_tokens, device=device, dtype=torch.bfloat16)
    mask[..., n_tokens - n_hidden:] = float("-inf")
    return mask


@pytest.mark.parametrize("family", list(SHAPES))
def test_sparse_call_has_no_host_sync(family, comfy_attention):  # noqa: F811
    grid, heads, head_dim, n_suffix, n_hidden = SHAPES[family]
    tokens = math.prod(grid) + n_suffix
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads * head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    mask = text_mask(tokens, n_hidden, "cuda") if n_hidden else None
    run = BSARun(BSAOptions(RECOMMENDED, 0.0, 1.0, BlockRanges(), 0))
    options = {OVERRIDE_KEY: make_override(run, None)}
    layout = TokenLayout(family, grid, 0, n_suffix)

    def model_call():
        run.begin_forward(layout)
        return comfy_attention.optimized_attention(q, k, v, heads, mask=mask, transformer_options=options)

    model_call()  # compile, tune, the mask's plan
    torch.cuda.synchronize()
    sparse_before = run.stats.sparse_calls
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model_call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert run.stats.sparse_calls == sparse_before + 1, run.stats.as_dict()
    assert not run.stats.dense_reasons, run.stats.as_dict()
    assert out.shape == q.shape and torch.isfinite(out).all()
