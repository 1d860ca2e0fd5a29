"""RIFLEx: the period table and k pick, the frequency formula, the embedder patch against ComfyUI's own
EmbedND on the position ids Wan builds, the clone-only contract, and a tiny Wan sampling 2x its training
length through RIFLEx + BSA on CPU."""
import logging
import math
import pathlib
import types

import pytest
import torch

from comfy_env import REPO, require_comfyui, tiny_wan, tiny_wan_path  # noqa: F401  (fixtures)
from comfyui_bsa.bsa_core.riflex import (RIFLExRope, apply_riflex, intrinsic_k, latent_length, riflex_frequency,
                                         riflex_report)

WAN_AXES = [44, 42, 42]  # Wan 2.1 1.3B/14B: head dim 128 -> [d - 4 (d // 6), 2 (d // 6), 2 (d // 6)]


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI in CPU mode via the shared helper; only the tests that need it skip without a checkout."""
    require_comfyui()
    import comfy.ldm.flux.layers
    import comfy.ldm.wan.model
    import comfy.model_patcher
    return comfy


def wan_position_ids(comfy, t, h=4, w=4):
    """The ids WanModel.rope_encode hands its embedder for a latent of t x h x w (patch 1x2x2)."""
    recorded = []
    recorder = types.SimpleNamespace(patch_size=(1, 2, 2), rope_embedder=lambda ids: recorded.append(ids) or ids)
    comfy.ldm.wan.model.WanModel.rope_encode(recorder, t, h, w, dtype=torch.float32)
    return recorded[0]


def rotation(angle):
    return torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], -1).unflatten(-1, (2, 2))


# ---------------------------------------------------------------- periods, k, formula (no ComfyUI)

@pytest.mark.parametrize("axis_dim,theta,train,k", [(16, 256.0, 33, 4), (16, 10000.0, 13, 2), (44, 10000.0, 21, 4)],
                         ids=["hunyuanvideo-k4", "cogvideox5b-k2", "wan21-k4"])
def test_auto_k_matches_known_families(axis_dim, theta, train, k):
    report = riflex_report(axis_dim, theta, 2 * train, train)
    assert report.k == k == intrinsic_k(report.periods, train)
    assert report.periods[k - 1] >= train > report.periods[k - 2]


def test_periods_repetitions_and_formula():
    report = riflex_report(44, 10000.0, 42, 21)
    for j, period in enumerate(report.periods):
        assert period == pytest.approx(2 * math.pi * 10000.0 ** (2 * j / 44))
        assert report.repetitions[j] == pytest.approx(42 / period)
    assert report.new_frequency == pytest.approx(0.9 * 2 * math.pi / 42) == riflex_frequency(42)
    assert riflex_frequency(42, safety=1.0) == pytest.approx(2 * math.pi / 42)
    assert 2 * math.pi / report.new_frequency > 42  # the target length fits inside one new period


@pytest.mark.parametrize("length,k", [(21, 0), (22, 0), (41, 6)], ids=["train-length", "below-Nk", "wan-k6-at-41"])
def test_no_change_when_length_within_period(length, k):
    report = riflex_report(44, 10000.0, length, 21, k)
    assert not report.applied and length <= report.period_k
    assert "RoPE unchanged" in str(report)


@pytest.mark.parametrize("kwargs,name", [
    (dict(axis_dim=43), "axis_dim"), (dict(theta=1.0), "theta"), (dict(length=0), "length"),
    (dict(train_length=0), "train_length"), (dict(k=23), "k"), (dict(k=-1), "k"), (dict(safety=0.0), "safety")])
def test_invalid_values_name_the_input(kwargs, name):
    args = dict(axis_dim=44, theta=10000.0, length=42, train_length=21) | kwargs
    with pytest.raises(ValueError, match=f"^{name} "):
        riflex_report(**args)


def test_latent_length_needs_a_video_latent():
    assert latent_length(torch.zeros(1, 16, 41, 8, 8)) == 41
    with pytest.raises(ValueError, match="^latent "):
        latent_length(torch.zeros(1, 4, 64, 64))


# ---------------------------------------------------------------- embedder patch against ComfyUI's EmbedND

@pytest.mark.parametrize("length,k", [(42, 0), (60, 6), (30, 2)], ids=["L42-auto", "L60-k6", "L30-k2"])
def test_only_component_k_changes(comfy, length, k):
    embed = comfy.ldm.flux.layers.EmbedND(dim=128, theta=10000.0, axes_dim=WAN_AXES)
    ids = wan_position_ids(comfy, length)
    report = riflex_report(44, 10000.0, length, 21, k)
    before = embed(ids)
    after = RIFLExRope(embed, report.k - 1, report.new_frequency)(ids)
    assert after.shape == before.shape == (1, 1, length * 4, 64, 2, 2)
    others = [j for j in range(64) if j != report.k - 1]
    assert torch.equal(after[..., others, :, :], before[..., others, :, :])
    expected = rotation(ids[..., 0].double() * report.new_frequency).float()
    torch.testing.assert_close(after[:, 0, :, report.k - 1], expected, rtol=0, atol=1e-6)
    original = rotation(ids[..., 0].double() * 10000.0 ** (-2 * (report.k - 1) / 44)).float()
    torch.testing.assert_close(before[:, 0, :, report.k - 1], original, rtol=0, atol=1e-5)
    assert not torch.allclose(after[:, 0, :, report.k - 1], original, atol=1e-3)


def test_patched_wan_rope_encode(comfy, tiny_wan):
    """Object patch applied by ComfyUI's own patch/unpatch: WanModel.rope_encode changes in component k only,
    and goes back to the original after unpatching."""
    patched, report = apply_riflex(tiny_wan, 42)
    diffusion_model = tiny_wan.model.diffusion_model
    before = diffusion_model.rope_encode(42, 8, 8)
    patched.patch_model()
    try:
        assert isinstance(diffusion_model.rope_embedder, RIFLExRope)
        during = diffusion_model.rope_encode(42, 8, 8)
    finally:
        patched.unpatch_model()
    after = diffusion_model.rope_encode(42, 8, 8)
    changed = (during != before).any(dim=(0, 1, 2, 4, 5)).nonzero().flatten().tolist()  # [1, N, 1, D/2, 2, 2]
    assert changed == [report.k - 1]
    assert torch.equal(after, before)


# ---------------------------------------------------------------- clone-only contract

def test_original_model_untouched(comfy, tiny_wan):
    original_embedder = tiny_wan.get_model_object("diffusion_model.rope_embedder")
    patched, report = apply_riflex(tiny_wan, 41)
    assert report.applied and report.k == 4 and patched is not tiny_wan
    assert "diffusion_model.rope_embedder" not in tiny_wan.object_patches
    assert tiny_wan.get_model_object("diffusion_model.rope_embedder") is original_embedder
    new = patched.get_model_object("diffusion_model.rope_embedder")
    assert isinstance(new, RIFLExRope) and new.inner is original_embedder
    again, _ = apply_riflex(patched, 60)  # re-applying replaces the patch instead of stacking it
    assert again.get_model_object("diffusion_model.rope_embedder").inner is original_embedder


@pytest.mark.parametrize("length,k", [(21, 0), (41, 6)], ids=["train-length", "k6-at-41"])
def test_no_op_returns_the_input_model(comfy, tiny_wan, caplog, length, k):
    with caplog.at_level(logging.INFO):
        model, report = apply_riflex(tiny_wan, length, k)
    assert model is tiny_wan and not report.applied
    assert any(r.getMessage().startswith("[RIFLEx] no change") for r in caplog.records)


def test_model_errors(comfy, tiny_wan):
    with pytest.raises(ValueError, match="^latent_frames "):
        apply_riflex(tiny_wan, 0)
    with pytest.raises(ValueError, match="^train_latent_frames "):
        apply_riflex(tiny_wan, 41, train_latent_frames=-1)
    with pytest.raises(ValueError, match="^k "):
        apply_riflex(tiny_wan, 41, k=40)
    not_video = types.SimpleNamespace(model=types.SimpleNamespace(model_config=object()),
                                      get_model_object=lambda name: torch.nn.Module())
    with pytest.raises(ValueError, match="^model: RIFLEx supports Wan and HunyuanVideo"):
        apply_riflex(not_video, 41)


def test_hunyuanvideo_pe_embedder(comfy):
    """HunyuanVideo's embedder (pe_embedder, theta 256, axes [16, 56, 56]) on a stand-in model object."""
    base = torch.nn.Module()
    base.diffusion_model = torch.nn.Module()
    base.diffusion_model.pe_embedder = comfy.ldm.flux.layers.EmbedND(dim=128, theta=256, axes_dim=[16, 56, 56])
    base.diffusion_model.patch_size = [1, 2, 2]
    base.model_config = type("HunyuanVideo", (), {})()
    model = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    patched, report = apply_riflex(model, 66)
    assert report.k == 4 and report.period_k == pytest.approx(50.27, abs=0.01)
    assert isinstance(patched.get_model_object("diffusion_model.pe_embedder"), RIFLExRope)
    assert "diffusion_model.pe_embedder" not in model.object_patches
    short, short_report = apply_riflex(model, 33)
    assert short is model and not short_report.applied


