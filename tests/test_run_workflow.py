"""Every shipped API sampling workflow runs headless through tools/run_workflow.py (ComfyUI's own start-up node
loading and executor, the tiny Wan or a stand-in for the trained one), and every IMAGE it makes is written to a
PNG file; a workflow on the trained model's synthetic captions also gets its decoded frames and PSNR."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

from comfy_env import require_comfyui, shapes_stand_in_dir  # noqa: F401  (fixture)

require_comfyui()
from comfyui_bsa.nodes import BSAExtension  # noqa: E402  (needs ComfyUI's comfy_api)

REPO = pathlib.Path(__file__).resolve().parents[1]
# the runner compares sampled latents; a training workflow (TrainLoraNode, no sampler) runs through the
# PromptExecutor in tests/test_train_lora.py instead
API_WORKFLOWS = sorted(w for w in (REPO / "workflows").glob("*_api.json")
                       if any(n["class_type"] == "KSampler" for n in json.loads(w.read_text()).values()))
VARIANTS = ("dense", "bsa_1_1", "bsa")
# 2 steps x 2 blocks; the tiny Wan's cfg 5 batches cond and uncond into one call. The shapes workflow (cfg 1)
# keeps its first step dense (start_percent 0.2): 2 sparse, 2 dense self-attention and 4 cross-attention calls.
CALLS = {"tiny_wan_shapes_t2v_api": "2 sparse / 6 dense calls"}


def image_outputs_of_pack_nodes(prompt: dict) -> list[str]:
    """<class><node id>_<output name> of every IMAGE output of the pack's nodes in the prompt (the shipped
    workflows' built-in nodes make no image)."""
    import asyncio

    classes = {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(BSAExtension().get_node_list())}
    names = []
    for node_id, node in prompt.items():
        cls = classes.get(node["class_type"])
        if cls is None:
            continue
        names += [f"{node['class_type']}{node_id}_{name}"
                  for kind, name in zip(cls.RETURN_TYPES, cls.RETURN_NAMES) if kind == "IMAGE"]
    return names


@pytest.mark.parametrize("workflow", API_WORKFLOWS, ids=[w.stem for w in API_WORKFLOWS])
def test_shipped_api_workflow_runs_headless_and_writes_its_images(workflow, tmp_path, shapes_stand_in_dir):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "run_workflow.py"), "--workflow", str(workflow),
                             "--width", "128", "--height", "128", "--length", "17", "--steps", "2",
                             "--output-dir", str(tmp_path), "--models-dir", str(shapes_stand_in_dir)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if " wall " in line}
    assert set(lines) == set(VARIANTS), result.stdout
    # FP8 layers round the 1e-6 differences of two exact attentions to 6 % steps, and TEAL's thresholds zero or
    # keep an input that lies on them: downstream of either, two exact attentions need not give close latents
    discontinuous = {"TDQQuantize", "ActivationSparsityTEAL"}
    if not any(node["class_type"] in discontinuous for node in json.loads(workflow.read_text()).values()):
        assert float(lines["bsa_1_1"].split("dense|")[1].split()[0]) < 1e-3
    assert CALLS.get(workflow.stem, "4 sparse / 4 dense calls") in lines["bsa"], lines["bsa"]

    prompt = json.loads(workflow.read_text())
    expected = {f"{variant}_{name}.png" for variant in VARIANTS for name in image_outputs_of_pack_nodes(prompt)}
    written = {path.name for path in tmp_path.glob("*.png")}
    if any(node["class_type"] == "SyntheticCaption" for node in prompt.values()):
        written.remove("decoded_frames.png")  # the runner's own: one row per run
        assert str(tmp_path / "decoded_frames.png") in result.stdout
        assert "PSNR    inf dB" in lines["dense"] and float(lines["bsa_1_1"].split("PSNR")[1].split()[0]) > 60
        with Image.open(tmp_path / "decoded_frames.png") as frames:
            assert frames.height == len(VARIANTS) * 32 and frames.width > 5 * 32  # 5 frames of 32x32 px a row
    assert written == expected
    for name in expected:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and min(image.size) >= 128
            assert str(tmp_path / name) in result.stdout  # the runner says where it wrote it
    for name in (n for n in expected if n.startswith("bsa_") and not n.startswith("bsa_1_1")):
        # without the BSA node (dense) the report has nothing to draw; with it, every image shows the run
        with Image.open(tmp_path / name) as sparse, Image.open(tmp_path / name.replace("bsa_", "dense_", 1)) as dense:
            assert sparse.size != dense.size or sparse.tobytes() != dense.tobytes(), name


def test_variants_given_in_any_order_run_and_compare_with_the_first_run(tmp_path, shapes_stand_in_dir):
    """--variants bsa dense: the runs go dense then bsa, and both lines compare with dense (the first run)."""
    result = subprocess.run([sys.executable, str(REPO / "tools" / "run_workflow.py"), "--variants", "bsa", "dense",
                             "--width", "64", "--height", "64", "--length", "5", "--steps", "1",
                             "--output-dir", str(tmp_path), "--models-dir", str(shapes_stand_in_dir)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if " wall " in line]
    assert [line.split()[0] for line in lines] == ["dense", "bsa"]
    assert all("max|latent - dense|" in line for line in lines), lines
