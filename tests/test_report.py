"""The BSA Report node: recording only when a report is connected, the per-(step, layer) table against the
run summary and each call's own numbers, the heat-map against the reference selection, and a full run of
BSA -> KSampler -> BSA Report through ComfyUI's executor (CPU, tiny Wan)."""
import asyncio
import json
import logging
import sys

import pytest
import torch

from comfy_env import REPO, apply_bsa, require_comfyui, tiny_wan, tiny_wan_path  # noqa: F401  (fixtures)

require_comfyui()

import nodes  # noqa: E402

import comfyui_bsa.bsa_core.patch as patch_module  # noqa: E402
import comfyui_bsa.bsa_core.report as report_module  # noqa: E402
from comfyui_bsa.bsa_core import BSAConfig, cube_layout  # noqa: E402
from comfyui_bsa.bsa_core.patch import bsa_report, find_options  # noqa: E402
from comfyui_bsa.bsa_core.reference import bsa_attention_reference  # noqa: E402
from comfyui_bsa.bsa_core.report import (KEPT_RGB, PLOT_MARGINS, SKIPPED_RGB, ReportSpec,  # noqa: E402
                                         find_report_specs, heatmap_image, remember_linked_values)
from comfyui_bsa.nodes.nodes_bsa_attention import BSASparseAttention  # noqa: E402
from comfyui_bsa.nodes.nodes_bsa_report import BSAReport  # noqa: E402

SPARSE = BSAConfig(keep_ratio=0.5, kv_threshold=0.9, threshold_mode="cumulative", pooled_remainder=False)
STEPS, BLOCKS, HEADS = 2, 2, 2  # the tiny Wan: 2 blocks of 2 heads; cond and uncond batched into one call
NODE = dict(keep_ratio=0.5, kv_threshold=0.9, cube_size="4x4x4", threshold_mode="cumulative",
            start_percent=0.0, end_percent=1.0, min_tokens=0, pooled_remainder=False)


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread):
    yield


def sample(model, steps=STEPS):
    """A short cfg run; grid 5x8x8 = 320 tokens, 8 cubes of 4x4x4."""
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 16, 4096, generator=g), {}]]
    negative = [[torch.randn(1, 16, 4096, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 16, 5, 16, 16)}
    return nodes.common_ksampler(model, 7, steps, 3.0, "euler", "simple", positive, negative, latent)[0]


def table_rows(text: str) -> list[dict]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "sigma"]) + 1
    rows = []
    for line in lines[start:]:
        if line.startswith("total:"):
            break
        step, sigma, layer, mode, kept_q, kept_kv, ms, calls = line.split()[:8]
        rows.append(dict(step=int(step), sigma=float(sigma), layer=int(layer), mode=mode, kept_q=float(kept_q),
                         kept_kv=float(kept_kv), ms=float(ms), calls=int(calls)))
    return rows


# ---- which BSA node records ------------------------------------------------------------------------

