"""Where the video tokens sit in each model family's self-attention.

The patch learns, once per model call, the token grid and the extra tokens around it from the
diffusion model object and the latent it gets (B, C, T, H, W). Extra tokens (text in joint attention,
reference or guide latents) are never pruned as queries and their keys are always attended.
Importable without ComfyUI: models are recognised by class name and attributes only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

UNKNOWN_FAMILY = "unknown model family"


@dataclass(frozen=True)
class TokenLayout:
    """family:   what the model was recognised as.
    grid:        (T, H, W) video tokens after patchify, raster order in the sequence.
    n_prefix:    extra tokens before the video (reference latents).
    n_suffix:    extra tokens after the video; None = every token after the video (text whose
                 length differs between cond and uncond and between model types).
    reason:      why BSA cannot take this model's self-attention (None when it can).
    """

    family: str
    grid: tuple[int, int, int] | None = None
    n_prefix: int = 0
    n_suffix: int | None = 0
    reason: str | None = None

    def extra_tokens(self, n_tokens: int) -> tuple[int, int]:
        """(n_prefix, n_suffix) of a self-attention call over n_tokens tokens."""
        if self.n_suffix is not None or self.grid is None:
            return self.n_prefix, self.n_suffix or 0
        return self.n_prefix, max(n_tokens - self.n_prefix - math.prod(self.grid), 0)


def _patched_grid(shape, patch, ceil: bool = True) -> tuple[int, int, int]:
    """Token grid of a (T, H, W) latent cut into `patch`; ceil where the model pads to the patch size."""
    if ceil:
        return tuple(-(-int(n) // int(p)) for n, p in zip(shape, patch))
    return tuple(int(n) // int(p) for n, p in zip(shape, patch))


def _wan(model, x_shape, kwargs) -> TokenLayout:
    """Wan 2.1/2.2 (T2V, I2V, TI2V 5B, VACE, camera): video tokens; a reference latent (Wan 2.2 Fun
    with ref_conv) becomes tokens before the video; time_dim_concat frames are part of the video."""
    patch = tuple(model.patch_size)
    T = x_shape[2]
    time_dim_concat = kwargs.get("time_dim_concat")
    if time_dim_concat is not None:
        T = -(-T // patch[0]) * patch[0] + time_dim_concat.shape[2]
    grid = _patched_grid((T, *x_shape[3:]), patch)
    n_prefix = 0
    reference = kwargs.get("reference_latent")
    if getattr(model, "ref_conv", None) is not None and reference is not None:
        n_prefix = math.prod(_patched_grid(reference.shape[-2:], patch[1:], ceil=False))
    return TokenLayout("wan", grid, n_prefix)


def _wan_s2v(model, x_shape, kwargs) -> TokenLayout:
    """Wan 2.2 S2V appends reference and motion tokens after the video."""
    return TokenLayout("wan-s2v", _patched_grid(x_shape[2:], model.patch_size), 0, None)


def _hunyuan_video(model, x_shape, kwargs) -> TokenLayout:
    """HunyuanVideo (1.0, I2V, 1.5): [ref_latent] image then text (+ byT5, + vision) tokens, joint."""
    patch = tuple(model.patch_size)
    if len(patch) != 3:
        return TokenLayout("hunyuan-image", reason="image model (2-D patches)")
    ref = kwargs.get("ref_latent")
    n_prefix = math.prod(_patched_grid(ref.shape[2:], patch)) if ref is not None else 0
    return TokenLayout("hunyuan-video", _patched_grid(x_shape[2:], patch), n_prefix, None)


def _ltxv(model, x_shape, kwargs) -> TokenLayout:
    """LTX-Video: patch 1, F*H*W tokens; guide (keyframe) latents are frames concatenated after the
    video whose tokens keyframe_idxs lists: they become suffix tokens."""
    T, H, W = _patched_grid(x_shape[2:], model.patchifier.patch_size)
    keyframes = kwargs.get("keyframe_idxs")
    n_guide = int(keyframes.shape[2]) if keyframes is not None else 0
    if n_guide % (H * W) or n_guide >= T * H * W:
        return TokenLayout("ltxv", reason=f"{n_guide} guide tokens are not whole frames of {H}x{W}")
    return TokenLayout("ltxv", (T - n_guide // (H * W), H, W), 0, n_guide)


def _cosmos_predict2(model, x_shape, kwargs) -> TokenLayout:
    """Cosmos predict2: 'b (t h w) d', video only."""
    patch = (model.patch_temporal, model.patch_spatial, model.patch_spatial)
    return TokenLayout("cosmos-predict2", _patched_grid(x_shape[2:], patch))


def _mochi(model, x_shape, kwargs) -> TokenLayout:
    """Mochi: video then the unpadded text tokens; spatial patch, no temporal patch, no padding."""
    p = model.patch_size
    return TokenLayout("mochi", _patched_grid(x_shape[2:], (1, p, p), ceil=False), 0, None)


def _from_patch_size(model, x_shape, kwargs) -> TokenLayout:
    """Any other model with a 3-D patch size: video tokens only, as the latent says."""
    return TokenLayout("unknown (grid from patch_size)", _patched_grid(x_shape[2:], model.patch_size))


ADAPTERS = {  # class name (anywhere in the model's MRO) -> adapter; the most derived class wins
    "WanModel": _wan,
    "WanModel_S2V": _wan_s2v,
    "HunyuanVideo": _hunyuan_video,
    "LTXVModel": _ltxv,
    "MiniTrainDIT": _cosmos_predict2,
    "AsymmDiTJoint": _mochi,
}


def token_layout(diffusion_model, x_shape, kwargs=None) -> TokenLayout:
    """The TokenLayout of one model call: `diffusion_model` is the torch module (model.diffusion_model
    of a ComfyUI BaseModel), x_shape the latent's shape, kwargs the model's extra conds."""
    diffusion_model = getattr(diffusion_model, "_orig_mod", diffusion_model)  # under TorchCompileModel
    if len(x_shape) != 5:
        return TokenLayout(type(diffusion_model).__name__, reason=f"not a video latent (shape {tuple(x_shape)})")
    for cls in type(diffusion_model).__mro__:
        adapter = ADAPTERS.get(cls.__name__)
        if adapter is not None:
            return adapter(diffusion_model, tuple(x_shape), kwargs or {})
    patch = getattr(diffusion_model, "patch_size", None)
    if isinstance(patch, (tuple, list)) and len(patch) == 3:
        return _from_patch_size(diffusion_model, tuple(x_shape), kwargs or {})
    return TokenLayout(type(diffusion_model).__name__, reason=UNKNOWN_FAMILY)
