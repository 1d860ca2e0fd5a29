"""The demo's workflow (workflows/tiny_wan_shapes_t2v_api.json, what tools/demo.sh runs on the trained model)
through ComfyUI's PromptExecutor samples what training/ samples: SyntheticCaption gives the training
captions' embeddings, EmptyHunyuanLatentVideo + the Wan 2.1 latent format hand the model training/'s latents,
ModelSamplingSD3 + KSampler (euler, simple, cfg 1) are training's Euler sampler, and the BSA node's run is
what bench/bench_trained.py's node-window sampling runs. Here on a random stand-in under the model's name."""
import json
import pathlib
import sys

import pytest
import torch
from comfy_env import (PromptRunner, keeper_node, require_comfyui, shapes_stand_in_dir,  # noqa: F401  (fixtures)
                       tiny_wan_path)
from safetensors.torch import load_file

require_comfyui()

import nodes  # noqa: E402

from comfyui_bsa.bsa_core.config import RECOMMENDED  # noqa: E402
from comfyui_bsa.training import data  # noqa: E402
from comfyui_bsa.training.model import sample_euler, sampling_sigmas, wan_from_state_dict  # noqa: E402
from comfyui_bsa.training.sparsity import sampling_attention  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = pathlib.Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "tiny_wan_shapes_t2v_api.json"
SEEN = {}


CaptureLatent = keeper_node(SEEN, {"samples": ("LATENT",)}, lambda samples: samples["samples"].clone())


@pytest.fixture(scope="module")
def runner(tiny_wan_path, shapes_stand_in_dir, tmp_path_factory):
    import folder_paths
    runner = PromptRunner(tiny_wan_path, tmp_path_factory.mktemp("demo"))
    folder_paths.add_model_folder_path("diffusion_models", str(shapes_stand_in_dir), is_default=True)
    nodes.NODE_CLASS_MAPPINGS["CaptureLatent"] = CaptureLatent
    return runner


def test_shapes_workflow_samples_what_training_samples_dense_and_with_the_bsa_node(runner, shapes_stand_in_dir):
    sys.path.insert(0, str(REPO / "tools"))
    import comfy.latent_formats
    import run_workflow

    steps, frames, size = 4, 5, 16  # latents [1, 16, 5, 16, 16]: a 5x8x8 token grid; KSampler's simple
    # schedule is training's sampling_sigmas when 1000 is a multiple of the steps
    prompt = json.loads(WORKFLOW.read_text())
    inputs = {n["class_type"]: n["inputs"] for n in prompt.values()}
    inputs["EmptyHunyuanLatentVideo"].update(width=8 * size, height=8 * size, length=4 * (frames - 1) + 1)
    inputs["KSampler"]["steps"] = steps
    caption, seed = inputs["SyntheticCaption"]["caption"], inputs["KSampler"]["seed"]
    latents = {}
    for name, variant in run_workflow.variants(prompt).items():
        variant["90"] = {"class_type": "CaptureLatent", "inputs": {"label": name, "samples": ["6", 0]}}
        runner.run(variant)
        latents[name] = comfy.latent_formats.Wan21().process_in(SEEN[name])  # what the model saw: ours

    model = wan_from_state_dict(load_file(str(shapes_stand_in_dir / "tiny_wan_shapes_dense.safetensors")))
    shape = (1, data.LATENT_CHANNELS, frames, size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # comfy.sample.prepare_noise
    class_id = [data.caption(c) for c in range(data.num_classes())].index(caption)
    context = data.SyntheticVideos(1, 2, 1, inputs["SyntheticCaption"]["tokens"], 0).embeddings[[class_id]]
    sigmas = sampling_sigmas(steps, inputs["ModelSamplingSD3"]["shift"])
    dense = sample_euler(model, noise, context, sigmas)
    assert latents["dense"].shape == shape
    assert (latents["dense"] - dense).norm() / dense.norm() < 1e-4

    node = inputs["BSASparseAttention"]
    assert node["start_percent"] == 0.2 and node["threshold_mode"] == "statistical" and node["stat_lambda"] == 1.0
    options_at, run = sampling_attention(RECOMMENDED, model, shape, context.shape[1], sigmas, 3.0,
                                         node["start_percent"])
    sparse = sample_euler(model, noise, context, sigmas, options_at)
    assert run.stats.sparse_calls == 3 * 2  # steps 1..3 of 4, two blocks
    assert (latents["bsa"] - sparse).norm() / sparse.norm() < 1e-4
    assert (latents["bsa"] - dense).norm() / dense.norm() > 1e-3  # the node did run sparse
    assert (latents["bsa_1_1"] - dense).norm() / dense.norm() < 1e-4

    pixels = run_workflow.decode_synthetic(SEEN["dense"])
    assert pixels.shape == (1, 3, frames, 2 * size, 2 * size)
    assert torch.equal(pixels, data.decode(latents["dense"]).clamp(-1, 1))


def test_synthetic_caption_node_gives_the_training_embeddings():
    sys.path.insert(0, str(REPO / "tools"))
    import run_workflow

    node = run_workflow.synthetic_caption_node()
    captions = node.INPUT_TYPES()["required"]["caption"][0]
    assert captions == [data.caption(c) for c in range(data.num_classes())] and len(captions) == 12
    ((embedding, extra),), = node().encode("blue square", seed=0, tokens=8)
    assert extra == {} and torch.equal(embedding[0], data.SyntheticVideos(16, 32, 20000, 8, 0).embeddings[6])