def test_prompt_walk_finds_the_reports_on_a_branch(monkeypatch):
    from comfyui_bsa.bsa_core import report
    monkeypatch.setattr(report, "_linked_values", {})
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "x"}},
        "2": {"class_type": "BSASparseAttention", "inputs": {"model": ["1", 0], "keep_ratio": 0.5}},
        "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["2", 0], "lora_name": "l"}},
        "4": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["3", 0], "shift": 8.0}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "latent_image": ["9", 0]}},
        "6": {"class_type": "BSAReport", "inputs": {"model": ["4", 0], "samples": ["5", 0], "step": 3,
                                                    "layer": 7, "head": ["11", 0]}},
        # unrelated: another BSA node's report, and a report whose model is not patched by "2"
        "7": {"class_type": "BSASparseAttention", "inputs": {"model": ["1", 0]}},
        "8": {"class_type": "BSAReport", "inputs": {"model": ["7", 0], "samples": ["5", 0], "step": 1}},
        "10": {"class_type": "BSAReport", "inputs": {"model": ["1", 0], "samples": ["5", 0], "step": 2}},
        "11": {"class_type": "PrimitiveInt", "inputs": {"value": 1}},
        # a second branch of node 2 with its own sampler and report
        "12": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": 3.0}},
        "13": {"class_type": "KSampler", "inputs": {"model": ["12", 0]}},
        "14": {"class_type": "BSAReport", "inputs": {"model": ["12", 0], "samples": ["13", 0], "layer": 1}},
        "15": {"class_type": "BSAReport", "inputs": {"model": ["4", 0], "samples": ["5", 0], "head": 1,
                                                     "layer": ["16", 0]}},
        "16": {"class_type": "MathExpression", "inputs": {"expression": "a + 1", "a": 2}},
    }
    from_primitive = ReportSpec(step=3, layer=7, head=1)  # head linked to PrimitiveInt 1: its value
    other_link = ReportSpec(head=1)  # layer linked to a node computing it: the default (known only later)
    assert find_report_specs(prompt, "2", "5") == (other_link, from_primitive), "both reports of branch 5"
    assert find_report_specs(prompt, "2", "13") == (ReportSpec(layer=1),), "only branch 13's report"
    assert find_report_specs(prompt, "2") == (ReportSpec(layer=1), other_link, from_primitive)
    assert find_report_specs(prompt, "7") == (ReportSpec(step=1),)
    assert find_report_specs(prompt, "7", "5") == (), "node 7's model does not reach sampler 5"
    assert find_report_specs({k: v for k, v in prompt.items() if k not in ("6", "8", "14", "15")}, "2") == (), \
        "a report reaching node 2 only through its samples (the sampler) reads another model"
    assert find_report_specs(None, "2") == () and find_report_specs(prompt, None) == ()
    # once Report 15 has run with the computed layer (2 + 1), the next run records it: no endless "next run"
    remember_linked_values(prompt, "15", ReportSpec(head=1, layer=3))
    remember_linked_values(prompt, "6", ReportSpec(step=9, layer=9, head=9))  # no computed link: nothing kept
    assert find_report_specs(prompt, "2", "5") == (ReportSpec(layer=3, head=1), from_primitive)
    cyclic = {"1": {"class_type": "A", "inputs": {"x": ["2", 0]}}, "2": {"class_type": "A", "inputs": {"x": ["1", 0]}},
              "3": {"class_type": "BSAReport", "inputs": {"model": ["1", 0]}}}
    assert find_report_specs(cyclic, "9") == ()


def test_node_passes_its_id_and_records_nothing_by_itself(tiny_wan):
    hidden = type("Hidden", (), {"unique_id": "2"})()
    node = type("Clone", (BSASparseAttention,), {"hidden": hidden})
    options = find_options(node.execute(tiny_wan, **NODE).result[0])
    assert options.node_id == "2" and options.record == ()
    assert find_options(BSASparseAttention.execute(tiny_wan, **NODE).result[0]).node_id is None
    assert find_options(tiny_wan) is None


# ---- recording -------------------------------------------------------------------------------------

@pytest.fixture
def op_calls(monkeypatch):
    """Every sparse call's q, k, v, grid and returned kept fractions, captured around bsa_attention_op."""
    calls = []
    original = patch_module.bsa_attention_op

    def capturing(q, k, v, grid, config, **kwargs):
        out, kept_q, kept_kv = original(q, k, v, grid, config, **kwargs)
        calls.append(dict(q=q.clone(), k=k.clone(), v=v.clone(), grid=grid, n_prefix=kwargs["n_prefix"],
                          kept_q=float(kept_q), kept_kv=float(kept_kv)))
        return out, kept_q, kept_kv

    monkeypatch.setattr(patch_module, "bsa_attention_op", capturing)
    return calls


