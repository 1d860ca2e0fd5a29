"""LoRA training with BSA on, through ComfyUI's own TrainLoraNode and PromptExecutor on the tiny Wan: the
backward of bsa::attention in real training, with gradient checkpointing on and off, and the node's sigma
window and dense_blocks applied per training call (bsa_core/patch.py, "Training")."""
import json
import logging
import pathlib

import pytest
import torch

from comfy_env import PromptRunner, keeper_node, require_comfyui, tiny_wan_path  # noqa: F401  (fixture)

require_comfyui()
import nodes  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "tiny_wan_train_lora_bsa_api.json"
SEEN = {}


KeepTraining = keeper_node(  # the LoRA weights and the loss history of a TrainLoraNode
    SEEN, {"lora": ("LORA_MODEL",), "loss": ("LOSS_MAP",)},
    lambda lora, loss: ({name: t.detach().float().clone() for name, t in lora.items()}, list(loss["loss"])))


@pytest.fixture(scope="module")
def runner(tiny_wan_path, tmp_path_factory):  # noqa: F811
    runner = PromptRunner(tiny_wan_path, tmp_path_factory.mktemp("train"))
    nodes.NODE_CLASS_MAPPINGS["KeepTraining"] = KeepTraining
    return runner


def train_prompt(label: str, bsa: dict | None, **train) -> dict:
    """The shipped training workflow, its SaveLoRA swapped for KeepTraining; without `bsa` the BSA node is
    bypassed (dense); `train` overrides TrainLoraNode inputs."""
    prompt = json.loads(WORKFLOW.read_text())
    trainer = next(node for node in prompt.values() if node["class_type"] == "TrainLoraNode")
    bsa_id = next(i for i, node in prompt.items() if node["class_type"] == "BSASparseAttention")
    if bsa is None:
        trainer["inputs"]["model"] = prompt.pop(bsa_id)["inputs"]["model"]
    else:
        prompt[bsa_id]["inputs"].update(bsa)
    trainer["inputs"].update(train)
    trainer_id = next(i for i, node in prompt.items() if node is trainer)
    save_id = next(i for i, node in prompt.items() if node["class_type"] == "SaveLoRA")
    prompt[save_id] = {"class_type": "KeepTraining",
                       "inputs": {"label": label, "lora": [trainer_id, 1], "loss": [trainer_id, 2]}}
    return prompt


def train(runner, caplog, label, bsa, **train) -> tuple[dict, list, dict | None]:
    """(LoRA weights, losses, the BSA run's stats or None). TrainSampler draws sigmas from torch's global RNG."""
    caplog.clear()
    torch.manual_seed(0)
    runner.run(train_prompt(label, bsa, **train))
    runs = [r.bsa_run for r in caplog.records if hasattr(r, "bsa_run")]
    assert len(runs) == (bsa is not None)
    return (*SEEN[label], runs[0] if runs else None)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def test_lora_trains_with_bsa_and_differs_from_dense(runner, caplog):
    caplog.set_level(logging.INFO)
    lora, losses, stats = train(runner, caplog, "bsa", {})
    assert stats["sparse_calls"] == 2 * len(losses), "both blocks sparse in every step, recomputes not counted"
    assert stats["kept_kv_pct"] < 60
    assert max(losses[-2:]) < losses[0], losses
    dense_lora, dense_losses, _ = train(runner, caplog, "dense", None)
    assert max(dense_losses[-2:]) < dense_losses[0], dense_losses
    assert max_difference(lora, dense_lora) > 1e-3


def test_checkpointing_recomputes_what_the_forward_ran(runner, caplog):
    """dense_blocks and a sigma window that splits the training sigmas: with gradient checkpointing the
    recompute (last block first) must take each call's forward decisions, so SGD steps give the LoRA they give
    without checkpointing (a mismatch raises CheckpointError or changes the gradient)."""
    caplog.set_level(logging.INFO)
    bsa = {"dense_blocks": "1", "start_percent": 0.0, "end_percent": 0.6}
    sgd = dict(optimizer="SGD", learning_rate=0.05, steps=4)
    on, _, stats_on = train(runner, caplog, "checkpointing", bsa, gradient_checkpointing=True, **sgd)
    off, _, stats_off = train(runner, caplog, "no checkpointing", bsa, gradient_checkpointing=False, **sgd)
    assert stats_on == stats_off
    sparse, reasons = stats_on["sparse_calls"], stats_on["dense_reasons"]
    outside = reasons.get("sigma outside start_percent..end_percent", 0)
    assert sparse > 0 and outside > 0, stats_on  # a step in the window (block 0 sparse, block 1 dense), one outside
    assert reasons.get("block listed in dense_blocks") == sparse and 2 * sparse + outside == 2 * sgd["steps"], stats_on
    assert max_difference(on, off) < 1e-5
