"""Run an API-format workflow headless through ComfyUI's own executor, dense and with BSA, and compare.

Nodes are loaded the way ComfyUI's main.py loads them (nodes.init_extra_nodes: the built-in extras, then
every custom node folder, here one that links to this repository). The diffusion models a workflow can load:
the files of assets/ (the small Wan 2.1 trained on synthetic shapes by training/, tiny_wan_shapes_dense),
a random-weight tiny Wan 2.1 written into a temporary models folder (tiny_wan2.1_t2v), and those of
--models-dir (searched first). Two test-only nodes stand in for the 11 GB text encoder: TinyRandomConditioning
(seeded random embeddings) and SyntheticCaption (the embedding the trained model learnt for a caption of
the synthetic set). Every IMAGE a node outputs is written to --output-dir as <variant>_<node>_<output>.png.

A workflow with a SyntheticCaption samples in training/'s latent space: each run's saved latent is decoded
with the set's exact decoder (after undoing the Wan 2.1 latent format's scaling) and compared in pixels with
the first run (PSNR); decoded_frames.png in --output-dir shows every run's frames, one row per run.

    python tools/run_workflow.py [--workflow workflows/tiny_wan_shapes_t2v_api.json] [--steps 20 ...]

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
import shutil
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from pack import load_pack  # noqa: E402
from tiny_wan import write_tiny_wan  # noqa: E402

BSA_NODE = "BSASparseAttention"
CAPTION_NODE = "SyntheticCaption"
TINY_WAN_FILE = "tiny_wan2.1_t2v.safetensors"
ASSETS = REPO / "assets"  # the trained model (tiny_wan_shapes_dense.safetensors)
FRAMES_FILE = "decoded_frames.png"
VARIANTS = ("dense", "bsa_1_1", "bsa")


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
    import_utils_package(path)
    import nodes
    return nodes


def import_utils_package(path: pathlib.Path) -> None:
    """ComfyUI's `utils` package, imported before the extras need it, as main.py does: once `nodes` is
    imported, ComfyUI/comfy (whose utils.py would shadow the package) comes first on sys.path."""
    if hasattr(sys.modules.get("utils"), "__path__"):
        return
    sys.modules.pop("utils", None)
    sys.path.insert(0, str(path))
    try:
        import utils.extra_config  # noqa: F401
    finally:
        sys.path.remove(str(path))


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


def synthetic_caption_node():
    """A stand-in for CLIPTextEncode for the models trained by training/: the fixed [tokens, 4096] embedding
    of a caption of the synthetic set (SyntheticVideos(seed).embeddings; the shipped configs: seed 0, 8
    tokens), the conditioning the model was trained with."""
    load_pack()
    from comfyui_bsa.training.data import SyntheticVideos, caption, num_classes

    captions = [caption(c) for c in range(num_classes())]

    class SyntheticCaption:
        CATEGORY = "testing"
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "encode"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"caption": (captions, {"default": captions[0]}),
                                 "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                                 "tokens": ("INT", {"default": 8, "min": 1, "max": 512})}}

        def encode(self, caption, seed, tokens):
            embeddings = SyntheticVideos(1, 2, 1, tokens, seed).embeddings
            return ([[embeddings[captions.index(caption)].unsqueeze(0), {}]],)

    return SyntheticCaption


async def load_nodes(nodes, custom_nodes_dir: pathlib.Path):
    """ComfyUI's built-in extras and, as its only custom node folder, `custom_nodes_dir` with a link to this
    repository: nodes.init_extra_nodes, what main.py runs at start-up (without the API nodes)."""
    import folder_paths

    link = custom_nodes_dir / "comfyui-bsa"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    import_utils_package(pathlib.Path(nodes.__file__).parent)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes_dir)], set())
    await nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False)
    if BSA_NODE not in nodes.NODE_CLASS_MAPPINGS:
        raise SystemExit(f"ComfyUI could not load the pack from {link} (see the warnings above)")
    nodes.NODE_CLASS_MAPPINGS["TinyRandomConditioning"] = random_conditioning_node()
    nodes.NODE_CLASS_MAPPINGS[CAPTION_NODE] = synthetic_caption_node()


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
    """(wall seconds, the executor's history outputs: node id -> its UI output, e.g. {"images": [...]})."""
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
    return seconds, executor.history_result["outputs"]


IMAGE_WRITERS = ("PreviewImage", "SaveImage")


def preview_every_image(prompt: dict, node_classes: dict) -> dict:
    """The prompt plus a PreviewImage on every IMAGE output that no PreviewImage / SaveImage reads, so that
    every image the workflow makes comes back in the executor's history."""
    prompt = copy.deepcopy(prompt)
    read = [node["inputs"].get("images") for node in prompt.values() if node["class_type"] in IMAGE_WRITERS]
    next_id = 1 + max((int(i) for i in prompt if str(i).isdigit()), default=0)
    for node_id, node in list(prompt.items()):
        for index, kind in enumerate(node_classes[node["class_type"]].RETURN_TYPES):
            if kind == "IMAGE" and [node_id, index] not in read:
                prompt[str(next_id)] = {"class_type": "PreviewImage", "inputs": {"images": [node_id, index]}}
                next_id += 1
    return prompt


def write_images(prompt: dict, history: dict, node_classes: dict, variant: str, dest: pathlib.Path) -> list:
    """Copies the PNGs the prompt's PreviewImage / SaveImage nodes wrote to dest as
    <variant>_<source node class><id>_<output name>[_<n>].png; returns their paths."""
    import folder_paths

    written = []
    for writer_id, writer in prompt.items():
        if writer["class_type"] not in IMAGE_WRITERS or writer_id not in history:
            continue
        source_id, index = writer["inputs"]["images"]
        source = prompt[source_id]["class_type"]
        names = node_classes[source].RETURN_NAMES or ()
        output = names[index] if index < len(names) else f"output{index}"
        images = history[writer_id].get("images", [])
        for n, image in enumerate(images):
            suffix = f"_{n}" if len(images) > 1 else ""
            path = dest / f"{variant}_{source}{source_id}_{output}{suffix}.png"
            folder = pathlib.Path(folder_paths.get_directory_by_type(image["type"]))
            shutil.copyfile(folder / image["subfolder"] / image["filename"], path)
            written.append(path)
    return written


def latest_latent(output_dir: pathlib.Path):
    import safetensors.torch
    newest = max(output_dir.rglob("*.latent"), key=lambda p: p.stat().st_mtime_ns)
    return safetensors.torch.load_file(str(newest))["latent_tensor"].float()


def decode_synthetic(latent):
    """A saved Wan 2.1 LATENT [B, 16, T, h, w] (the sampler's output, in the Wan21 latent format's space) ->
    pixels [B, 3, T, 2h, 2w] in [-1, 1]: process_in gives the latents the model saw, training/'s own space,
    which its exact decoder maps to pixels."""
    import comfy.latent_formats
    from comfyui_bsa.training.data import decode

    return decode(comfy.latent_formats.Wan21().process_in(latent)).clamp(-1, 1)


def check_model_files(prompt: dict) -> None:
    """A diffusion model the prompt loads must be in a models folder; the trained one says where it comes from."""
    import folder_paths

    for node in prompt.values():
        name = node["inputs"].get("unet_name") if node["class_type"] == "UNETLoader" else None
        if name is not None and folder_paths.get_full_path("diffusion_models", name) is None:
            raise SystemExit(f"diffusion model {name} not found in {folder_paths.get_folder_paths('diffusion_models')}"
                             f" (the trained model ships as assets/tiny_wan_shapes_dense.safetensors; "
                             f"--models-dir adds a folder)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflow", default=str(REPO / "workflows" / "tiny_wan_shapes_t2v_api.json"))
    parser.add_argument("--width", type=int, help="override EmptyHunyuanLatentVideo width (pixels)")
    parser.add_argument("--height", type=int, help="override EmptyHunyuanLatentVideo height (pixels)")
    parser.add_argument("--length", type=int, help="override EmptyHunyuanLatentVideo length (frames)")
    parser.add_argument("--steps", type=int, help="override KSampler steps")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which runs: dense (BSA node bypassed), bsa_1_1 (keep_ratio = kv_threshold = 1), "
                             "bsa (the workflow's settings); run in that order, each compared with the first run")
    parser.add_argument("--output-dir", help="where the workflow's images go (default: output/<workflow name>)")
    parser.add_argument("--models-dir", help="a folder of diffusion models searched before assets/")
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
    load_pack()
    from comfyui_bsa.training.evaluate import psnr, strip_image

    workflow = pathlib.Path(args.workflow)
    prompt = apply_overrides(json.loads(workflow.read_text()), args)
    images_dir = pathlib.Path(args.output_dir or REPO / "output" / workflow.stem.removesuffix("_api"))
    images_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bsa_run_") as tmp:
        tmp = pathlib.Path(tmp)
        write_tiny_wan(tmp / "models" / TINY_WAN_FILE)
        folder_paths.add_model_folder_path("diffusion_models", str(tmp / "models"))
        folder_paths.add_model_folder_path("diffusion_models", str(ASSETS))
        if args.models_dir:
            folder_paths.add_model_folder_path("diffusion_models", str(pathlib.Path(args.models_dir).resolve()),
                                               is_default=True)
        folder_paths.set_output_directory(str(tmp / "output"))
        folder_paths.set_temp_directory(str(tmp / "temp"))
        (tmp / "custom_nodes").mkdir()
        asyncio.run(load_nodes(nodes, tmp / "custom_nodes"))

        check_model_files(prompt)
        latent = next(n["inputs"] for n in prompt.values() if n["class_type"] == "EmptyHunyuanLatentVideo")
        print(f"workflow {args.workflow}: {latent['width']}x{latent['height']}x{latent['length']} frames, "
              f"ComfyUI {comfyui_path()}")
        synthetic = any(n["class_type"] == CAPTION_NODE for n in prompt.values())
        if synthetic:
            print(f"{'':8s} latents in training/'s space, decoded by its exact decoder: PSNR of the pixels vs the "
                  f"first run, {FRAMES_FILE} one row per run")
        reference, frames = None, {}
        first = next(name for name in VARIANTS if name in args.variants)  # runs go in VARIANTS order
        for name, variant in variants(prompt).items():
            if name not in args.variants:
                continue
            variant = preview_every_image(variant, nodes.NODE_CLASS_MAPPINGS)
            runs_before = len(run_log.runs)
            seconds, history = run_prompt(execution, variant, name)
            result = latest_latent(tmp / "output")
            reference = result if reference is None else reference
            error = float((result - reference).abs().max())
            line = f"{name:8s} wall {seconds:6.2f} s  max|latent - {first}| {error:.2e}"
            if synthetic:
                frames[name] = decode_synthetic(result)
                line += f"  PSNR {psnr(frames[name], frames[first]):6.2f} dB"
            for run in run_log.runs[runs_before:]:
                kept = (f"kept queries {run['kept_query_pct']:.1f}%, kept KV cubes {run['kept_kv_pct']:.1f}%"
                        if run["sparse_calls"] else "no sparse call")
                line += f"  | {run['sparse_calls']} sparse / {run['dense_calls']} dense calls, {kept}"
            print(line, flush=True)
            for path in write_images(variant, history, nodes.NODE_CLASS_MAPPINGS, name, images_dir):
                print(f"{'':8s} image {path}")
        if frames:
            path = images_dir / FRAMES_FILE
            strip_image([(name, video[0]) for name, video in frames.items()]).save(path)
            first = next(iter(frames.values()))
            print(f"{'':8s} image {path} (frames left to right: {first.shape[2]} frames of "
                  f"{first.shape[3]}x{first.shape[4]} px, first video of the batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
