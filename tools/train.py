"""Train (or resume) the small Wan 2.1 T2V of training/ on the synthetic video set.

    python tools/train.py --config training/configs/tiny_wan_dense.json [--run-dir runs/x] [--stop-at STEP]

The run folder (config's run_dir, or --run-dir) receives config.json, state.pt, model_ema.safetensors (loads
in ComfyUI as a Wan 2.1 T2V diffusion model), log.jsonl and previews/step_*.png; running the same command
again resumes from state.pt. COMFYUI_PATH points at a ComfyUI checkout (default: <repo>/.comfyui/ComfyUI).
"""
from __future__ import annotations

import argparse
import importlib
import dataclasses
import sys

import torch

from pack import load_pack
from run_workflow import comfyui_path


def import_comfyui() -> None:
    """ComfyUI on sys.path without parsing our command line; CPU mode when there is no CUDA."""
    path = comfyui_path()
    if not (path / "comfy").is_dir():
        raise SystemExit(f"ComfyUI not found at {path}: run tools/setup.sh or set COMFYUI_PATH")
    sys.path.insert(0, str(path))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import comfy.model_management  # noqa: F401  (reads args.cpu on import)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a TrainConfig as JSON (training/config.py)")
    parser.add_argument("--run-dir", help="run folder instead of the config's run_dir")
    parser.add_argument("--stop-at", type=int, help="pause after this step with a checkpoint")
    args = parser.parse_args()
    import_comfyui()
    load_pack()
    training = importlib.import_module("comfyui_bsa.training")
    config = training.TrainConfig.load(args.config)
    if args.run_dir:
        config = dataclasses.replace(config, run_dir=args.run_dir)
    rows = training.train(config, stop_at=args.stop_at)
    if rows:
        print(f"step {rows[-1]['step']}: loss {rows[-1]['loss']:.4f}; run folder {config.run_dir}")


if __name__ == "__main__":
    main()
