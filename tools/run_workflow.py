"""Run an API-format workflow headless through ComfyUI's own executor, dense and with BSA, and compare.

The pack is loaded the way ComfyUI loads it (nodes.load_custom_node on a custom_nodes folder that links
to this repository). A random-weight tiny Wan 2.1 is written into a temporary models folder, and a
seeded random-conditioning node stands in for the 11 GB text encoder.

    python tools/run_workflow.py [--workflow workflows/tiny_wan_t2v_api.json] [--width 256 ...]

COMFYUI_PATH points at a ComfyUI checkout (default: <repo>/.comfyui/ComfyUI).
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from tiny_wan import write_tiny_wan  # noqa: E402

BSA_NODE = "BSASparseAttention"
TINY_WAN_FILE = "tiny_wan2.1_t2v.safetensors"


def comfyui_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui" / "ComfyUI").resolve()


def bootstrap_comfyui(path: pathlib.Path):
    """Import ComfyUI in CPU mode without parsing our command line; returns its `nodes` module."""
    if not (path / "comfy").is_dir():
        raise SystemExit(f"ComfyUI not found at {path}: run tools/setup.sh or set COMFYUI_PATH")
    sys.path.insert(0, str(path))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu on import)
    import nodes
    return nodes


def random_conditioning_node():
    """A stand-in for CLIPTextEncode: seeded N(0, 1) text embeddings shaped like umT5-XXL's."""
    import torch

    class TinyRandomConditioning:
        CATEGORY = "testing"
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "encode"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                                 "tokens": ("INT", {"default": 16, "min": 1, "max": 512}),
                                 "width": ("INT", {"default": 4096, "min": 1, "max": 8192})}}

        def encode(self, seed, tokens, width):
            generator = torch.Generator().manual_seed(seed)
            return ([[torch.randn(1, tokens, width, generator=generator), {}]],)

    return TinyRandomConditioning


async def load_nodes(nodes, custom_nodes_dir: pathlib.Path):
    """Our pack through ComfyUI's custom-node loader, plus the built-in extras the workflow needs."""
    link = custom_nodes_dir / "comfyui-bsa"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    extras = pathlib.Path(nodes.__file__).parent / "comfy_extras"
    await nodes.load_custom_node(str(extras / "nodes_hunyuan.py"), module_parent="comfy_extras")
    if not await nodes.load_custom_node(str(link)) or BSA_NODE not in nodes.NODE_CLASS_MAPPINGS:
        raise SystemExit(f"ComfyUI could not load the pack from {link} (see the warnings above)")
    nodes.NODE_CLASS_MAPPINGS["TinyRandomConditioning"] = random_conditioning_node()


class ServerStub:
    """The part of PromptServer that PromptExecutor talks to: no client, messages dropped."""
    client_id = None
    last_node_id = None

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


class BSARunLog(logging.Handler):
    """Collects the per-run summaries the patch logs at the end of each sampling run."""

    def __init__(self):
        super().__init__()
        self.runs = []

    def emit(self, record):
        if hasattr(record, "bsa_run"):
            self.runs.append(record.bsa_run)


def variants(prompt: dict) -> dict[str, dict]:
    """dense: the BSA node bypassed. bsa_1_1: BSA at keep_ratio = kv_threshold = 1 (must equal dense).
    bsa: the workflow's own BSA settings."""
    bsa_id = next(i for i, node in prompt.items() if node["class_type"] == BSA_NODE)
    source = prompt[bsa_id]["inputs"]["model"]
    dense = copy.deepcopy(prompt)
    del dense[bsa_id]
    for node in dense.values():
        for name, value in node["inputs"].items():
            if value == [bsa_id, 0]:
                node["inputs"][name] = source
    full = copy.deepcopy(prompt)
    full[bsa_id]["inputs"].update(keep_ratio=1.0, kv_threshold=1.0, threshold_mode="cumulative")
    return {"dense": dense, "bsa_1_1": full, "bsa": prompt}


