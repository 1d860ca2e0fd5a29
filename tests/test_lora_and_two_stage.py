"""The patch among the other model nodes of real workflows: a LoRA loaded before or after it, and
Wan 2.2's two-stage (high-noise model, then low-noise model) sampling with the node on both models."""
import logging
import sys

import pytest
import torch

from comfy_env import REPO, apply_bsa, require_comfyui, tiny_wan, tiny_wan_path  # noqa: F401  (fixtures)

require_comfyui()
sys.path.insert(0, str(REPO / "tools"))

import comfy.sd  # noqa: E402
import nodes  # noqa: E402
from comfy_extras.nodes_model_advanced import ModelSamplingSD3  # noqa: E402
from tiny_wan import tiny_wan_state_dict  # noqa: E402

from comfyui_bsa.bsa_core import BSAConfig  # noqa: E402
from comfyui_bsa.bsa_core.patch import find_options  # noqa: E402

SPARSE = BSAConfig(keep_ratio=0.5, kv_threshold=0.9, threshold_mode="cumulative", pooled_remainder=False)
DIM, RANK = 256, 4


def conditioning():
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(1, 16, 4096, generator=g), {}]], [[torch.randn(1, 16, 4096, generator=g), {}]]


def runs(caplog) -> list[dict]:
    return [r.bsa_run for r in caplog.records if hasattr(r, "bsa_run")]


def sample(model, steps=2):
    positive, negative = conditioning()
    latent = {"samples": torch.zeros(1, 16, 5, 16, 16)}
    return nodes.common_ksampler(model, 7, steps, 3.0, "euler", "simple", positive, negative, latent)[0]["samples"]


def random_lora() -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on every self-attention q and v of the tiny Wan, in ComfyUI's lora_up/lora_down naming."""
    g = torch.Generator().manual_seed(5)
    lora = {}
    for block in range(2):
        for proj in "qv":
            name = f"diffusion_model.blocks.{block}.self_attn.{proj}"
            lora[f"{name}.lora_up.weight"] = torch.randn(DIM, RANK, generator=g) / RANK
            lora[f"{name}.lora_down.weight"] = torch.randn(RANK, DIM, generator=g) / DIM ** 0.5
    return lora


def with_lora(model):
    patched, _ = comfy.sd.load_lora_for_models(model, None, random_lora(), 1.0, 0.0)
    return patched


def test_lora_before_or_after_the_patch(tiny_wan, caplog):
    caplog.set_level(logging.INFO)
    lora_first = apply_bsa(with_lora(tiny_wan), SPARSE)
    patch_first = with_lora(apply_bsa(tiny_wan, SPARSE))
    assert find_options(patch_first) is not None, "the LoRA clone keeps the patch"
    assert len(patch_first.patches) == len(lora_first.patches) == 4
    latents = [sample(model) for model in (lora_first, patch_first)]
    assert [run["sparse_calls"] for run in runs(caplog)] == [4, 4]
    torch.testing.assert_close(latents[0], latents[1])
    assert not torch.allclose(latents[0], sample(apply_bsa(tiny_wan, SPARSE)), atol=1e-3), "the LoRA is applied"


def two_stage(high, low, steps=4, switch=2):
    """KSamplerAdvanced twice, as in ComfyUI's Wan 2.2 14B template: high-noise steps, then low-noise."""
    positive, negative = conditioning()
    latent = {"samples": torch.zeros(1, 16, 5, 16, 16)}
    sampler = nodes.KSamplerAdvanced()
    latent = sampler.sample(high, "enable", 7, steps, 3.0, "euler", "simple", positive, negative, latent,
                            0, switch, "enable")[0]
    return sampler.sample(low, "disable", 7, steps, 3.0, "euler", "simple", positive, negative, latent,
                          switch, steps, "disable")[0]["samples"]


@pytest.mark.parametrize("shift", [1.0, 8.0])
def test_wan22_two_stage_sigma_window_is_one_schedule(tiny_wan, caplog, shift):
    """start_percent=0.4 on both models: sparse from the same sigma on, whichever model runs that step.
    Steps of a 4-step 'simple' schedule sit at t = 1, .75, .5, .25; percent 0.4 is t = 0.6 for any shift,
    so the two high-noise steps stay dense and the two low-noise steps go sparse."""
    caplog.set_level(logging.INFO)
    low_noise = comfy.sd.load_diffusion_model_state_dict(tiny_wan_state_dict(seed=1))
    high, low = (ModelSamplingSD3().patch(model, shift)[0] for model in (tiny_wan, low_noise))
    latent = two_stage(apply_bsa(high, SPARSE, start_percent=0.4), apply_bsa(low, SPARSE, start_percent=0.4))
    high_run, low_run = runs(caplog)
    assert high_run["sparse_calls"] == 0
    assert high_run["dense_reasons"]["sigma outside start_percent..end_percent"] == 4
    assert low_run["sparse_calls"] == 4 and "sigma outside start_percent..end_percent" not in low_run["dense_reasons"]
    assert torch.isfinite(latent).all()
