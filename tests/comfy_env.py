"""Real ComfyUI for tests: CPU mode, COMFYUI_PATH or <repo>/.comfyui/ComfyUI; skips when absent."""
from __future__ import annotations

import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COMFYUI_PATH = pathlib.Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui" / "ComfyUI").resolve()


def require_comfyui():
    """Import ComfyUI in CPU mode (once) or skip the calling test module."""
    if not (COMFYUI_PATH / "comfy").is_dir():
        pytest.skip(f"ComfyUI not found at {COMFYUI_PATH}: run tools/setup.sh or set COMFYUI_PATH",
                    allow_module_level=True)
    if str(COMFYUI_PATH) not in sys.path:
        sys.path.insert(0, str(COMFYUI_PATH))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu on import)
    return COMFYUI_PATH


@pytest.fixture(scope="session")
def tiny_wan_path(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tools"))
    from tiny_wan import write_tiny_wan
    return write_tiny_wan(tmp_path_factory.mktemp("models") / "tiny_wan2.1_t2v.safetensors")


SHAPES_MODEL = "tiny_wan_shapes_dense.safetensors"  # the trained model's name in assets/ (the demo's workflow)


@pytest.fixture(scope="session")
def shapes_stand_in_dir(tmp_path_factory):
    """A folder holding a random 2-block Wan 2.1 under the trained model's file name: the demo workflow runs
    on it without the trained weights (tools/run_workflow.py --models-dir searches it before assets/)."""
    from comfyui_bsa.training.model import export_comfyui, initial_state_dict
    folder = tmp_path_factory.mktemp("shapes_models")
    export_comfyui(initial_state_dict(256, 2, 512, seed=0), folder / SHAPES_MODEL)
    return folder


@pytest.fixture(scope="session")
def tiny_wan(tiny_wan_path):
    """The tiny Wan 2.1 T2V loaded by ComfyUI's own loader (a ModelPatcher)."""
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(tiny_wan_path))


def keeper_node(seen: dict, inputs: dict, keep) -> type:
    """A test output node: `keep(**inputs)` of each call stored in `seen` under the call's `label` input.
    inputs: name -> ComfyUI input type, all optional (a node wires only what its test needs)."""

    class Keeper:
        CATEGORY = "testing"
        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"label": ("STRING", {"default": ""})}, "optional": inputs}

        def run(self, label, **values):
            seen[label] = keep(**values)
            return {}

    return Keeper


class PromptRunner:
    """API prompts through ComfyUI's own PromptExecutor (validate_prompt, caching, hidden inputs), with the
    pack loaded by ComfyUI's custom-node loader, the tiny Wan as `tiny_wan2.1_t2v.safetensors` and the
    runner's TinyRandomConditioning standing in for the text encoder. One executor: its cache carries over
    from one run to the next, as in the ComfyUI app."""

    _nodes_loaded = False

    def __init__(self, tiny_wan_path, folder):
        sys.path.insert(0, str(REPO / "tools"))
        import asyncio

        import execution
        import folder_paths
        import nodes
        import run_workflow

        if not PromptRunner._nodes_loaded:  # once per process: loading imports the pack again
            folder_paths.add_model_folder_path("diffusion_models", str(tiny_wan_path.parent))
            (folder / "custom_nodes").mkdir(exist_ok=True)
            asyncio.run(run_workflow.load_nodes(nodes, folder / "custom_nodes"))  # built-in extras included
            PromptRunner._nodes_loaded = True
        self._execution, self._run_workflow, self._asyncio = execution, run_workflow, asyncio
        self.executor = run_workflow.prompt_executor(execution, run_workflow.ServerStub())
        self.runs = 0

    def run(self, prompt: dict):
        """Validates and executes `prompt`; returns the executor (history_result, success)."""
        self.runs += 1
        prompt_id = f"test-{self.runs}"
        valid, error, outputs, node_errors = self._asyncio.run(self._execution.validate_prompt(prompt_id, prompt, None))
        assert valid, (error, node_errors)
        self.executor.execute(prompt, prompt_id, {}, outputs)
        assert self.executor.success, [m for m in self.executor.status_messages if m[0] == "execution_error"]
        return self.executor


def tiny_prompt(bsa_inputs: dict | None = None, steps: int = 2, seed: int = 0) -> dict:
    """UNETLoader -> BSA -> KSampler on the tiny Wan (grid 5x8x8 = 320 tokens); node ids as strings. Without
    bsa_inputs the BSA node is left out (the dense reference)."""
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan2.1_t2v.safetensors",
                                                     "weight_dtype": "default"}},
        "3": {"class_type": "TinyRandomConditioning", "inputs": {"seed": 1, "tokens": 16, "width": 4096}},
        "4": {"class_type": "TinyRandomConditioning", "inputs": {"seed": 2, "tokens": 16, "width": 4096}},
        "5": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 128, "height": 128, "length": 17,
                                                                  "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0] if bsa_inputs is not None else ["1", 0], "seed": seed, "steps": steps, "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["5", 0], "denoise": 1.0}},
    }
    if bsa_inputs is not None:
        prompt["2"] = {"class_type": "BSASparseAttention", "inputs": {"model": ["1", 0], **bsa_inputs}}
    return prompt


def apply_bsa(model, config, **settings):
    """bsa_core.patch.apply_bsa on every step and sequence length: the recommended start_percent and
    min_tokens would leave the tiny models' few hundred tokens and first steps dense."""
    from comfyui_bsa.bsa_core.patch import apply_bsa as apply
    return apply(model, config, **{"start_percent": 0.0, "min_tokens": 0, **settings})
