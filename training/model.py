"""The model trained here, ComfyUI's own Wan 2.1 T2V at a small size, and its flow-matching objective.

The architecture is what ComfyUI's model detection reads from the state dict (comfy.model_detection), built
as comfy.ldm.wan.model.WanModel, so its state dict carries ComfyUI's Wan key names and the exported file
loads with comfy.sd.load_diffusion_model as WAN21_T2V. Step 0 holds the seeded weights of tools/tiny_wan.py
(the random model the tests sample). Needs ComfyUI importable (comfy.* imported inside functions).

Flow matching as Wan and ComfyUI's ModelSamplingDiscreteFlow define it: x_t = (1 - sigma) x0 + sigma noise,
the model gets timestep = 1000 sigma and predicts the velocity noise - x0; sampling shifts sigma by
`shift` (ModelSamplingSD3's time_snr_shift).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

import torch
from safetensors.torch import save_file

from .data import LATENT_CHANNELS

TIMESTEP_SCALE = 1000.0  # ModelSamplingDiscreteFlow's multiplier: timestep = 1000 sigma
_TINY_WAN = pathlib.Path(__file__).resolve().parents[1] / "tools" / "tiny_wan.py"


def _tiny_wan():
    """tools/tiny_wan.py (not part of the package): the Wan 2.1 key names and the seeded weight rule."""
    spec = importlib.util.spec_from_file_location("_bsa_tiny_wan", _TINY_WAN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def initial_state_dict(dim: int, layers: int, ffn_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Float32 weights of a fresh model: tiny_wan's N(0, 1/fan_in) rule with `seed`."""
    tiny_wan = _tiny_wan()
    return tiny_wan.random_weights(tiny_wan.wan21_t2v_shapes(dim, layers, ffn_dim), seed, dtype=torch.float32)


def wan_from_state_dict(state_dict: dict[str, torch.Tensor], dtype=torch.float32, device=None) -> torch.nn.Module:
    """ComfyUI's WanModel with the architecture ComfyUI detects in `state_dict`, holding those weights
    (float32 on the CPU unless told otherwise). A key ComfyUI's Wan lacks or misses fails here (strict load)."""
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    unet_config = comfy.model_detection.detect_unet_config(state_dict, "")
    if unet_config is None or unet_config.get("image_model") != "wan2.1":
        raise ValueError("state dict is not a Wan 2.1 diffusion model")
    unet_config = {k: v for k, v in unet_config.items() if k != "image_model"}
    model = WanModel(**unet_config, operations=comfy.ops.disable_weight_init, dtype=dtype, device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True)
    return model


def shifted_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """ComfyUI's time_snr_shift: sigma = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def velocity(model, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, transformer_options=None):
    """The model's prediction of noise - x0 at noise level sigma [B]."""
    return model(x, sigma * TIMESTEP_SCALE, context, transformer_options=transformer_options or {})


def flow_matching_loss(model, x0, context, noise, sigma, transformer_options=None, teacher=None,
                       teacher_weight: float = 0.0, parts: dict | None = None) -> torch.Tensor:
    """Mean squared error of the velocity at x_t = (1 - sigma) x0 + sigma noise; float32. With a `teacher`
    model: (1 - w) that + w the squared error to the teacher's velocity (dense, no gradient); `parts` then
    receives the flow-matching term alone ("flow", detached), the number comparable across runs."""
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    prediction = velocity(model, x_t, sigma, context, transformer_options).float()
    flow = torch.nn.functional.mse_loss(prediction, (noise - x0).float())
    if teacher is None:
        return flow
    with torch.no_grad():
        target = velocity(teacher, x_t, sigma, context).float()
    if parts is not None:
        parts["flow"] = flow.detach()
    return (1 - teacher_weight) * flow + teacher_weight * torch.nn.functional.mse_loss(prediction, target)


def sampling_sigmas(steps: int, shift: float, device=None) -> torch.Tensor:
    """steps + 1 sigmas from 1 to 0, evenly spaced before the shift."""
    return shifted_sigma(torch.linspace(1, 0, steps + 1, device=device), shift)


@torch.no_grad()
def sample_euler(model, noise: torch.Tensor, context: torch.Tensor, sigmas: torch.Tensor,
                 transformer_options=None) -> torch.Tensor:
    """Euler steps along the predicted velocity from sigmas[0] (= 1: pure noise) to sigmas[-1] (= 0).
    transformer_options: one dict for every step, or a function of the step index giving each step's
    (training.sparsity.sampling_attention: BSA inside the node's sigma window only)."""
    x = noise
    for step, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        options = transformer_options(step) if callable(transformer_options) else transformer_options
        v = velocity(model, x, sigma.expand(x.shape[0]), context, options)
        x = x + (sigma_next - sigma) * v.to(x.dtype)
    return x


def latent_shape(frames: int, latent_size: int) -> tuple[int, int, int, int]:
    return LATENT_CHANNELS, frames, latent_size, latent_size


def export_comfyui(state_dict: dict[str, torch.Tensor], path, dtype=torch.float16) -> pathlib.Path:
    """Writes `state_dict` (WanModel's own key names) as a safetensors diffusion model for ComfyUI."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")  # a crash mid-write leaves the previous file whole
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, path)
    return path
