"""BSA in diffusers' own WanTransformer3DModel (a small one built from a config, CPU, reference backend),
against the same model with diffusers' WanAttnProcessor."""
from __future__ import annotations

import diffusers.models.transformers.transformer_wan as diffusers_wan
import pytest
import torch

from comfyui_bsa import RECOMMENDED, BSAConfig
from comfyui_bsa.integrations.diffusers_wan import BSAWanAttnProcessor, latent_token_grid

LAYERS = 2
DENSE = BSAConfig(keep_ratio=1.0, kv_threshold=1.0, threshold_mode="cumulative")


@pytest.fixture(scope="module")
def wan(one_torch_thread):
    """A 2-layer, 2-head Wan T2V with random weights; the inputs of one denoising call: latent
    [1, 4, 8, 16, 16] -> token grid 8 x 8 x 8 (8 cubes of 4 x 4 x 4)."""
    torch.manual_seed(0)
    model = diffusers_wan.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=LAYERS, rope_max_seq_len=64).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 16, 16), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 6, 32))
    with torch.no_grad():
        dense = model(**inputs).sample
    return model, inputs, dense


def run_with(model, inputs, config):
    processor = BSAWanAttnProcessor(model, config, backend="reference")
    model.set_attn_processor(processor)
    try:
        with torch.no_grad():
            return model(**inputs).sample, processor
    finally:
        processor.remove()
        model.set_attn_processor(diffusers_wan.WanAttnProcessor())


def test_everything_kept_equals_diffusers_dense_attention(wan):
    model, inputs, dense = wan
    out, processor = run_with(model, inputs, DENSE)
    assert processor.grid == (8, 8, 8)
    stats = processor.stats.as_dict()
    assert stats["sparse_calls"] == LAYERS and stats["dense_calls"] == 0  # cross-attention is not counted
    assert stats["kept_kv_pct"] == 100.0
    assert torch.allclose(out, dense, atol=1e-5, rtol=1e-4), float((out - dense).abs().max())


def test_defaults_are_sparse_and_change_the_output(wan):
    model, inputs, dense = wan
    out, processor = run_with(model, inputs, RECOMMENDED)
    stats = processor.stats.as_dict()
    assert stats["sparse_calls"] == LAYERS and stats["kept_kv_pct"] < 100.0, stats
    assert (out - dense).norm() / dense.norm() > 1e-3


def test_keyword_or_positional_latent_and_odd_sizes_give_the_patched_grid(wan):
    model, inputs, _ = wan
    processor = BSAWanAttnProcessor(model, DENSE)
    try:
        with torch.no_grad():
            model(inputs["hidden_states"][..., :6, :10, :14], inputs["timestep"], inputs["encoder_hidden_states"])
    finally:
        processor.remove()
    assert processor.grid == (6, 5, 7) == latent_token_grid((1, 4, 6, 10, 14), (1, 2, 2))


def test_bad_arguments_name_the_input(wan):
    model, _, _ = wan
    with pytest.raises(ValueError, match="transformer"):
        BSAWanAttnProcessor(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="config"):
        BSAWanAttnProcessor(model, {"keep_ratio": 1.0})
    with pytest.raises(ValueError, match="backend"):
        BSAWanAttnProcessor(model, backend="cuda")