@pytest.mark.parametrize("spec", [ReportSpec(-1, 0, 0), ReportSpec(0, 1, 1)], ids=["last-L0-H0", "S0-L1-H1"])
def test_table_and_heatmap_match_each_call(tiny_wan, op_calls, caplog, spec):
    caplog.set_level(logging.INFO)
    model = apply_bsa(tiny_wan, SPARSE, record=spec).clone()  # a later clone (LoRA, ...) keeps the patch
    sample(model)
    run = [r.bsa_run for r in caplog.records if hasattr(r, "bsa_run")][-1]
    text, image, plot = BSAReport.execute(model, {"samples": None}, spec.step, spec.layer, spec.head).result

    rows = table_rows(text)
    assert [(r["step"], r["layer"]) for r in rows] == [(s, b) for s in range(STEPS) for b in range(BLOCKS)]
    assert len(op_calls) == STEPS * BLOCKS == run["sparse_calls"]
    for row, call in zip(rows, op_calls):  # calls run step by step, block by block
        assert row["mode"] == "sparse" and row["calls"] == 1 and row["ms"] > 0
        assert row["kept_q"] == pytest.approx(100 * call["kept_q"], abs=0.06)
        assert row["kept_kv"] == pytest.approx(100 * call["kept_kv"], abs=0.06)
    assert rows[0]["sigma"] > rows[-1]["sigma"]
    total = next(line for line in text.splitlines() if line.startswith("total:"))
    assert f"kept queries {run['kept_query_pct']:.1f}%, kept KV cubes {run['kept_kv_pct']:.1f}%" in total
    assert f"total: {run['sparse_calls']} sparse calls" in total

    step = STEPS - 1 if spec.step < 0 else spec.step
    call = op_calls[step * BLOCKS + spec.layer]
    layout = cube_layout(call["grid"], SPARSE.cube_size)
    _, selection = bsa_attention_reference(call["q"], call["k"], call["v"], layout, SPARSE)
    expected = selection.to_dense()[0, spec.head]
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[1] == image.shape[2] >= 512
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert torch.equal(image, heatmap_image(expected))
    left, top, right, _ = PLOT_MARGINS
    cell = (plot.shape[2] - left - right) // STEPS
    for row in rows:  # the plot's cell (step, layer) has the colour of the table's kept KV cubes %
        corner = plot[0, top + cell * row["layer"] + 2, left + cell * row["step"] + 2]
        colour = torch.lerp(torch.tensor(SKIPPED_RGB), torch.tensor(KEPT_RGB), row["kept_kv"] / 100)
        assert torch.allclose(corner, colour, atol=2 / 255), (row, corner, colour)
    assert not expected.all(), "a sparse pattern, not the trivial all-kept one"
    assert f"heat-map: step {step} " in text and f"layer {spec.layer}, head {spec.head}, batch row 0" in text
    assert "reference selection" in text


