"""The patch's lifecycle through ComfyUI's own PromptExecutor (CPU, tiny Wan): BSA runs in the first run
under an override node applied after it, in every sampler of a prompt, once when stacked, records only for a
prompt whose BSA Report sits on that sampler's branch, and never leaves state in a model."""
import logging

import pytest
import torch

from comfy_env import PromptRunner, keeper_node, require_comfyui, tiny_prompt, tiny_wan, tiny_wan_path  # noqa: F401

require_comfyui()

import comfy.samplers  # noqa: E402
import nodes  # noqa: E402

from comfyui_bsa.bsa_core.patch import OVERRIDE_KEY, RUN_KEY, BSAOptions, BSARun, BlockRanges  # noqa: E402
from comfyui_bsa.bsa_core.config import BSAConfig  # noqa: E402

SPARSE_NODE = dict(threshold_mode="cumulative", stat_lambda=1.0, kv_threshold=0.9, keep_ratio=0.5, cube_size="4x4x4",
                   start_percent=0.0, end_percent=1.0, min_blocks=1, dense_blocks="", min_tokens=0,
                   pooled_remainder=False)
STEPS = 2  # x 2 blocks, cond and uncond batched: 4 sparse self-attention calls and 4 dense cross-attention calls

OVERRIDE_CALLS = []
SEEN = {}


class OverrideAfterBSA:
    """What SageAttention-style patch nodes do: clone the model and set their own attention override."""
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        def their_override(func, *args, **kwargs):
            OVERRIDE_CALLS.append(args[0].shape)
            return func(*args, **kwargs)

        patched = model.clone()
        patched.model_options["transformer_options"][OVERRIDE_KEY] = their_override
        SEEN["override_model"], SEEN["their_override"] = patched, their_override
        return (patched,)


Capture = keeper_node(SEEN, {"samples": ("LATENT",), "text": ("STRING", {"forceInput": True})},
                      lambda samples=None, text=None: samples["samples"].clone() if samples is not None else text)


@pytest.fixture(scope="module")
def loaded(tiny_wan_path, tmp_path_factory):
    runner = PromptRunner(tiny_wan_path, tmp_path_factory.mktemp("lifecycle"))
    nodes.NODE_CLASS_MAPPINGS.update(OverrideAfterBSA=OverrideAfterBSA, Capture=Capture)
    return runner


@pytest.fixture
def runner(loaded, tiny_wan_path, tmp_path):
    """A fresh executor (empty cache) for each test."""
    OVERRIDE_CALLS.clear()
    SEEN.clear()
    return PromptRunner(tiny_wan_path, tmp_path)


def executor_module(name: str):
    """A module of the pack as ComfyUI's loader imported it (another module name than the tests' comfyui_bsa):
    what the executor runs, so what a test must patch."""
    import sys
    package = nodes.NODE_CLASS_MAPPINGS["BSASparseAttention"].__module__.rsplit(".nodes.", 1)[0]
    return sys.modules[f"{package}.{name}"]


def runs_logged(caplog) -> list[dict]:
    return [r.bsa_run for r in caplog.records if hasattr(r, "bsa_run")]


def capture(prompt: dict, label: str, sampler: str = "6", node_id: str = "90") -> dict:
    prompt[node_id] = {"class_type": "Capture", "inputs": {"label": label, "samples": [sampler, 0]}}
    return prompt


def dense_latent(runner) -> torch.Tensor:
    runner.run(capture(tiny_prompt(), "dense"))
    return SEEN["dense"]


def test_override_node_after_bsa_sparse_in_the_first_run(runner, caplog):
    """UNETLoader -> BSA -> override node -> KSampler: BSA's sparse calls in run 1; the later override still
    gets the calls BSA leaves dense; its cached model is not modified by the run."""
    caplog.set_level(logging.INFO)
    dense = dense_latent(runner)
    caplog.clear()
    prompt = tiny_prompt(SPARSE_NODE)
    prompt["7"] = {"class_type": "OverrideAfterBSA", "inputs": {"model": ["2", 0]}}
    prompt["6"]["inputs"]["model"] = ["7", 0]
    runner.run(capture(prompt, "bsa"))
    (run,) = runs_logged(caplog)
    assert run["sparse_calls"] == 2 * STEPS and run["kept_query_pct"] == pytest.approx(50.0), run
    assert run["dense_reasons"] == {"cross-attention": 2 * STEPS}
    assert len(OVERRIDE_CALLS) == 2 * STEPS, "BSA's dense calls go through the override it found"
    assert not torch.allclose(SEEN["bsa"], dense, atol=1e-2)
    options = SEEN["override_model"].model_options["transformer_options"]
    assert options[OVERRIDE_KEY] is SEEN["their_override"] and RUN_KEY not in options


def test_two_samplers_in_one_prompt_both_run_bsa(runner, caplog):
    caplog.set_level(logging.INFO)
    prompt = tiny_prompt(SPARSE_NODE)
    prompt["8"] = {"class_type": "KSampler", "inputs": {**prompt["6"]["inputs"], "seed": 1}}
    runner.run(capture(capture(prompt, "first"), "second", sampler="8", node_id="91"))
    runs = runs_logged(caplog)
    assert [r["sparse_calls"] for r in runs] == [2 * STEPS] * 2, runs
    assert not torch.equal(SEEN["first"], SEEN["second"])


