"""Every video family ComfyUI loads, as a tiny random-weight model sampled through the patch on CPU:
detected as the real model, self-attention only goes sparse, extra tokens stay exact, and at
keep_ratio = kv_threshold = 1 the result equals ComfyUI's dense attention."""
import logging
import sys
import types

import pytest
import torch

from comfy_env import REPO, apply_bsa, require_comfyui

require_comfyui()
sys.path.insert(0, str(REPO / "tools"))

import comfy.model_detection  # noqa: E402
import nodes  # noqa: E402
from tiny_models import tiny_model, tiny_state_dict  # noqa: E402

from comfyui_bsa.bsa_core import BSAConfig  # noqa: E402
from comfyui_bsa.bsa_core.adapters import UNKNOWN_FAMILY, token_layout  # noqa: E402
from comfyui_bsa.bsa_core.attention import bsa_attention_key_masked, bsa_attention_op, key_mask_plan  # noqa: E402

SPARSE = BSAConfig(keep_ratio=0.5, kv_threshold=0.9, threshold_mode="cumulative", pooled_remainder=False)
ALL_KEPT = BSAConfig(keep_ratio=1.0, kv_threshold=1.0, threshold_mode="cumulative", pooled_remainder=False)
STEPS = 2


def _text(g, n, width):
    return torch.randn(1, n, width, generator=g)


def _wan_i2v_cond(g):
    clip = types.SimpleNamespace(penultimate_hidden_states=torch.randn(1, 257, 1280, generator=g))
    return {"clip_vision_output": clip, "concat_latent_image": torch.randn(1, 16, 5, 16, 16, generator=g)}


TEXT_MASK = torch.ones(1, 16, dtype=torch.long)  # integer: LTXV and Mochi turn it into their own masks

# family -> (latent shape, text (tokens, width), extra cond, self-attention calls per forward,
#            dense calls per forward (cross-attention, text refiner), detected model class or None)
CASES = {
    "wan22_ti2v_5b": ((1, 48, 5, 16, 16), (16, 4096), lambda g: {}, 2, 2, "WAN22_T2V"),
    "wan21_i2v": ((1, 16, 5, 16, 16), (16, 4096), _wan_i2v_cond, 2, 4, "WAN21_I2V"),
    "hunyuan_video": ((1, 16, 5, 16, 16), (16, 4096),
                      lambda g: {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 6.0}, 2, 2,
                      "HunyuanVideo"),
    "ltxv": ((1, 128, 4, 8, 8), (16, 4096), lambda g: {"attention_mask": TEXT_MASK}, 2, 2, "LTXV"),
    "cosmos_predict2": ((1, 16, 5, 16, 16), (16, 1024), lambda g: {}, 2, 2, None),
    "mochi": ((1, 12, 5, 16, 16), (16, 4096), lambda g: {"attention_mask": TEXT_MASK}, 1, 0, None),
}


def conditioning(family, seed):
    latent_shape, (n_text, width), extra, *_ = CASES[family]
    g = torch.Generator().manual_seed(seed)
    return [[_text(g, n_text, width), extra(g)]], latent_shape


def sample(model, family, steps=STEPS, cfg=3.0):
    positive, latent_shape = conditioning(family, 1)
    negative, _ = conditioning(family, 2)
    latent = {"samples": torch.zeros(latent_shape)}
    return nodes.common_ksampler(model, 7, steps, cfg, "euler", "simple", positive, negative, latent)[0]["samples"]


def last_run(caplog) -> dict:
    return [r.bsa_run for r in caplog.records if hasattr(r, "bsa_run")][-1]


@pytest.fixture(scope="module", params=list(CASES))
def family(request):
    """(name, tiny ModelPatcher, its dense latent)."""
    model = tiny_model(request.param)
    return request.param, model, sample(model, request.param)


def test_tiny_model_is_detected_as_the_real_family(family):
    name, model, _ = family
    expected = CASES[name][-1]
    if expected is None:
        pytest.skip(f"{name}: ComfyUI's detection hard-codes the full-size config; built from the config")
    config = comfy.model_detection.model_config_from_unet(tiny_state_dict(name), "")
    assert type(config).__name__ == expected == type(model.model.model_config).__name__