def apply_overrides(prompt: dict, args) -> dict:
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyHunyuanLatentVideo":
            for name in ("width", "height", "length"):
                if getattr(args, name) is not None:
                    inputs[name] = getattr(args, name)
        if node["class_type"] == "KSampler" and args.steps is not None:
            inputs["steps"] = args.steps
    return prompt


def prompt_executor(execution, server):
    """ComfyUI's PromptExecutor with the classic cache and no LRU (its cache options changed in 0.3.68)."""
    import inspect

    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_size=0)


def run_prompt(execution, prompt: dict, prompt_id: str):
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise SystemExit(f"invalid workflow: {error} {node_errors}")
    executor = prompt_executor(execution, ServerStub())
    start = time.perf_counter()
    executor.execute(prompt, prompt_id, {}, outputs)
    seconds = time.perf_counter() - start
    if not executor.success:
        errors = [m for m in executor.status_messages if m[0] == "execution_error"]
        raise SystemExit(f"{prompt_id} failed: {errors}")
    return seconds


def latest_latent(output_dir: pathlib.Path):
    import safetensors.torch
    newest = max(output_dir.rglob("*.latent"), key=lambda p: p.stat().st_mtime_ns)
    return safetensors.torch.load_file(str(newest))["latent_tensor"].float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflow", default=str(REPO / "workflows" / "tiny_wan_t2v_api.json"))
    parser.add_argument("--width", type=int, help="override EmptyHunyuanLatentVideo width (pixels)")
    parser.add_argument("--height", type=int, help="override EmptyHunyuanLatentVideo height (pixels)")
    parser.add_argument("--length", type=int, help="override EmptyHunyuanLatentVideo length (frames)")
    parser.add_argument("--steps", type=int, help="override KSampler steps")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's own log lines")
    args = parser.parse_args(argv)

    console = logging.StreamHandler(sys.stdout)
    if not args.verbose:
        console.addFilter(lambda record: record.getMessage().startswith("[BSA]"))
    run_log = BSARunLog()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[console, run_log], force=True)

    nodes = bootstrap_comfyui(comfyui_path())
    import comfy.utils
    import execution
    import folder_paths

    comfy.utils.PROGRESS_BAR_ENABLED = args.verbose

    prompt = apply_overrides(json.loads(pathlib.Path(args.workflow).read_text()), args)
    with tempfile.TemporaryDirectory(prefix="bsa_run_") as tmp:
        tmp = pathlib.Path(tmp)
        write_tiny_wan(tmp / "models" / TINY_WAN_FILE)
        folder_paths.add_model_folder_path("diffusion_models", str(tmp / "models"))
        folder_paths.set_output_directory(str(tmp / "output"))
        (tmp / "custom_nodes").mkdir()
        asyncio.run(load_nodes(nodes, tmp / "custom_nodes"))

        latent = next(n["inputs"] for n in prompt.values() if n["class_type"] == "EmptyHunyuanLatentVideo")
        print(f"workflow {args.workflow}: {latent['width']}x{latent['height']}x{latent['length']} frames, "
              f"ComfyUI {comfyui_path()}")
        reference = None
        for name, variant in variants(prompt).items():
            runs_before = len(run_log.runs)
            seconds = run_prompt(execution, variant, name)
            result = latest_latent(tmp / "output")
            reference = result if reference is None else reference
            error = float((result - reference).abs().max())
            line = f"{name:8s} wall {seconds:6.2f} s  max|latent - dense| {error:.2e}"
            for run in run_log.runs[runs_before:]:
                kept = (f"kept queries {run['kept_query_pct']:.1f}%, kept KV cubes {run['kept_kv_pct']:.1f}%"
                        if run["sparse_calls"] else "no sparse call")
                line += f"  | {run['sparse_calls']} sparse / {run['dense_calls']} dense calls, {kept}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