def test_no_report_records_nothing(tiny_wan, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("recorded without a report")

    monkeypatch.setattr(report_module._Timer, "__init__", forbidden)
    monkeypatch.setattr(report_module.RunReport, "__init__", forbidden)
    model = apply_bsa(tiny_wan, SPARSE)
    sample(model)
    text, image, plot = BSAReport.execute(model, {"samples": None}, -1, 0, 0).result
    assert text.startswith("Nothing recorded: no sampling run of this model has finished with a BSA Report")
    assert torch.equal(plot, image)  # both placeholders


def test_report_of_another_spec_is_recorded_from_the_next_run(tiny_wan):
    model = apply_bsa(tiny_wan, SPARSE, record=ReportSpec(-1, 0, 0))
    sample(model)
    text, image, _ = BSAReport.execute(model, {"samples": None}, -1, 0, 0).result
    assert len(table_rows(text)) == STEPS * BLOCKS and image.shape[1] >= 512
    text, image, _ = BSAReport.execute(model, {"samples": None}, 0, 1, 0).result  # another layer: next run
    assert len(table_rows(text)) == STEPS * BLOCKS and "is recorded from the next sampling run" in text
    assert image.shape == (1, 256, 256, 3)


def test_a_later_run_that_records_nothing_clears_the_report(tiny_wan, monkeypatch):
    """A run with a Report, a later run without one (e.g. another seed), then the Report back while ComfyUI serves
    the sampler output from its cache: the Report must not show the first run's numbers as the latent's run."""
    model = apply_bsa(tiny_wan, SPARSE, record=ReportSpec(-1, 0, 0))
    sample(model)
    assert len(table_rows(BSAReport.execute(model, {"samples": None}, -1, 0, 0).result[0])) == STEPS * BLOCKS
    monkeypatch.setattr(patch_module, "_specs_to_record", lambda options: ())  # no Report on this run's branch
    sample(model)
    text = BSAReport.execute(model, {"samples": None}, -1, 0, 0).result[0]
    assert text.startswith("Nothing recorded: no sampling run of this model has finished with a BSA Report")


def test_dense_rows_and_a_head_out_of_range(tiny_wan):
    model = apply_bsa(tiny_wan, SPARSE, start_percent=0.5, dense_blocks={1}, record=ReportSpec(-1, 0, 5))
    sample(model, steps=3)
    text, image = bsa_report(model, ReportSpec(-1, 0, 5))
    rows = {(r["step"], r["layer"]): r for r in table_rows(text)}
    assert set(rows) == {(s, b) for s in range(3) for b in range(BLOCKS)}
    assert rows[(0, 0)]["mode"] == "dense" and rows[(0, 0)]["kept_q"] == 100.0
    assert all(rows[(s, 1)]["mode"] == "dense" for s in range(3))
    assert rows[(2, 0)]["mode"] == "sparse"
    assert "block listed in dense_blocks" in text and "sigma outside start_percent..end_percent" in text
    assert "heat-map: head 5 out of range: the model has 2 heads (0-1)" in text
    assert image.shape == (1, 256, 256, 3)

    text, _ = bsa_report(model, ReportSpec(-1, 1, 0))  # not what this run recorded
    assert "is recorded from the next sampling run" in text


def test_report_without_anything_recorded(tiny_wan):
    text, image, plot = BSAReport.execute(tiny_wan, {"samples": None}, -1, 0, 0).result
    assert text.startswith("No BSA patch on this model") and image.shape == (1, 256, 256, 3)
    assert torch.equal(plot, image)  # both placeholders
    model = apply_bsa(tiny_wan, SPARSE, record=ReportSpec())
    text, image, plot = BSAReport.execute(model, {"samples": None}, -1, 0, 0).result
    assert text.startswith("Nothing recorded: no sampling run of this model has finished")
    assert image.shape == (1, 256, 256, 3) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert torch.equal(plot, image)  # both placeholders


def test_heatmap_image_sizes():
    small = torch.eye(8, dtype=torch.bool)
    image = heatmap_image(small)
    assert image.shape == (1, 512, 512, 3)
    assert torch.equal(image[0, ::64, ::64, 0] == 1.0, small), "nearest: one colour per cube, amber red = 1"
    big = heatmap_image(torch.rand(5000, 5000, generator=torch.Generator().manual_seed(0)) < 0.25)
    assert big.shape == (1, 1667, 1667, 3), "over 2048 cubes: averaged 3x3 cubes a pixel"
    assert 0.1 < float(big[..., 0].mean()) < 0.4


def test_every_input_has_a_tooltip():
    schema = BSAReport.GET_SCHEMA()
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)


# ---- through ComfyUI's executor ----------------------------------------------------------------------

def test_workflow_through_the_executor(tiny_wan_path, tmp_path):
    """BSA -> KSampler -> BSA Report -> Preview as Text / Preview Image (heat-map and kept-KV plot), the pack
    loaded by ComfyUI's loader."""
    sys.path.insert(0, str(REPO / "tools"))
    import execution
    import folder_paths
    import run_workflow

    folder_paths.add_model_folder_path("diffusion_models", str(tiny_wan_path.parent))
    output, temp = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    try:
        (tmp_path / "custom_nodes").mkdir()
        asyncio.run(run_workflow.load_nodes(nodes, tmp_path / "custom_nodes"))
        prompt = json.loads((REPO / "workflows" / "tiny_wan_t2v_report_api.json").read_text())
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("report", prompt, None))
        assert valid, (error, node_errors)
        executor = run_workflow.prompt_executor(execution, run_workflow.ServerStub())
        executor.execute(prompt, "report", {}, outputs)
        assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]
    finally:
        folder_paths.set_output_directory(output)
        folder_paths.set_temp_directory(temp)
    report_id = next(i for i, n in prompt.items() if n["class_type"] == "BSAReport")
    text_id = next(i for i, n in prompt.items() if n["inputs"].get("source") == [report_id, 0])
    image_id = next(i for i, n in prompt.items() if n["inputs"].get("images") == [report_id, 1])
    plot_id = next(i for i, n in prompt.items() if n["inputs"].get("images") == [report_id, 2])
    (text,) = executor.history_result["outputs"][text_id]["text"]
    steps = next(n["inputs"]["steps"] for n in prompt.values() if n["class_type"] == "KSampler")
    assert len(table_rows(text)) == steps * BLOCKS, text
    assert "heat-map: step 1 " in text and "total: 4 sparse calls" in text
    assert executor.history_result["outputs"][image_id]["images"]
    assert executor.history_result["outputs"][plot_id]["images"]