def test_samples_sparse_on_self_attention_only(family, caplog):
    name, model, dense_latent = family
    caplog.set_level(logging.INFO)
    latent = sample(apply_bsa(model, SPARSE), name)
    run = last_run(caplog)
    _, _, _, self_attention, other, _ = CASES[name]
    assert run["sparse_calls"] == STEPS * self_attention, run
    assert run["dense_calls"] == STEPS * other, run
    assert set(run["dense_reasons"]) <= {"cross-attention", "shorter than the video (e.g. text refiner)"}, run
    if name == "hunyuan_video":  # joint attention: its dense calls are the text refiner's, never cross-attention
        assert run["dense_reasons"] == {"shorter than the video (e.g. text refiner)": STEPS * other}, run
    assert 0 < run["kept_kv_pct"] <= 100 and run["kept_query_pct"] < 100
    assert torch.isfinite(latent).all() and not torch.allclose(latent, dense_latent, atol=1e-3)


def test_all_kept_equals_dense(family, caplog):
    name, model, dense_latent = family
    caplog.set_level(logging.INFO)
    latent = sample(apply_bsa(model, ALL_KEPT), name)
    assert last_run(caplog)["sparse_calls"] == STEPS * CASES[name][3]
    torch.testing.assert_close(latent, dense_latent, atol=2e-4, rtol=2e-4)


# ---- extra tokens and their layouts ---------------------------------------------------------------

def test_hunyuan_text_padding_mask_is_honoured_exactly(caplog):
    """A text mask that hides padded text keys (cfg 1: one batch) stays sparse and exact at 1/1."""
    model = tiny_model("hunyuan_video")
    positive, latent_shape = conditioning("hunyuan_video", 1)
    positive[0][1]["attention_mask"] = torch.tensor([[1] * 10 + [0] * 6])
    latent = {"samples": torch.zeros(latent_shape)}

    def run(m):
        return nodes.common_ksampler(m, 7, STEPS, 1.0, "euler", "simple", positive, positive, latent)[0]["samples"]

    caplog.set_level(logging.INFO)
    dense = run(model)
    kept_all = run(apply_bsa(model, ALL_KEPT))
    stats = last_run(caplog)
    assert stats["sparse_calls"] == STEPS * 2, stats
    torch.testing.assert_close(kept_all, dense, atol=2e-4, rtol=2e-4)


def test_key_masked_attention_equals_masked_dense_on_extra_tokens():
    """Sparse settings: the text rows (padded or not) equal masked dense attention exactly."""
    g = torch.Generator().manual_seed(0)
    grid, n_text = (2, 4, 8), 12
    q, k, v = (torch.randn(2, 2, 64 + n_text, 16, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 64 + n_text)
    mask[0, ..., -3:] = -torch.finfo(torch.float32).max
    mask[1, ..., -5:] = float("-inf")
    plan, reason = key_mask_plan(mask, 2, 64 + n_text, 0, n_text)
    assert reason is None
    out, _, _ = bsa_attention_key_masked(q, k, v, grid, SPARSE, plan, n_suffix=n_text)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out[..., 64:, :], dense[..., 64:, :], atol=1e-5, rtol=1e-5)
    all_kept, _, _ = bsa_attention_key_masked(q, k, v, grid, ALL_KEPT, plan, n_suffix=n_text)
    torch.testing.assert_close(all_kept, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask,reason", [
    (torch.zeros(76, 76), "is not a key mask"),
    (torch.full((1, 1, 76), -1.0), "soft"),
    (torch.cat([torch.full((1, 1, 1), float("-inf")), torch.zeros(1, 1, 75)], -1), "hides video tokens"),
], ids=["query-key", "soft", "video"])
def test_masks_that_cannot_be_honoured_give_a_reason(mask, reason):
    plan, why = key_mask_plan(mask, 2, 76, 0, 12)
    assert plan is None and reason in why


