"""torch.compile sees BSA as the one custom op bsa::attention (fake kernel gives the shapes), so the
data-dependent selection is never traced and a compiled model matches eager."""
import pytest
import torch

from comfyui_bsa.bsa_core import BSAConfig
from comfyui_bsa.bsa_core.attention import bsa_attention, bsa_attention_op

SPARSE = BSAConfig(keep_ratio=0.5, kv_threshold=0.5)  # 4 cubes of random tokens: keeps 2-3
GRID = (4, 8, 8)


def attention_block(q, k, v, n_suffix=0):
    """Ops around the custom op, as in a transformer block: compiled together with it."""
    out, kept_queries, kept_kv = bsa_attention_op(q * 1.5, k, v, GRID, SPARSE, n_suffix=n_suffix)
    return torch.nn.functional.gelu(out) + 1, kept_queries, kept_kv


def qkv(device="cpu", dtype=torch.float32, n_suffix=0):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, 256 + n_suffix, 64, generator=g).to(device, dtype) for _ in range(3)]


def test_op_matches_bsa_attention():
    q, k, v = qkv(n_suffix=8)
    out, kept_queries, kept_kv = bsa_attention_op(q, k, v, GRID, SPARSE, n_suffix=8)
    expected, selection = bsa_attention(q, k, v, GRID, SPARSE, n_suffix=8)
    torch.testing.assert_close(out, expected)
    assert float(kept_queries) == pytest.approx(0.5) and 0 < float(kept_kv) < 1


def test_op_passes_torch_library_checks():
    q, k, v = qkv()
    torch.library.opcheck(torch.ops.bsa.attention.default,
                          (q, k, v, list(GRID), [4, 4, 4], 0.5, 0.9, "cumulative", 1.0, 1, 0, 0, 0.125, "auto"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_without_graph_break_matches_eager(backend):
    torch._dynamo.reset()
    q, k, v = qkv(n_suffix=8)
    compiled = torch.compile(attention_block, backend=backend, fullgraph=True)
    for got, expected in zip(compiled(q, k, v, 8), attention_block(q, k, v, 8)):
        torch.testing.assert_close(got, expected)


@pytest.mark.gpu
def test_inductor_on_cuda_matches_eager():
    torch._dynamo.reset()
    q, k, v = qkv("cuda", torch.bfloat16)
    compiled = torch.compile(attention_block, backend="inductor", fullgraph=True)
    for got, expected in zip(compiled(q, k, v), attention_block(q, k, v)):
        torch.testing.assert_close(got, expected)
