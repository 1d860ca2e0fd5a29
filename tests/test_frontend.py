"""The example workflows in the real ComfyUI frontend: a `main.py --cpu` server on 127.0.0.1 and the
frontend package ComfyUI 0.3.75 pins (1.32.9) in headless Debian Chromium, driven by Playwright.

Skipped when ComfyUI, playwright or Chromium is missing (the reason names what); with
BSA_REQUIRE_BROWSER=1 (CI) that is a failure instead. Screenshots go to BSA_ARTIFACTS_DIR, else to
pytest's temporary folder; the path is printed.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import comfy_browser as cb  # noqa: E402
import comfy_server as cs  # noqa: E402

BSA = "BSASparseAttention"
SLIDERS = ("stat_lambda", "kv_threshold", "keep_ratio")
WIDGET_ORDER = ["threshold_mode", "stat_lambda", "kv_threshold", "keep_ratio", "cube_size", "start_percent",
                "end_percent", "min_blocks", "dense_blocks", "min_tokens", "pooled_remainder"]
MODE_CONTROL = {"statistical": "stat_lambda", "cumulative": "kv_threshold"}  # web/bsa_mode_controls.js
TINY_API = REPO / "workflows" / "tiny_wan_t2v_api.json"
UI_WORKFLOWS = cs.ui_workflows()
MISSING = cb.missing_requirements()

if MISSING and os.environ.get("BSA_REQUIRE_BROWSER") == "1":
    raise RuntimeError("BSA_REQUIRE_BROWSER=1 but the browser test cannot run: " + "; ".join(MISSING))
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(bool(MISSING), reason="browser test needs: " + "; ".join(MISSING))]


def _spec(object_info: dict, node_type: str, name: str) -> dict:
    inputs = object_info[node_type]["input"]
    return (inputs.get("required", {}).get(name) or inputs.get("optional", {})[name])[1]


def _assert_mode_controls(frontend, node_id, mode: str):
    """Only `mode`'s sparsity control is shown, every other widget is, and they stack without a gap in a node
    sized to them."""
    widgets = frontend.widgets(node_id)
    hidden = [w["name"] for w in widgets if not w["visible"]]
    assert hidden == [name for m, name in MODE_CONTROL.items() if m != mode], (mode, hidden)
    shown = [w for w in widgets if w["visible"]]
    for above, below in zip(shown, shown[1:]):
        assert below["y"] == above["y"] + above["height"], f"gap between {above['name']} and {below['name']}"
    size = frontend.node_size(node_id)
    assert size["size"][1] == size["fitted"][1], size


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = pathlib.Path(os.environ.get("BSA_ARTIFACTS_DIR") or tmp_path_factory.mktemp("frontend_artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nfrontend screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, artifacts):
    graphs = [json.loads(p.read_text()) for p in UI_WORKFLOWS]
    server = cs.ComfyServer(tmp_path_factory.mktemp("comfy_base"), placeholders=cs.model_names(graphs),
                            tiny_wan=True)
    with server:
        yield server
    (artifacts / "server.log").write_text(server.log_tail(200_000))


@pytest.fixture(scope="module")
def frontend(server):
    with cb.Frontend(server.url) as page:
        yield page


def test_server_serves_pinned_frontend_and_our_node(server, frontend):
    served = frontend.page.evaluate("window.__COMFYUI_FRONTEND_VERSION__")
    assert served == server.get("/system_stats")["system"]["required_frontend_version"] == cs.pinned_frontend_version()
    assert BSA in server.object_info, f"the pack did not load:\n{server.log_tail()}"
    for name in SLIDERS:
        spec = _spec(server.object_info, BSA, name)
        assert spec.get("display") == "slider", (name, spec)
        assert spec.get("tooltip"), f"{name} has no tooltip"


def test_bsa_node_sliders_and_tooltips(server, frontend, artifacts):
    node_id = frontend.add_node(BSA)
    widgets = {w["name"]: w for w in frontend.widgets(node_id)}
    for name in SLIDERS:
        spec = _spec(server.object_info, BSA, name)
        assert widgets[name]["type"] == "slider", widgets[name]
        assert (widgets[name]["options"]["min"], widgets[name]["options"]["max"]) == (spec["min"], spec["max"])
        assert widgets[name]["value"] == pytest.approx(spec["default"])
        if widgets[name]["visible"]:  # kv_threshold is hidden in the default mode; see the mode test below
            assert frontend.hover_tooltip(node_id, name) == spec["tooltip"]
    frontend.screenshot(artifacts / "bsa_node.png")
    assert frontend.overlays() == {"dialogs": [], "toasts": []}


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_ui_workflow_loads_validates_and_renders(path, server, frontend, artifacts):
    graph = json.loads(path.read_text())
    console_before = len(frontend.console)
    nodes = frontend.load(graph)
    page_errors = frontend.errors_since(console_before)
    assert not page_errors, f"{path.name}: the frontend logged errors while loading: {page_errors}"
    assert len(nodes) == len(graph["nodes"])
    missing = sorted({n["type"] for n in nodes
                      if not n["registered"] or not n["virtual"] and n["type"] not in server.object_info})
    assert not missing, f"{path.name}: node types the server does not have: {missing}"
    assert not [n for n in nodes if n["has_errors"]], f"{path.name}: nodes with errors"
    assert frontend.overlays() == {"dialogs": [], "toasts": []}, f"{path.name}: dialog or toast after load"

    bsa_nodes = [n for n in nodes if n["type"] == BSA]
    for node in bsa_nodes:
        widgets = {w["name"]: w for w in frontend.widgets(node["id"])}
        for name in SLIDERS:
            assert widgets[name]["type"] == "slider", (path.name, widgets[name])
            assert widgets[name]["tooltip"] == _spec(server.object_info, BSA, name)["tooltip"]
        _assert_mode_controls(frontend, node["id"], widgets["threshold_mode"]["value"])

    # What the Run button would queue passes the server's own validation (types, ranges, choices).
    prompt = frontend.graph_to_prompt()
    if bsa_nodes:
        assert BSA in {n["class_type"] for n in prompt.values()}
    try:
        run = server.run_prompt(prompt, timeout=120)
    except cs.PromptRejected as rejected:
        pytest.fail(f"{path.name}: /prompt rejected the workflow: {rejected}")
    # The model files are empty placeholders, so a loader of one may fail at run time; nothing else may.
    for error in run.of_type("execution_error"):
        loads = set(map(str, prompt[error["node_id"]]["inputs"].values()))
        assert loads & server.placeholders, f"{path.name}: {error['node_type']}: {error['exception_message']}"

    frontend.fit_view()
    shot = frontend.screenshot(artifacts / f"{path.stem}.png")
    assert shot.stat().st_size > 10_000


def test_only_the_active_modes_sparsity_control_is_shown(server, frontend):
    """statistical shows stat_lambda and hides kv_threshold, cumulative the reverse, on a new node, after the
    combo is changed with the mouse and after a saved workflow loads. The hidden slider keeps its value and its
    place in widgets_values, and the queued prompt still carries it."""
    node_id = frontend.add_node(BSA)
    _assert_mode_controls(frontend, node_id, "statistical")
    frontend.page.evaluate("(id) => { window.app.graph.getNodeById(id).widgets"
                           ".find(w => w.name === 'stat_lambda').value = 1.5; }", node_id)

    frontend.select_combo(node_id, "threshold_mode", "cumulative")
    _assert_mode_controls(frontend, node_id, "cumulative")
    assert frontend.hover_tooltip(node_id, "kv_threshold") == _spec(server.object_info, BSA, "kv_threshold")["tooltip"]
    defaults = {name: _spec(server.object_info, BSA, name)["default"] for name in WIDGET_ORDER}
    expected = {**defaults, "threshold_mode": "cumulative", "stat_lambda": 1.5}
    saved = frontend.saved_workflow()
    (node,) = saved["nodes"]
    assert node["widgets_values"] == list(expected.values())
    (queued,) = frontend.graph_to_prompt().values()
    assert {name: queued["inputs"][name] for name in WIDGET_ORDER} == expected

    console_before = len(frontend.console)
    (loaded,) = frontend.load(saved)
    assert not frontend.errors_since(console_before)
    _assert_mode_controls(frontend, loaded["id"], "cumulative")
    assert [w["value"] for w in frontend.widgets(loaded["id"])] == list(expected.values())

    frontend.select_combo(loaded["id"], "threshold_mode", "statistical")
    _assert_mode_controls(frontend, loaded["id"], "statistical")
    assert {w["name"]: w["value"] for w in frontend.widgets(loaded["id"])}["stat_lambda"] == 1.5


@pytest.mark.parametrize("mode", MODE_CONTROL)
def test_workflow_saved_with_the_old_widget_order_loads(server, frontend, mode):
    """A workflow saved before the BSA node's widgets were reordered (tests/fixtures): web/bsa_migrate.js puts
    each saved value into the widget of its name, the saved mode's control is the one shown, and what the Run
    button queues passes /prompt validation."""
    fixture = REPO / "tests" / "fixtures" / "wan21_t2v_1.3B_bsa_widget_order_v1.json"
    graph = json.loads(fixture.read_text())
    (saved,) = [n for n in graph["nodes"] if n["type"] == BSA]
    old_order = ["keep_ratio", "kv_threshold", "cube_size", "threshold_mode", "start_percent", "end_percent",
                 "stat_lambda", "min_blocks", "dense_blocks", "min_tokens", "pooled_remainder"]
    saved["widgets_values"][old_order.index("threshold_mode")] = mode
    console_before = len(frontend.console)
    nodes = frontend.load(graph)
    assert not frontend.errors_since(console_before)
    (bsa,) = [n for n in nodes if n["type"] == BSA]
    values = {w["name"]: w["value"] for w in frontend.widgets(bsa["id"])}
    assert values == dict(zip(old_order, saved["widgets_values"]))
    _assert_mode_controls(frontend, bsa["id"], mode)
    prompt = frontend.graph_to_prompt()
    (inputs,) = [n["inputs"] for n in prompt.values() if n["class_type"] == BSA]
    assert {name: inputs[name] for name in old_order} == values
    try:
        server.run_prompt(prompt, timeout=120)
    except cs.PromptRejected as rejected:
        pytest.fail(f"/prompt rejected the migrated workflow: {rejected}")


def test_tiny_api_workflow_runs_over_websocket(server):
    if not TINY_API.is_file():
        pytest.skip(f"{TINY_API.name} not written yet")
    prompt = json.loads(TINY_API.read_text())
    run = server.run_prompt(prompt, timeout=150)
    assert run.succeeded, f"{run.of_type('execution_error')}\n{server.log_tail()}"

    steps = next(n["inputs"]["steps"] for n in prompt.values() if n["class_type"] == "KSampler")
    progress = run.of_type("progress")
    assert [p["value"] for p in progress][-1] == steps and all(p["max"] == steps for p in progress), progress
    ran = {e["node"] for e in run.of_type("executing") if e.get("node")}
    bsa_id = next(i for i, n in prompt.items() if n["class_type"] == BSA)
    assert bsa_id in ran, f"the BSA node did not run: {ran}"

    save_id = next(i for i, n in prompt.items() if n["class_type"] == "SaveLatent")
    executed = [e for e in run.of_type("executed") if e["node"] == save_id]
    assert executed and executed[0]["output"]["latents"], run.of_type("executed")
    latent = executed[0]["output"]["latents"][0]
    assert run.history["outputs"][save_id]["latents"] == executed[0]["output"]["latents"]
    saved = server.base / "output" / latent["subfolder"] / latent["filename"]
    assert saved.is_file() and saved.stat().st_size > 0
