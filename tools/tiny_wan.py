"""Write a random-weight Wan 2.1 T2V diffusion model small enough for CPU tests and demos.

Real key names and layout, so ComfyUI's own model detection loads it as WAN21_T2V; ComfyUI derives
heads = dim // 128, so dim 256 gives 2 heads of 128. The weights are seeded: same file every time.
The real sizes (WAN21_T2V_SIZES: 1.3B, 14B) come from wan21_t2v_state_dict, made on any device
(bench/e2e_wan.py builds the 1.3B on the GPU).

    python tools/tiny_wan.py OUT.safetensors [--dim 256] [--layers 2] [--seed 0]
    python tools/tiny_wan.py OUT.safetensors --size 1.3B    # the real Wan 2.1 T2V 1.3B shapes
"""
from __future__ import annotations

import argparse
import pathlib

import torch
from safetensors.torch import save_file

IN_DIM = OUT_DIM = 16  # Wan 2.1 latent channels
TEXT_DIM = 4096  # umT5-XXL width
FREQ_DIM = 256
PATCH = (1, 2, 2)
# width, blocks, FFN width of the released Wan 2.1 T2V models (heads = dim / 128: 12 and 40)
WAN21_T2V_SIZES = {
    "tiny": {"dim": 256, "layers": 2, "ffn_dim": 512},
    "1.3B": {"dim": 1536, "layers": 30, "ffn_dim": 8960},
    "14B": {"dim": 5120, "layers": 40, "ffn_dim": 13824},
}


def wan21_t2v_shapes(dim: int, layers: int, ffn_dim: int) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a Wan 2.1 T2V checkpoint (the diffusion model alone, no prefix)."""
    shapes = {
        "patch_embedding.weight": (dim, IN_DIM, *PATCH), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, TEXT_DIM), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, FREQ_DIM), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (OUT_DIM * PATCH[0] * PATCH[1] * PATCH[2], dim),
        "head.head.bias": (OUT_DIM * PATCH[0] * PATCH[1] * PATCH[2],),
        "head.modulation": (1, 2, dim),
    }
    for i in range(layers):
        b = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{b}.{attn}.{proj}.weight"] = (dim, dim)
                shapes[f"{b}.{attn}.{proj}.bias"] = (dim,)
            shapes[f"{b}.{attn}.norm_q.weight"] = (dim,)
            shapes[f"{b}.{attn}.norm_k.weight"] = (dim,)
        shapes.update({
            f"{b}.norm3.weight": (dim,), f"{b}.norm3.bias": (dim,),
            f"{b}.ffn.0.weight": (ffn_dim, dim), f"{b}.ffn.0.bias": (ffn_dim,),
            f"{b}.ffn.2.weight": (dim, ffn_dim), f"{b}.ffn.2.bias": (dim,),
            f"{b}.modulation": (1, 6, dim),
        })
    return shapes


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype=torch.float16,
                   device="cpu") -> dict[str, torch.Tensor]:
    """Weights ~ N(0, 1/fan_in) so activations keep unit scale and attention is neither flat nor one-hot
    (std 0.026 at width 1536); norm gains 1, biases 0, modulations (and other 1-D or 3-D tables) small.
    Made on `device` with that device's generator (the CPU gives the same weights as always)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if "norm" in name and name.endswith(("weight", "scale")):
            tensor = torch.ones(shape, device=device)
        elif name.endswith("bias"):
            tensor = torch.zeros(shape, device=device)
        elif len(shape) < 2 or "modulation" in name or "scale_shift_table" in name:
            tensor = 0.1 * torch.randn(shape, generator=generator, device=device)
        else:
            fan_in = shape[1] * (shape[2] * shape[3] * shape[4] if len(shape) == 5 else 1)
            tensor = torch.randn(shape, generator=generator, device=device) / fan_in ** 0.5
        state[name] = tensor.to(dtype).contiguous()
    return state


def wan21_t2v_state_dict(size: str = "tiny", seed: int = 0, dtype=torch.float16, device="cpu") -> dict[str, torch.Tensor]:
    """A random Wan 2.1 T2V of one of WAN21_T2V_SIZES ("tiny", "1.3B", "14B"), made on `device`."""
    if size not in WAN21_T2V_SIZES:
        raise ValueError(f"size must be one of {sorted(WAN21_T2V_SIZES)}, got {size!r}")
    return random_weights(wan21_t2v_shapes(**WAN21_T2V_SIZES[size]), seed, dtype, device)


def tiny_wan_state_dict(dim: int = 256, layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_weights(wan21_t2v_shapes(dim, layers, ffn_dim=2 * dim), seed)


def write_tiny_wan(path, dim: int = 256, layers: int = 2, seed: int = 0, size: str | None = None) -> pathlib.Path:
    """Writes a dim x layers model, or with `size` one of WAN21_T2V_SIZES (dim and layers then unused)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = tiny_wan_state_dict(dim, layers, seed) if size is None else wan21_t2v_state_dict(size, seed)
    save_file(state, str(path))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output .safetensors path")
    parser.add_argument("--dim", type=int, default=256, help="model width, a multiple of 128 (heads = dim / 128)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(WAN21_T2V_SIZES),
                        help="a real Wan 2.1 T2V size instead of --dim/--layers (1.3B: 2.8 GB in fp16)")
    a = parser.parse_args()
    print(write_tiny_wan(a.out, a.dim, a.layers, a.seed, a.size))
