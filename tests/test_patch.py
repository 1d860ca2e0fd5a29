"""The model patch through ComfyUI's real attention hook, sampler and custom-node loader (CPU)."""
import asyncio
import json
import logging
import subprocess
import sys

import pytest
import torch

from comfy_env import REPO, apply_bsa, require_comfyui, tiny_wan, tiny_wan_path  # noqa: F401  (fixtures)

require_comfyui()

import comfy.ldm.modules.attention as comfy_attention  # noqa: E402
import nodes  # noqa: E402

from comfyui_bsa.bsa_core import BSAConfig  # noqa: E402
from comfyui_bsa.bsa_core import patch as patch_module  # noqa: E402
from comfyui_bsa.bsa_core.adapters import TokenLayout  # noqa: E402
from comfyui_bsa.bsa_core.patch import (OVERRIDE_KEY, BlockRanges, BSAOptions, BSARun, find_options,  # noqa: E402
                                        make_override, parse_block_ranges)
from comfyui_bsa.nodes.nodes_bsa_attention import BSASparseAttention  # noqa: E402

SPARSE = BSAConfig(keep_ratio=0.5, kv_threshold=0.9, threshold_mode="cumulative", pooled_remainder=False)
DENSE_SETTINGS = BSAConfig(keep_ratio=1.0, kv_threshold=1.0, threshold_mode="cumulative")
HEADS, HEAD_DIM = 2, 16


def bsa_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("[BSA]")]


