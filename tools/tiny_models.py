"""Random-weight video models of every family BSA adapts, small enough for CPU tests.

Each family is the config ComfyUI's model detection returns for it, shrunk (2 heads, 1-2 blocks);
the state dict has the real key names because it is read off ComfyUI's own model class.
Wan, HunyuanVideo and LTX-Video load through ComfyUI's detection (comfy.sd.load_diffusion_model_state_dict);
Cosmos predict2 and Mochi have hard-coded full-size configs in detection, so their tiny versions are
built from the config directly. Needs ComfyUI importable (tests/comfy_env.py sets that up).
"""
from __future__ import annotations

import torch

from tiny_wan import random_weights

_WAN = dict(image_model="wan2.1", dim=256, num_heads=2, ffn_dim=512, num_layers=2, patch_size=(1, 2, 2),
            freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)

TINY_CONFIGS = {
    # family -> (unet config, whether detection recognises the tiny model)
    "wan22_ti2v_5b": (dict(_WAN, model_type="t2v", in_dim=48, out_dim=48), True),
    "wan21_i2v": (dict(_WAN, model_type="i2v", in_dim=36, out_dim=16), True),
    "hunyuan_video": (dict(image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2],
                           vec_in_dim=768, axes_dim=[16, 56, 56], meanflow=False, context_in_dim=4096,
                           hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, theta=256,
                           qkv_bias=True, byt5=False, guidance_embed=True), True),
    "ltxv": (dict(image_model="ltxv", num_layers=2, attention_head_dim=8, cross_attention_dim=256), True),
    "cosmos_predict2": (dict(image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128,
                             in_channels=16, out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=256,
                             concat_padding_mask=True, crossattn_emb_channels=1024, pos_emb_cls="rope3d",
                             pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1, max_fps=30,
                             use_adaln_lora=True, adaln_lora_dim=32, num_blocks=2, num_heads=2,
                             extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0,
                             rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0), False),
    # Mochi's blocks assert an MLP width of 1536 * 8, hence mlp_ratio_x 48 at width 256
    "mochi": (dict(image_model="mochi_preview", depth=1, patch_size=2, num_heads=2, hidden_size_x=256,
                   hidden_size_y=128, mlp_ratio_x=48.0, mlp_ratio_y=4.0, learn_sigma=False, in_channels=12,
                   qk_norm=True, qkv_bias=False, out_bias=True, attn_drop=0.0, patch_embed_bias=True,
                   posenc_preserve_area=True, timestep_mlp_bias=True, attend_to_padding=False,
                   timestep_scale=1000.0, use_t5=True, t5_feat_dim=4096, t5_token_length=256,
                   rope_theta=10000.0), False),
}


def _model_config(family: str):
    import comfy.model_detection
    config = dict(TINY_CONFIGS[family][0])
    if family == "hunyuan_video":
        import dataclasses

        from comfy.ldm.hunyuan_video.model import HunyuanVideoParams
        # HunyuanVideo 1.5's switches (ComfyUI >= 0.3.71), off: HunyuanVideo 1 on every version
        fields = {f.name for f in dataclasses.fields(HunyuanVideoParams)}
        config.update({k: v for k, v in (("use_cond_type_embedding", False), ("vision_in_dim", None)) if k in fields})
    return comfy.model_detection.model_config_from_unet_config(config)


def tiny_state_dict(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights under the key names of ComfyUI's model class for `family`."""
    model = _model_config(family).get_model({}, device="meta")
    shapes = {name: tuple(t.shape) for name, t in model.diffusion_model.state_dict().items()}
    return random_weights(shapes, seed, dtype=torch.float32)


def tiny_model(family: str, seed: int = 0):
    """A ComfyUI ModelPatcher of the tiny `family` model on the CPU (float32)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    state = tiny_state_dict(family, seed)
    if TINY_CONFIGS[family][1]:
        return comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float32})
    config = _model_config(family)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(state)
    model.load_model_weights(state, "")
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
