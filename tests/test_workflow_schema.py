"""Every example workflow matches the current schema of our nodes, so a changed input never ships a
broken example: widget values (count, order, type, range, choices), input and output slots in the UI
workflows, and inputs in the API prompts. Node schemas come from the nodes themselves through
ComfyUI's V3 API (GET_NODE_INFO_V1 is what /object_info serves); node types that are not ours must exist
in ComfyUI (core and comfy_extras) or be frontend-only. Static: no server, no browser.
"""
from __future__ import annotations

import asyncio
import json
import pathlib
import sys

import pytest

from comfy_env import require_comfyui

COMFYUI_PATH = require_comfyui()

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
UI_WORKFLOWS = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))
API_WORKFLOWS = sorted(WORKFLOWS.glob("*_api.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
TEST_ONLY = {"TinyRandomConditioning", "SyntheticCaption"}  # registered by tools/run_workflow.py (the first also
# by the browser test's server)
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}  # the frontend's control_after_generate


@pytest.fixture(scope="module")
def our_nodes() -> dict[str, dict]:
    """node_id -> V1 node info of every node the pack registers through comfy_entrypoint."""
    import comfyui_bsa

    async def node_list():
        return await (await comfyui_bsa.comfy_entrypoint()).get_node_list()

    return {cls.GET_SCHEMA().node_id: cls.GET_NODE_INFO_V1() for cls in asyncio.run(node_list())}


@pytest.fixture(scope="module")
def comfy_node_types() -> set[str]:
    """Node types of ComfyUI's nodes.py and comfy_extras, loaded as main.py does."""
    if not hasattr(sys.modules.get("utils"), "__path__"):
        # nodes.py puts ComfyUI/comfy first on sys.path, where utils.py shadows ComfyUI's utils package
        # (main.py imports that package before nodes; comfy_extras/nodes_images.py needs it).
        sys.modules.pop("utils", None)
        sys.path.insert(0, str(COMFYUI_PATH))
        try:
            import utils.install_util  # noqa: F401
        finally:
            sys.path.remove(str(COMFYUI_PATH))
    import nodes
    asyncio.run(nodes.init_builtin_extra_nodes())
    return set(nodes.NODE_CLASS_MAPPINGS)


def _inputs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) in the order the frontend creates slots and widgets: required, optional."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    specs = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            kind, *rest = info["input"][section][name]
            options = rest[0] if rest else {}
            if isinstance(kind, list):  # V1 combo: the choices themselves
                kind, options = "COMBO", dict(options, options=kind)
            specs.append((name, kind, options))
    return specs


def _value_errors(name: str, kind: str, options: dict, value) -> list[str]:
    if kind == "COMBO":
        return [] if value in options["options"] else [f"{name}={value!r} is not one of {options['options']}"]
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    if not isinstance(value, expected) or (kind != "BOOLEAN" and isinstance(value, bool)):
        return [f"{name}={value!r} is not {kind}"]
    if kind in ("INT", "FLOAT"):
        low, high = options.get("min", float("-inf")), options.get("max", float("inf"))
        if not low <= value <= high:
            return [f"{name}={value!r} outside [{low}, {high}]"]
    return []


def _has_control_widget(name: str, options: dict) -> bool:
    return bool(options.get("control_after_generate")) or name in ("seed", "noise_seed")


def _ui_node_errors(node: dict, info: dict) -> list[str]:
    specs = _inputs(info)
    errors, values = [], list(node.get("widgets_values") or [])
    expected = []
    for name, kind, options in specs:
        if kind in WIDGET_TYPES:
            expected.append(name)
            if not values:
                errors.append(f"no value for widget {name}")
                continue
            errors += _value_errors(name, kind, options, values.pop(0))
            if kind == "INT" and _has_control_widget(name, options):
                control = values.pop(0) if values else None
                if control not in CONTROL_VALUES:
                    errors.append(f"{name}: control_after_generate value {control!r}")
    if values:
        errors.append(f"{len(values)} widget values more than the widgets {expected}: {values}")

    by_name = {name: kind for name, kind, _ in specs}
    for slot in node.get("inputs", []):
        if slot["name"] not in by_name:
            errors.append(f"input slot {slot['name']!r} is not an input of the node")
        elif by_name[slot["name"]] not in (slot["type"], "*") and not (
                by_name[slot["name"]] == "COMBO" and slot.get("widget")):
            errors.append(f"input slot {slot['name']}: type {slot['type']}, schema {by_name[slot['name']]}")
    outputs = [(o["name"], o["type"]) for o in node.get("outputs", [])]
    schema_outputs = list(zip(info["output_name"], info["output"]))
    if outputs and [t for _, t in outputs] != [t for _, t in schema_outputs]:
        errors.append(f"outputs {outputs}, schema {schema_outputs}")
    return errors


def _api_node_errors(inputs: dict, info: dict) -> list[str]:
    specs = _inputs(info)
    errors = [f"unknown input {name!r}" for name in inputs if name not in {n for n, _, _ in specs}]
    required = set(info["input"].get("required", {}))
    for name, kind, options in specs:
        if name not in inputs:
            if name in required:
                errors.append(f"required input {name} missing")
            continue
        value = inputs[name]
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            continue  # a link [node_id, output_index]
        errors += [f"{name}: needs a link, has {value!r}"] if kind not in WIDGET_TYPES else \
            _value_errors(name, kind, options, value)
    return errors