def test_bsa_on_bsa_warns_once_and_runs_the_later_one(runner, caplog):
    """The earlier node (dense_blocks 1, keep 0.5) is removed; the output is the later node's alone."""
    caplog.set_level(logging.INFO)
    later = {**SPARSE_NODE, "keep_ratio": 0.25, "cube_size": "2x8x8"}
    prompt = tiny_prompt({**SPARSE_NODE, "dense_blocks": "1"})
    prompt["7"] = {"class_type": "BSASparseAttention", "inputs": {"model": ["2", 0], **later}}
    prompt["6"]["inputs"]["model"] = ["7", 0]
    runner.run(capture(prompt, "stacked"))
    warnings = [r.getMessage() for r in caplog.records if "already has BSA" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("[BSA]"), warnings
    (run,) = runs_logged(caplog)
    assert run["kept_query_pct"] == pytest.approx(25.0) and run["sparse_calls"] == 2 * STEPS, run
    runner.run(capture(tiny_prompt(later), "alone"))
    assert torch.equal(SEEN["stacked"], SEEN["alone"])


def report_node(model_link, samples_link, step=-1, layer=0, head=0) -> dict:
    return {"class_type": "BSAReport", "inputs": {"model": model_link, "samples": samples_link, "step": step,
                                                  "layer": layer, "head": head}}


def text_capture(prompt: dict, label: str, report_id: str, node_id: str) -> None:
    prompt[node_id] = {"class_type": "Capture", "inputs": {"label": label, "text": [report_id, 0]}}


def test_removing_the_report_stops_recording(runner, monkeypatch):
    prompt = tiny_prompt(SPARSE_NODE)
    prompt["8"] = report_node(["2", 0], ["6", 0])
    text_capture(prompt, "report", "8", "92")
    runner.run(prompt)
    assert "total: 4 sparse calls" in SEEN["report"] and "heat-map: step 1 " in SEEN["report"], SEEN["report"]

    def forbidden(*args, **kwargs):
        raise AssertionError("recorded without a report")

    report_module = executor_module("bsa_core.report")
    monkeypatch.setattr(report_module._Timer, "__init__", forbidden)
    monkeypatch.setattr(report_module.RunReport, "__init__", forbidden)
    without = tiny_prompt(SPARSE_NODE, seed=5)  # the BSA node comes from the cache, the sampler runs again
    runner.run(capture(without, "after"))
    assert "after" in SEEN


def test_two_reports_each_get_their_heatmap_and_branches_stay_apart(runner, caplog):
    """BSA -> two clones (ModelSamplingSD3 shift 3 / shift 8) -> one sampler each; two reports on branch A,
    none on B: branch A records both heat-maps, branch B records nothing, A's table has A's sigmas."""
    caplog.set_level(logging.INFO)
    report_module = executor_module("bsa_core.report")
    created = []
    original_init = report_module.RunReport.__init__

    def counting(self, specs):
        created.append(specs)
        original_init(self, specs)

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(report_module.RunReport, "__init__", counting)
    try:
        prompt = tiny_prompt(SPARSE_NODE)
        prompt["10"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": 3.0}}
        prompt["11"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": 8.0}}
        prompt["6"]["inputs"]["model"] = ["10", 0]
        prompt["12"] = {"class_type": "KSampler", "inputs": {**prompt["6"]["inputs"], "model": ["11", 0]}}
        prompt["8"] = report_node(["10", 0], ["6", 0], step=0, layer=1, head=1)
        prompt["9"] = report_node(["10", 0], ["6", 0], step=-1, layer=0, head=0)
        text_capture(prompt, "first", "8", "92")
        text_capture(prompt, "second", "9", "93")
        runner.run(capture(prompt, "b", sampler="12"))
    finally:
        monkeypatch.undo()
    assert len(created) == 1 and set(created[0]) == {report_module.ReportSpec(0, 1, 1), report_module.ReportSpec()}
    assert "b" in SEEN
    assert "heat-map: step 0 (sigma" in SEEN["first"] and "layer 1, head 1" in SEEN["first"], SEEN["first"]
    assert "heat-map: step 1 (sigma" in SEEN["second"] and "layer 0, head 0" in SEEN["second"], SEEN["second"]
    step_1 = [line.split() for line in SEEN["first"].splitlines() if line.split()[:1] == ["1"]]
    shift = 3.0  # branch A; the simple schedule's second sigma of 2 steps is shift(0.5) = 0.75 (shift 8: 0.889)
    assert step_1 and all(float(row[1]) == pytest.approx(shift * 0.5 / (1 + (shift - 1) * 0.5), abs=1e-4)
                          for row in step_1), SEEN["first"]


@pytest.mark.parametrize("steps,start,end,expected", [
    (10, 0.2, 1.0, [False, False] + [True] * 8),
    (10, 0.0, 0.5, [True] * 6 + [False] * 4),
    (4, 0.25, 0.75, [False, True, True, True]),
], ids=["start-0.2", "end-0.5", "both"])
def test_step_window_includes_a_step_exactly_on_a_boundary(tiny_wan, steps, start, end, expected):
    """The rule: a step is sparse when its schedule sigma is within [sigma(end), sigma(start)], both ends
    included; a step whose progress is exactly start_percent or end_percent is inside."""
    sampling = tiny_wan.get_model_object("model_sampling")
    schedule = comfy.samplers.calculate_sigmas(sampling, "simple", steps).tolist()
    options = BSAOptions(BSAConfig(), start, end, BlockRanges(), 0)
    run = BSARun(options, sampling, schedule)
    decided = []
    for step in range(steps):
        run.begin_step(step)
        decided.append(run.in_window)
    assert decided == expected