def test_two_samplers_on_one_model_each_report_shows_its_own_run(tiny_wan_path, tmp_path):
    """One BSA model, samplers 6 (2 steps) and 7 (3 steps), a Report on each. Queued again with only the
    Reports' layer changed, ComfyUI serves both samplers from its cache: each Report still shows its own
    sampler's run (found by following its `samples` link), not whichever run finished last."""
    import copy

    from comfy_env import PromptRunner, tiny_prompt
    bsa = dict(keep_ratio=0.5, kv_threshold=0.9, cube_size="4x4x4", threshold_mode="cumulative", start_percent=0.0,
               end_percent=1.0, stat_lambda=1.0, min_blocks=1, dense_blocks="", min_tokens=0, pooled_remainder=False)
    runner = PromptRunner(tiny_wan_path, tmp_path)
    prompt = tiny_prompt(bsa, steps=2)
    prompt["7"] = copy.deepcopy(prompt["6"])
    prompt["7"]["inputs"].update(steps=3, seed=5)
    for report, preview, sampler in (("8", "9", "6"), ("10", "11", "7")):
        prompt[report] = {"class_type": "BSAReport", "inputs": {"model": ["2", 0], "samples": [sampler, 0],
                                                               "step": -1, "layer": 0, "head": 0}}
        prompt[preview] = {"class_type": "PreviewAny", "inputs": {"source": [report, 0]}}

    def steps_shown(executor):
        outputs = executor.history_result["outputs"]
        return [outputs[p]["text"][0].split("BSA report: ")[1].split(" steps")[0] for p in ("9", "11")]

    assert steps_shown(runner.run(prompt)) == ["2", "3"]
    prompt["8"]["inputs"]["layer"] = prompt["10"]["inputs"]["layer"] = 1
    assert steps_shown(runner.run(prompt)) == ["2", "3"]


def test_widget_linked_to_a_computing_node_is_recorded_from_the_next_run(tiny_wan_path, tmp_path, monkeypatch):
    """A Report whose layer comes from a node computing it (known only after the sampler ran): the first run
    records the default and says so; the Report keeps the value it got, and the next run records that layer
    (before, every run recorded the default and promised the next one)."""
    from comfy_env import PromptRunner, tiny_prompt

    from comfyui_bsa.bsa_core import report
    monkeypatch.setattr(report, "_linked_values", {})

    class PlusOne:  # stands in for any node computing an INT (math / image-size nodes)
        CATEGORY, RETURN_TYPES, FUNCTION = "testing", ("INT",), "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": ("INT", {"default": 0})}}

        def run(self, value):
            return (value + 1,)

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestPlusOne", PlusOne)
    bsa = dict(keep_ratio=0.5, kv_threshold=0.9, cube_size="4x4x4", threshold_mode="cumulative", start_percent=0.0,
               end_percent=1.0, stat_lambda=1.0, min_blocks=1, dense_blocks="", min_tokens=0, pooled_remainder=False)
    runner = PromptRunner(tiny_wan_path, tmp_path)
    prompt = tiny_prompt(bsa, steps=2)
    prompt["20"] = {"class_type": "TestPlusOne", "inputs": {"value": 0}}
    prompt["8"] = {"class_type": "BSAReport", "inputs": {"model": ["2", 0], "samples": ["6", 0], "step": -1,
                                                        "layer": ["20", 0], "head": 0}}
    prompt["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}}

    def heatmap_line(executor):
        return executor.history_result["outputs"]["9"]["text"][0].splitlines()[-1]

    assert "layer 1, head 0 is recorded from the next sampling run" in heatmap_line(runner.run(prompt))
    prompt["6"]["inputs"]["seed"] += 1  # the sampler runs again
    line = heatmap_line(runner.run(prompt))
    assert line.startswith("heat-map: step 1") and ", layer 1, head 0," in line, line