def attention(run, q_len, k_len, previous=None, seed=0):
    """ComfyUI's attention with the override of `run` on the hook, as a sampling run installs it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, q_len, HEADS * HEAD_DIM, generator=g)
    k, v = (torch.randn(1, k_len, HEADS * HEAD_DIM, generator=g) for _ in range(2))
    opts = {OVERRIDE_KEY: make_override(run, previous)}
    return comfy_attention.optimized_attention(q, k, v, HEADS, transformer_options=opts), (q, k, v), opts


def a_run(grid=None, config=SPARSE) -> BSARun:
    run = BSARun(BSAOptions(config, 0.0, 1.0, BlockRanges(), 0))
    run.begin_forward(TokenLayout("test", grid, reason=None if grid else "unknown video grid"))
    return run


def recording_override(calls: list):
    """An attention override that was on the hook before ours: records its kwargs, runs func.
    A function, as ModelPatcher.clone deep-copies any other object in model_options."""
    def override(func, *args, **kwargs):
        calls.append(kwargs)
        return func(*args, **kwargs)
    return override


def test_patches_a_clone_only(tiny_wan):
    before = dict(tiny_wan.model_options["transformer_options"])
    patched = apply_bsa(tiny_wan, SPARSE)
    assert patched is not tiny_wan and patched.model is tiny_wan.model
    assert find_options(patched).config is SPARSE and find_options(tiny_wan) is None
    # the override exists only inside a sampling run, on the sampler's copy of the options
    assert OVERRIDE_KEY not in patched.model_options["transformer_options"]
    assert tiny_wan.model_options["transformer_options"] == before
    assert not tiny_wan.get_all_wrappers("outer_sample") and not tiny_wan.get_all_wrappers("apply_model")
    sample(patched)
    assert OVERRIDE_KEY not in patched.model_options["transformer_options"], "the run left its override behind"
    assert patched.model_options["transformer_options"].keys() == before.keys()


def test_chains_previous_override_and_forwards_kwargs(caplog):
    caplog.set_level(logging.INFO)
    calls = []
    out, (q, k, v), opts = attention(a_run(), 40, 12, previous=recording_override(calls))
    assert len(calls) == 1
    assert calls[0]["transformer_options"] is opts
    assert "_inside_attn_wrapper" in calls[0]
    expected = comfy_attention.attention_basic(q, k, v, HEADS, _inside_attn_wrapper=True)
    assert torch.allclose(out, expected, atol=1e-5)


def test_sampling_chains_an_override_set_before_bsa(tiny_wan, caplog):
    """An override already on the model (a node before BSA) gets the calls BSA leaves dense."""
    caplog.set_level(logging.INFO)
    base = tiny_wan.clone()
    calls = []
    base.model_options["transformer_options"][OVERRIDE_KEY] = recording_override(calls)
    sample(apply_bsa(base, SPARSE))
    assert len(calls) == last_run(caplog)["dense_calls"] == 4
    assert base.model_options["transformer_options"][OVERRIDE_KEY] is not None


@pytest.mark.parametrize("case,reason", [
    ("cross", "cross-attention"),
    ("no_grid", "unknown video grid"),
])
def test_dense_with_one_logged_reason(caplog, case, reason):
    caplog.set_level(logging.INFO)
    run = a_run(grid=(1, 5, 8) if case == "cross" else None)
    for _ in range(3):
        attention(run, 40, 12 if case == "cross" else 40)
    assert bsa_lines(caplog) == [f"[BSA] dense: {reason}"]


# ---- sampling the tiny Wan through the real sampler -----------------------------------------------

def sample(model, steps=2):
    """Latent of a short cfg run (cond and uncond batched); grid 5x8x8 = 320 tokens, 8 cubes."""
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 16, 4096, generator=g), {}]]
    negative = [[torch.randn(1, 16, 4096, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 16, 5, 16, 16)}
    return nodes.common_ksampler(model, 7, steps, 3.0, "euler", "simple", positive, negative, latent)[0]["samples"]


def last_run(caplog) -> dict:
    """The stats the patch logged at the end of the last sampling run."""
    return [r.bsa_run for r in caplog.records if hasattr(r, "bsa_run")][-1]


@pytest.fixture(scope="module")
def dense_latent(tiny_wan):
    return sample(tiny_wan)


def test_sampling_sparse_differs_from_dense(tiny_wan, dense_latent, caplog):
    caplog.set_level(logging.INFO)
    latent = sample(apply_bsa(tiny_wan, SPARSE))
    run = last_run(caplog)
    assert run["sparse_calls"] == 4, "2 steps x 2 blocks (cond and uncond batched)"
    assert run["dense_reasons"] == {"cross-attention": 4}
    assert run["kept_query_pct"] == pytest.approx(50.0)
    assert run["kept_kv_pct"] < 100.0
    assert not torch.allclose(latent, dense_latent, atol=1e-2)
    assert any(line.startswith("[BSA] run: 4 sparse / 4 dense calls") for line in bsa_lines(caplog))


def test_sampling_at_one_one_matches_dense(tiny_wan, dense_latent, caplog):
    caplog.set_level(logging.INFO)
    latent = sample(apply_bsa(tiny_wan, DENSE_SETTINGS))
    run = last_run(caplog)
    assert run["sparse_calls"] == 4 and run["kept_kv_pct"] == pytest.approx(100.0)
    assert torch.allclose(latent, dense_latent, atol=1e-4, rtol=1e-4)


def test_sampling_window_and_dense_blocks(tiny_wan, caplog):
    """4 steps, start_percent 0.5: steps 0 and 1 dense, steps 2 (exactly on 0.5) and 3 sparse, block 1 always
    dense; decided per sampler step from its schedule (no sigma read back per call)."""
    caplog.set_level(logging.INFO)
    sample(apply_bsa(tiny_wan, SPARSE, start_percent=0.5, dense_blocks={1}), steps=4)
    run = last_run(caplog)
    reasons = run["dense_reasons"]
    assert reasons["sigma outside start_percent..end_percent"] == 2 * 2
    assert reasons["block listed in dense_blocks"] == 2
    assert run["sparse_calls"] == 2


@pytest.mark.parametrize("sampler", ["euler", "dpm_fast", "dpm_adaptive"])
def test_window_follows_each_calls_sigma_whatever_the_samplers_callbacks_count(tiny_wan, sampler):
    """dpm_fast and dpm_adaptive number their callbacks by their own iterations, not the schedule's steps: there
    each model call decides by its own sigma. A self-attention call runs sparse exactly when its model call's
    sigma lies in the window (end_percent 0.5 here)."""
    self_dense = {}  # model call sigma -> self-attention calls that stayed dense (cross-attention always does)

    def previous(func, q, k, *args, **kwargs):
        sigma = round(float(kwargs["transformer_options"]["sigmas"].max()), 6)
        self_dense[sigma] = self_dense.get(sigma, 0) + (q.shape[1] == k.shape[1])
        return func(q, k, *args, **kwargs)

    base = tiny_wan.clone()
    base.model_options["transformer_options"][OVERRIDE_KEY] = previous
    model = apply_bsa(base, SPARSE, start_percent=0.0, end_percent=0.5)
    sigma_end = float(model.get_model_object("model_sampling").percent_to_sigma(0.5))
    g = torch.Generator().manual_seed(0)
    positive, negative = ([[torch.randn(1, 16, 4096, generator=g), {}]] for _ in range(2))
    nodes.common_ksampler(model, 7, 10, 3.0, sampler, "simple", positive, negative,
                          {"samples": torch.zeros(1, 16, 5, 16, 16)})
    wrong = {sigma: n for sigma, n in self_dense.items() if (n == 0) != (sigma >= sigma_end * (1 - 1e-4))}
    assert len(self_dense) > 3 and not wrong, (sigma_end, wrong)


def test_vace_blocks_take_no_block_number(caplog):
    """Wan VACE runs its vace_blocks between the numbered blocks, on control latents as long as the video: their
    attention neither shifts dense_blocks (0-3 = all 4 blocks of this model) nor counts as a block, and follows
    the sampling setting (sparse)."""
    import comfy.ops
    import comfy.sd
    from comfy.ldm.wan.model import VaceWanModel
    torch.manual_seed(0)
    vace = VaceWanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=256, ffn_dim=512,
                        freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=4, vace_layers=2,
                        vace_in_dim=96, operations=comfy.ops.manual_cast, device="cpu", dtype=torch.float32)
    for parameter in vace.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    model = comfy.sd.load_diffusion_model_state_dict(vace.state_dict())
    assert len(model.get_model_object("diffusion_model").vace_blocks) == 2
    caplog.set_level(logging.INFO)
    sample(apply_bsa(model, SPARSE, dense_blocks="0-3"), steps=2)
    run = last_run(caplog)
    assert run["dense_reasons"]["block listed in dense_blocks"] == 2 * 4 and run["sparse_calls"] == 2 * 2, run
    assert not any("dense_blocks lists block" in line for line in bsa_lines(caplog))
    caplog.clear()
    sample(apply_bsa(model, SPARSE, dense_blocks="4"), steps=2)  # past the model's 4 blocks (0-3)
    assert last_run(caplog)["sparse_calls"] == 2 * 6
    assert any("dense_blocks lists block 4, but this model has 4 blocks" in line for line in bsa_lines(caplog))


def test_dense_blocks_past_the_model_warn(tiny_wan, caplog):
    caplog.set_level(logging.INFO)
    sample(apply_bsa(tiny_wan, SPARSE, dense_blocks="1-10000000"))
    warnings = [r.getMessage() for r in caplog.records  # ours: ComfyUI may warn of an earlier test's model
                if r.levelno == logging.WARNING and r.getMessage().startswith("[BSA]")]
    assert warnings == ["[BSA] dense_blocks lists block 10000000, but this model has 2 blocks (0-1): blocks past "
                        "the last one are ignored"]
    assert last_run(caplog)["dense_reasons"]["block listed in dense_blocks"] == 2


def test_min_tokens_keeps_short_sequences_dense(tiny_wan, caplog):
    caplog.set_level(logging.INFO)
    sample(apply_bsa(tiny_wan, SPARSE, min_tokens=1000))
    run = last_run(caplog)
    assert run["sparse_calls"] == 0 and run["dense_reasons"]["fewer than min_tokens=1000 tokens"] == 4


# ---- node inputs ----------------------------------------------------------------------------------

NODE_INPUTS = dict(threshold_mode="cumulative", stat_lambda=1.0, kv_threshold=0.9, keep_ratio=0.5, cube_size="4x4x4",
                   start_percent=0.0, end_percent=1.0)


@pytest.mark.parametrize("bad,name", [
    ({"dense_blocks": "0,a"}, "dense_blocks"),
    ({"dense_blocks": "1;2"}, "dense_blocks"),
    ({"cube_size": "4x4"}, "cube_size"),
    ({"cube_size": "0x4x4"}, "cube_size"),
    ({"cube_size": "1x1x1"}, "cube_size"),
    ({"cube_size": "64x64x64"}, "cube_size"),
    ({"dense_blocks": "5-3"}, "dense_blocks"),
    ({"start_percent": 0.8, "end_percent": 0.5}, "start_percent"),
    ({"keep_ratio": 0.0}, "keep_ratio"),
    ({"threshold_mode": "topk"}, "threshold_mode"),
    ({"min_blocks": 0}, "min_blocks"),
    ({"min_tokens": -1}, "min_tokens"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_settings_name_the_input(tiny_wan, bad, name):
    with pytest.raises(ValueError, match=name):
        BSASparseAttention.execute(tiny_wan, **{**NODE_INPUTS, **bad})


def test_node_maps_inputs(tiny_wan):
    out = BSASparseAttention.execute(tiny_wan, **NODE_INPUTS, dense_blocks=" 0, 2-3 ", min_tokens=5,
                                     pooled_remainder=False)
    options = find_options(out.result[0])
    assert options.dense_blocks == BlockRanges(((0, 0), (2, 3))) and options.min_tokens == 5
    assert options.config == SPARSE
    blocks = parse_block_ranges("0-10000000")
    assert blocks.ranges == ((0, 10000000),) and 9999999 in blocks and 10000001 not in blocks  # never expanded
    assert parse_block_ranges("").ranges == () and 0 not in parse_block_ranges("")


def test_defaults_come_from_one_place(tiny_wan):
    """BSAConfig(), apply_bsa's keywords, the node's schema and execute all give RECOMMENDED."""
    import inspect

    from comfyui_bsa.bsa_core.config import RECOMMENDED, RECOMMENDED_PATCH
    assert BSAConfig() == RECOMMENDED
    schema = {i.id: i.default for i in BSASparseAttention.GET_SCHEMA().inputs if i.id != "model"}
    expected = {**{f: getattr(RECOMMENDED, f) for f in ("threshold_mode", "stat_lambda", "kv_threshold",
                                                       "keep_ratio", "min_blocks", "pooled_remainder")},
                "cube_size": "x".join(map(str, RECOMMENDED.cube_size)),
                **{f: getattr(RECOMMENDED_PATCH, f) for f in ("start_percent", "end_percent", "dense_blocks",
                                                             "min_tokens")}}
    assert schema == expected
    node_defaults = {name: p.default for name, p in inspect.signature(BSASparseAttention.execute).parameters.items()
                     if name != "model"}
    assert node_defaults == expected
    options = find_options(BSASparseAttention.execute(tiny_wan).result[0])
    assert options.config == RECOMMENDED
    api = find_options(patch_module.apply_bsa(tiny_wan, BSAConfig()))
    assert (api.start_percent, api.end_percent, api.min_tokens) == (options.start_percent, options.end_percent,
                                                                    options.min_tokens) == (0.2, 1.0, 8192)


def test_every_input_has_a_tooltip():
    schema = BSASparseAttention.GET_SCHEMA()
    assert all(i.tooltip for i in schema.inputs)


def test_comfyui_loader_registers_the_node(tmp_path):
    link = tmp_path / "comfyui-bsa"
    link.symlink_to(REPO, target_is_directory=True)
    assert asyncio.run(nodes.load_custom_node(str(link)))
    node = nodes.NODE_CLASS_MAPPINGS["BSASparseAttention"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["BSASparseAttention"] == "BSA Sparse Attention"
    assert list(node.INPUT_TYPES()["required"]) == ["model", "threshold_mode", "stat_lambda", "kv_threshold",
                                                     "keep_ratio", "cube_size", "start_percent", "end_percent"]


def test_runner_prints_times_and_sparsity(tmp_path):
    """The tiny workflow with an explicit keep_ratio of 0.5 (the node's default keeps every query)."""
    prompt = json.loads((REPO / "workflows" / "tiny_wan_t2v_api.json").read_text())
    (bsa,) = [n for n in prompt.values() if n["class_type"] == "BSASparseAttention"]
    bsa["inputs"]["keep_ratio"] = 0.5
    workflow = tmp_path / "tiny_wan_t2v_half_queries_api.json"
    workflow.write_text(json.dumps(prompt))
    result = subprocess.run([sys.executable, str(REPO / "tools" / "run_workflow.py"), "--workflow", str(workflow),
                             "--width", "128", "--height", "128", "--length", "17", "--steps", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if " wall " in line}
    assert set(lines) == {"dense", "bsa_1_1", "bsa"}, result.stdout
    assert "kept queries 50.0%" in lines["bsa"] and "4 sparse / 4 dense calls" in lines["bsa"]
    assert float(lines["bsa_1_1"].split("dense|")[1].split()[0]) < 1e-3


def test_ui_workflow_widgets_follow_the_schema(tiny_wan):
    """The template's widget values, read in schema order, are valid node inputs."""
    workflow = json.loads((REPO / "workflows" / "wan21_t2v_1.3B_bsa.json").read_text())
    (node,) = [n for n in workflow["nodes"] if n["type"] == "BSASparseAttention"]
    types = BSASparseAttention.INPUT_TYPES()
    widgets = [name for name in [*types["required"], *types.get("optional", {})] if name != "model"]
    assert len(node["widgets_values"]) == len(widgets)
    BSASparseAttention.execute(tiny_wan, **dict(zip(widgets, node["widgets_values"])))
    linked = {(link[3], link[4]) for link in workflow["links"]}
    assert all((n["id"], slot) in linked for n in workflow["nodes"] for slot, i in enumerate(n["inputs"]))


def test_a_key_mask_is_read_back_once_per_mask_tensor(monkeypatch):
    """HunyuanVideo passes one text padding mask to every block: its plan (the only host read of the masked
    path) is worked out on the first call; the calls after it reuse the plan and equal masked dense on the
    text rows."""
    plans = []
    original = patch_module.key_mask_plan
    monkeypatch.setattr(patch_module, "key_mask_plan", lambda *args: plans.append(args) or original(*args))
    grid, n_text, n_hidden = (3, 8, 8), 20, 7
    tokens = 3 * 8 * 8 + n_text
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, tokens, HEADS * HEAD_DIM, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 1, tokens)
    mask[..., -n_hidden:] = float("-inf")
    run = BSARun(BSAOptions(SPARSE, 0.0, 1.0, BlockRanges(), 0))
    opts = {OVERRIDE_KEY: make_override(run, None)}
    for _ in range(3):
        run.begin_forward(TokenLayout("test", grid, 0, n_text))
        out = comfy_attention.optimized_attention(q, k, v, HEADS, mask=mask, transformer_options=opts)
    assert len(plans) == 1 and run.stats.sparse_calls == 3
    heads = [t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for t in (q, k, v)]
    dense = torch.nn.functional.scaled_dot_product_attention(*heads, attn_mask=mask)
    text = out.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)[..., -n_text:, :]
    torch.testing.assert_close(text, dense[..., -n_text:, :], atol=1e-5, rtol=1e-5)
