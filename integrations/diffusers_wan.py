"""BSA in diffusers' Wan (`WanTransformer3DModel`): an attention processor for `set_attn_processor`.

    from comfyui_bsa.integrations.diffusers_wan import BSAWanAttnProcessor
    pipe.transformer.set_attn_processor(BSAWanAttnProcessor(pipe.transformer))

Self-attention runs BSA on the video tokens; cross-attention (text, and the image keys of I2V) runs
diffusers' own WanAttnProcessor, as does any call BSA cannot take (the reason is logged once). The
token grid comes from a forward pre-hook on the transformer that reads the latent's (frames, height,
width) and the patch size. diffusers is imported only when a processor is made.
"""
from __future__ import annotations

import logging

import torch

from ..bsa_core.attention import bsa_attention_op, choose_backend, unsupported_reason
from ..bsa_core.config import RECOMMENDED, BSAConfig
from ..bsa_core.patch import RunStats

log = logging.getLogger(__name__)


def latent_token_grid(latent_shape, patch_size) -> tuple[int, int, int]:
    """(frames, height, width) of the tokens Wan's patch embedding makes of a [B, C, F, H, W] latent."""
    frames, height, width = latent_shape[-3:]
    p_t, p_h, p_w = patch_size
    return frames // p_t, height // p_h, width // p_w


def apply_wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on x [B, L, H, D] with the transformer's (cos, sin) [1, L, 1, D], computed
    as diffusers' WanAttnProcessor does (interleaved pairs, cos of the even and sin of the odd channels)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class BSAWanAttnProcessor:
    """Attention processor for every attention module of a WanTransformer3DModel.

    transformer: the model it will be set on; a forward pre-hook on it records each call's token grid.
    config:      what BSA keeps (default: the ComfyUI node's defaults, RECOMMENDED).
    backend:     "auto" (Triton kernels on CUDA sm80+, else the pure-PyTorch reference), "triton", "reference".

    `stats` (bsa_core.patch.RunStats) counts the sparse and dense self-attention calls since the processor
    was made, `stats.summary()` says them in a line; `remove()` takes the hook off (set diffusers'
    WanAttnProcessor back to turn BSA off).
    """

    def __init__(self, transformer, config: BSAConfig = RECOMMENDED, backend: str = "auto"):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        if not isinstance(config, BSAConfig):
            raise ValueError(f"config must be a BSAConfig, got {type(config).__name__}")
        patch_size = getattr(getattr(transformer, "config", None), "patch_size", None)
        if patch_size is None or len(patch_size) != 3:
            raise ValueError(f"transformer must be a WanTransformer3DModel (config.patch_size of 3 numbers), "
                             f"got {type(transformer).__name__}")
        choose_backend(torch.empty(0), backend)  # a bad backend name fails here, not in the first step
        self.config = config
        self.backend = backend
        self.grid: tuple[int, int, int] | None = None
        self.stats = RunStats()
        self._dense = WanAttnProcessor()
        self._logged: set[str] = set()
        self._hook = transformer.register_forward_pre_hook(self._read_grid, with_kwargs=True)

    def _read_grid(self, transformer, args, kwargs):
        latent = args[0] if args else kwargs["hidden_states"]
        self.grid = latent_token_grid(latent.shape, transformer.config.patch_size)

    def remove(self) -> None:
        self._hook.remove()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attn.is_cross_attention:
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = apply_wan_rotary(query, *rotary_emb), apply_wan_rotary(key, *rotary_emb)
        # [B, L, H, D] -> BSA's [B, H, L, D]
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        reason = unsupported_reason(q, k, v, self.grid, mask=attention_mask)
        if reason is not None:
            self.stats.dense_reasons[reason] += 1
            if reason not in self._logged:
                self._logged.add(reason)
                log.info(f"[BSA] diffusers Wan self-attention stays dense: {reason}")
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        out, kept_queries, kept_kv = bsa_attention_op(q, k, v, self.grid, self.config, backend=self.backend)
        self.stats.record_sparse(kept_queries, kept_kv)
        hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
