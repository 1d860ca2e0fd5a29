"""A LoRA training step of a full-size Wan 2.1 T2V 1.3B (random weights) at 480p x 81 frames (32,760 tokens):
seconds per step dense (torch SDPA forced to cuDNN, forward and backward) vs BSA on every block, and how far
BSA's LoRA gradients lie from dense's. A script, not a test.

The step is what a LoRA trainer runs (ComfyUI's TrainLoraNode with its defaults: bf16 base weights, rank-32
LoRA on every linear layer of the blocks, gradient checkpointing per block, flow-matching loss): the base
model is ComfyUI's own WanModel (training.model.wan_from_state_dict), the LoRA a parametrization W + B A,
BSA the override training/ puts on every forward (training.sparsity.attention_options), so its backward is
bsa::attention's autograd (the Triton backward on CUDA). With checkpointing each block's forward runs twice,
the second time under autograd: the selection of the recompute is the first one's (a constant of the step).

On the GPU machine (carry [".whl", ".comfy_min"], see bench/e2e_wan.py's docstring for the environment):

    COMFYUI_PATH=.comfy_min/ComfyUI python3 bench/train_step_wan.py

CPU smoke check (tiny Wan, small latent, the reference's autograd): python bench/train_step_wan.py --tiny
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from e2e_wan import bootstrap_comfyui, comfyui_path, sdpa_context, sync  # noqa: E402  (loads the pack)
from tiny_wan import wan21_t2v_state_dict  # noqa: E402

from comfyui_bsa.bsa_core.config import RECOMMENDED  # noqa: E402

SIZES = {"full": ("1.3B", (21, 60, 104), 512), "tiny": ("tiny", (5, 16, 16), 16)}  # model, latent (T, H, W), text tokens
SETTINGS = {"defaults": RECOMMENDED, "stat1.5": dataclasses.replace(RECOMMENDED, stat_lambda=1.5)}


class LoRA(torch.nn.Module):
    """W + (B A) scale as a parametrization of a linear layer's weight; B starts at zero (the step starts
    from the base model), A ~ N(0, 1/rank)."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator):
        super().__init__()
        out_features, in_features = weight.shape
        self.down = torch.nn.Parameter(torch.randn(rank, in_features, generator=generator) / rank ** 0.5)
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight):
        return weight + (self.up @ self.down).to(weight.dtype)


def add_lora(model: torch.nn.Module, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """Freezes the model and puts a LoRA on every linear layer of its blocks; returns the LoRA parameters."""
    from torch.nn.utils import parametrize
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for module in model.blocks.modules():
        if isinstance(module, torch.nn.Linear):
            parametrize.register_parametrization(module, "weight", LoRA(module.weight, rank, generator).to(device))
    return [p for p in model.parameters() if p.requires_grad]


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Gradient checkpointing per block, as TrainLoraNode does by default."""
    from torch.utils.checkpoint import checkpoint
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny Wan, small latent")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--settings", default="defaults,stat1.5", help=f"BSA settings among {', '.join(SETTINGS)}")
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    bootstrap_comfyui(comfyui_path(), cpu=device.type == "cpu")
    model_code = importlib.import_module("comfyui_bsa.training.model")
    sparsity = importlib.import_module("comfyui_bsa.training.sparsity")
    size, (t, h, w), text_tokens = SIZES["tiny" if args.tiny else "full"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    start = time.perf_counter()
    model = model_code.wan_from_state_dict(wan21_t2v_state_dict(size, dtype=dtype, device=device), dtype, device)
    lora = add_lora(model, args.rank, seed=0)
    if not args.no_checkpointing:
        checkpoint_blocks(model)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, t, h, w, generator=generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    context = torch.randn(1, text_tokens, 4096, generator=generator).to(device, dtype)
    sigma = torch.tensor([0.7], device=device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}  torch {torch.__version__}; Wan 2.1 T2V {size}, latent {tuple(x0.shape)} "
          f"({t * (h // 2) * (w // 2)} tokens), LoRA rank {args.rank} on every block linear ({sum(p.numel() for p in lora) / 1e6:.1f} M "
          f"params), checkpointing {'off' if args.no_checkpointing else 'on'}; built in {time.perf_counter() - start:.1f} s")

    def step(config):
        options, run = sparsity.attention_options(config, model, x0.shape, text_tokens)
        for p in lora:
            p.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model_code.flow_matching_loss(model, x0, context, noise, sigma, options)
        loss.backward()
        kept = run.stats.as_dict()["kept_kv_pct"] if run is not None and run.stats.sparse_calls else 100.0
        return float(loss.detach()), kept, [p.grad.float() for p in lora]

    variants = {"dense": None} | {name: SETTINGS[name] for name in args.settings.split(",")}
    dense_grads, dense_s = None, None
    print(f"  {'variant':9s} {'s/step':>7s} {'x dense':>7s} {'kept KV %':>9s} {'loss':>8s}  rel L2 of the LoRA gradient vs dense")
    for label, config in variants.items():
        with sdpa_context("cudnn", device):
            step(config)  # warm-up: compiles and autotunes the kernels
            times = []
            for _ in range(args.steps):
                sync(device)
                t0 = time.perf_counter()
                loss, kept, grads = step(config)
                sync(device)
                times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        flat = torch.cat([g.flatten() for g in grads])
        if dense_grads is None:
            dense_grads, dense_s, rel = flat, seconds, 0.0
        else:
            rel = float((flat - dense_grads).norm() / dense_grads.norm().clamp_min(1e-30))
        print(f"  {label:9s} {seconds:7.3f} {dense_s / seconds:7.2f} {kept:9.1f} {loss:8.4f}  {rel:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