def test_workflows_exist():
    assert UI_WORKFLOWS, "no UI workflow in workflows/"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_ui_workflow_has_a_thumbnail(path):
    """The template browser shows workflows/<name>.jpg; tools/make_thumbnails.py writes it (512 px wide)."""
    from PIL import Image

    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"no {thumbnail.name}: run python tools/make_thumbnails.py {path.relative_to(REPO)}"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and image.width == 512, (image.format, image.size)


def test_our_nodes_are_registered(our_nodes):
    assert {"BSASparseAttention", "RIFLExExtend"} <= set(our_nodes)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_ui_workflow_matches_schema(path, our_nodes, comfy_node_types):
    graph = json.loads(path.read_text())
    errors = []
    for node in graph["nodes"]:
        where = f"node {node['id']} {node['type']}"
        if node["type"] in our_nodes:
            errors += [f"{where}: {e}" for e in _ui_node_errors(node, our_nodes[node["type"]])]
        elif node["type"] not in comfy_node_types | FRONTEND_ONLY:
            errors.append(f"{where}: unknown node type")
    node_ids = {node["id"] for node in graph["nodes"]}
    for link in graph["links"]:  # [id, from_node, from_slot, to_node, to_slot, type]
        if link[1] not in node_ids or link[3] not in node_ids:
            errors.append(f"link {link[0]} joins a node that is not in the graph")
    assert not errors, f"{path.name}:\n" + "\n".join(errors)


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=[p.stem for p in API_WORKFLOWS])
def test_api_workflow_matches_schema(path, our_nodes, comfy_node_types):
    prompt = json.loads(path.read_text())
    errors = []
    for node_id, node in prompt.items():
        where = f"node {node_id} {node['class_type']}"
        if node["class_type"] in our_nodes:
            errors += [f"{where}: {e}" for e in _api_node_errors(node["inputs"], our_nodes[node["class_type"]])]
        elif node["class_type"] not in comfy_node_types | TEST_ONLY:
            errors.append(f"{where}: unknown node type")
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                errors.append(f"{where}: input {name} links to missing node {value[0]}")
    assert not errors, f"{path.name}:\n" + "\n".join(errors)


def test_checker_catches_a_stale_widget_list(our_nodes):
    """The checker itself: a value removed (the last optional widget, pooled_remainder, too), one out of
    range, a wrong choice, a wrong type and an extra value."""
    info = our_nodes["BSASparseAttention"]
    values = ["statistical", 1.0, 0.7, 1.0, "4x4x4", 0.2, 1.0, 1, "", 12288, True]
    good = {"widgets_values": values}
    assert len(values) == 11
    assert _ui_node_errors(good, info) == []
    assert _ui_node_errors({"widgets_values": values[:-1]}, info)
    assert _ui_node_errors({"widgets_values": values[:2] + [1.5] + values[3:]}, info)
    assert _ui_node_errors({"widgets_values": values[:4] + ["3x3x3"] + values[5:]}, info)
    assert _ui_node_errors({"widgets_values": values[:-1] + ["true"]}, info)
    assert _ui_node_errors({"widgets_values": values + [7]}, info)
    old_order = [1.0, 0.7, "4x4x4", "statistical", 0.2, 1.0, 1.0, 1, "", 12288, True]  # before the reorder
    assert _ui_node_errors({"widgets_values": old_order}, info)


# ---- workflows saved before the widget reorder ----------------------------------------------------

MIGRATION_JS = REPO / "web" / "bsa_migrate.js"
OLD_LAYOUT_FIXTURE = REPO / "tests" / "fixtures" / "wan21_t2v_1.3B_bsa_widget_order_v1.json"


def js_list(name: str) -> list[str]:
    """A `const NAME = [...]` list of names from web/bsa_migrate.js."""
    import re
    text = MIGRATION_JS.read_text()
    body = re.search(rf"const {name} = \[(.*?)\];", text, re.S)[1]
    return re.findall(r'"(\w+)"', body)


def test_migration_knows_the_old_and_the_new_widget_order(our_nodes):
    """The frontend migration moves values by name from OLD_WIDGET_ORDER to WIDGET_ORDER: the latter must be
    the schema's widget order, the former a permutation of it whose first value is a number (the old node's
    keep_ratio), which is how the migration recognises an old node."""
    info = our_nodes["BSASparseAttention"]
    widgets = [name for name, kind, _ in _inputs(info) if kind in WIDGET_TYPES]
    assert js_list("WIDGET_ORDER") == widgets
    assert sorted(js_list("OLD_WIDGET_ORDER")) == sorted(widgets)
    assert _inputs(info)[1][1] == "COMBO", "the new first widget's value is a string"


def test_a_workflow_saved_with_the_old_order_maps_to_the_shipped_one(our_nodes):
    """The fixture is wan21_t2v_1.3B_bsa.json as the node saved it before the reorder: its values read by the
    old order are the shipped workflow's values read by the new order, and valid node inputs."""
    old = json.loads(OLD_LAYOUT_FIXTURE.read_text())
    new = json.loads((WORKFLOWS / "wan21_t2v_1.3B_bsa.json").read_text())
    (old_node,) = [n for n in old["nodes"] if n["type"] == "BSASparseAttention"]
    (new_node,) = [n for n in new["nodes"] if n["type"] == "BSASparseAttention"]
    assert isinstance(old_node["widgets_values"][0], float)
    assert _ui_node_errors(old_node, our_nodes["BSASparseAttention"]), "read by position, the old list is invalid"
    migrated = dict(zip(js_list("OLD_WIDGET_ORDER"), old_node["widgets_values"]))
    assert [migrated[name] for name in js_list("WIDGET_ORDER")] == new_node["widgets_values"]