# ---------------------------------------------------------------- the node and a tiny Wan at 2x length

def test_node_schema_has_tooltips(comfy):
    from comfyui_bsa.nodes.nodes_riflex import RIFLExExtend
    schema = RIFLExExtend.define_schema()
    assert schema.node_id == "RIFLExExtend"
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)


def test_tiny_wan_samples_2x_frames_with_riflex_and_bsa(comfy, tiny_wan, caplog):
    """161 frames (41 latent frames, ~2x Wan's 81) through RIFLExExtend -> BSASparseAttention -> KSampler:
    RIFLEx changes the result, BSA runs sparse, and the unpatched model samples exactly as before."""
    import nodes
    from comfyui_bsa.nodes.nodes_bsa_attention import BSASparseAttention
    from comfyui_bsa.nodes.nodes_riflex import RIFLExExtend

    samples = {"samples": torch.zeros(1, 16, 41, 8, 8)}  # what EmptyHunyuanLatentVideo gives for 64x64x161
    generator = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 16, 4096, generator=generator), {}]]
    negative = [[torch.randn(1, 16, 4096, generator=generator), {}]]

    def sample(model):
        return nodes.common_ksampler(model, 0, 2, 5.0, "euler", "simple", positive, negative, samples)[0]["samples"]

    dense = sample(tiny_wan)
    with caplog.at_level(logging.INFO):
        extended = RIFLExExtend.execute(tiny_wan, 1, 0, latent=samples).result[0]
        sparse = BSASparseAttention.execute(extended, keep_ratio=0.5, kv_threshold=0.9, cube_size="4x4x4",
                                            threshold_mode="cumulative", start_percent=0.0, end_percent=1.0,
                                            min_tokens=0).result[0]
        out = sample(sparse)
    assert out.shape == (1, 16, 41, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out, dense, atol=1e-3)
    assert any("[RIFLEx] lowered" in r.getMessage() and "k=4" in r.getMessage() for r in caplog.records)
    runs = [r.bsa_run for r in caplog.records if hasattr(r, "bsa_run")]
    assert runs and runs[-1]["sparse_calls"] > 0
    assert torch.equal(sample(tiny_wan), dense)