def test_cfg_batch_selects_per_element():
    """cond and uncond batched together get the selection each would get alone."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 4 * 8 * 8, 16, generator=g) for _ in range(3))
    batched, _, _ = bsa_attention_op(q, k, v, (4, 8, 8), SPARSE)
    alone = torch.cat([bsa_attention_op(q[i:i + 1], k[i:i + 1], v[i:i + 1], (4, 8, 8), SPARSE)[0] for i in range(2)])
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=1e-6)


def _layout(family, x_shape, **kwargs):
    model = tiny_model(family).model.diffusion_model
    return token_layout(model, x_shape, kwargs)


def test_layouts_of_extra_tokens():
    ltxv = _layout("ltxv", (1, 128, 5, 8, 8), keyframe_idxs=torch.zeros(1, 3, 64))
    assert (ltxv.grid, ltxv.n_prefix, ltxv.n_suffix) == ((4, 8, 8), 0, 64)
    assert "guide tokens" in _layout("ltxv", (1, 128, 5, 8, 8), keyframe_idxs=torch.zeros(1, 3, 10)).reason
    hunyuan = _layout("hunyuan_video", (1, 16, 5, 15, 16), ref_latent=torch.zeros(1, 16, 1, 16, 16))
    assert (hunyuan.grid, hunyuan.n_prefix, hunyuan.extra_tokens(320 + 64 + 20)) == ((5, 8, 8), 64, (64, 20))
    wan = _layout("wan22_ti2v_5b", (1, 48, 3, 16, 16), time_dim_concat=torch.zeros(1, 48, 2, 16, 16))
    assert wan.grid == (5, 8, 8) and wan.n_prefix == 0
    assert _layout("cosmos_predict2", (1, 16, 5, 16, 16)).grid == (5, 8, 8)
    mochi = _layout("mochi", (1, 12, 5, 16, 16))
    assert mochi.grid == (5, 8, 8) and mochi.extra_tokens(320 + 7) == (0, 7)
    assert token_layout(torch.nn.Linear(1, 1), (1, 4, 2, 8, 8)).reason == UNKNOWN_FAMILY


def stand_in(class_name, **attributes):
    """An object whose class has the name of a ComfyUI model class (adapters match on class names)."""
    return type(class_name, (), attributes)()


def test_layouts_from_class_names_and_attributes():
    wan_with_ref = stand_in("WanModel", patch_size=(1, 2, 2), ref_conv=object())
    layout = token_layout(wan_with_ref, (1, 16, 3, 16, 16), {"reference_latent": torch.zeros(1, 16, 16, 16)})
    assert (layout.grid, layout.n_prefix, layout.n_suffix) == ((3, 8, 8), 64, 0)
    other_video_model = stand_in("NewVideoModel", patch_size=(1, 2, 2))
    assert token_layout(other_video_model, (1, 16, 3, 15, 16)).grid == (3, 8, 8)
    assert "not a video latent" in token_layout(other_video_model, (1, 16, 16, 16)).reason
    flux_like = stand_in("Flux", patch_size=2)
    assert token_layout(flux_like, (1, 16, 3, 16, 16)).reason == UNKNOWN_FAMILY


def test_ltxv_guide_frames_are_exact_suffix_tokens(caplog):
    """An LTXVAddGuide-style guide: one latent frame appended to the video, its tokens listed in
    keyframe_idxs. BSA takes the video (4 frames) and keeps the guide's 64 tokens exact."""
    model = tiny_model("ltxv")
    g = torch.Generator().manual_seed(4)
    cond = {"attention_mask": TEXT_MASK, "keyframe_idxs": torch.zeros(1, 3, 64)}
    positive = [[_text(g, 16, 4096), cond]]
    latent = {"samples": torch.zeros(1, 128, 5, 8, 8)}

    def run(m):
        return nodes.common_ksampler(m, 7, STEPS, 1.0, "euler", "simple", positive, positive, latent)[0]["samples"]

    caplog.set_level(logging.INFO)
    dense = run(model)
    sparse = run(apply_bsa(model, SPARSE))
    assert last_run(caplog)["sparse_calls"] == STEPS * 2
    all_kept = run(apply_bsa(model, ALL_KEPT))
    torch.testing.assert_close(all_kept, dense, atol=2e-4, rtol=2e-4)
    assert not torch.allclose(sparse, dense, atol=1e-3)