# ---------------------------------------------------------------- the example workflow

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """UI-format graph -> API prompt, reading widgets_values in each node's schema order (as the frontend
    does); fails when a node has more or fewer widget values than its schema has widgets."""
    sources = {link[0]: [str(link[1]), link[2]] for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] == "Note":
            continue
        links = {i["name"]: i["link"] for i in node["inputs"] if i["link"] is not None}
        values = list(node["widgets_values"])
        spec = node_classes[node["type"]].INPUT_TYPES()
        inputs = {}
        for name, (kind, *options) in [*spec["required"].items(), *spec.get("optional", {}).items()]:
            if name in links:
                inputs[name] = sources[links[name]]
            elif isinstance(kind, list) or kind in WIDGET_TYPES:
                assert values, f"{node['type']}: no widget value left for {name}"
                inputs[name] = values.pop(0)
                if options and options[0].get("control_after_generate"):
                    values.pop(0)
        assert not values, f"{node['type']}: widget values left over: {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_example_workflow_is_valid(comfy, tmp_path):
    """workflows/wan21_long_video_riflex_bsa.json through ComfyUI's own prompt validation, with empty
    stand-in files for the three model files (validation checks names, not contents)."""
    import asyncio
    import json
    import sys

    import execution
    import folder_paths
    import nodes

    # nodes.py puts comfy/ first on sys.path, whose utils.py then hides ComfyUI's utils package that
    # nodes_images -> server needs; main.py avoids it by importing the package first, so do the same.
    sys.path.insert(0, str(require_comfyui()))
    try:
        import utils.install_util  # noqa: F401
    finally:
        sys.path.pop(0)
    extras = pathlib.Path(nodes.__file__).parent / "comfy_extras"
    for extra in ("nodes_hunyuan.py", "nodes_model_advanced.py", "nodes_images.py"):
        asyncio.run(nodes.load_custom_node(str(extras / extra), module_parent="comfy_extras"))
    from comfyui_bsa.nodes import BSAExtension
    for node_class in asyncio.run(BSAExtension().get_node_list()):
        nodes.NODE_CLASS_MAPPINGS.setdefault(node_class.define_schema().node_id, node_class)

    workflow = json.loads((REPO / "workflows" / "wan21_long_video_riflex_bsa.json").read_text())
    for folder, name in (("diffusion_models", "wan2.1_t2v_1.3B_fp16.safetensors"),
                         ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
                         ("vae", "wan_2.1_vae.safetensors")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).touch()
        folder_paths.add_model_folder_path(folder, str(tmp_path / folder))
    prompt = ui_to_api(workflow, nodes.NODE_CLASS_MAPPINGS)
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("riflex", prompt, None))
    assert valid, (error, node_errors)
    riflex = next(p["inputs"] for p in prompt.values() if p["class_type"] == "RIFLExExtend")
    latent = next(p["inputs"] for p in prompt.values() if p["class_type"] == "EmptyHunyuanLatentVideo")
    assert riflex["latent"] and (latent["length"] - 1) // 4 + 1 == riflex["latent_frames"] == 41
