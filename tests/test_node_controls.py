"""Every control the BSA node shows at its default mode changes the sampled latent; the one it hides there
(kv_threshold, read only in cumulative mode) does not. The tiny Wan through the node and ComfyUI's sampler
on the CPU (the pure-torch reference), 3 steps: at the default start_percent 0.2 the first step is dense and
the other two sparse."""
import re

import pytest
import torch

from comfy_env import REPO, require_comfyui, tiny_wan, tiny_wan_path  # noqa: F401  (fixtures)

require_comfyui()

import nodes  # noqa: E402

from comfyui_bsa.nodes.nodes_bsa_attention import BSASparseAttention  # noqa: E402

STEPS = 3
SCHEMA_DEFAULTS = {i.id: i.default for i in BSASparseAttention.GET_SCHEMA().inputs if i.id != "model"}
# The node's defaults, but the tiny Wan's 320 tokens are far below the default min_tokens (8192), which would
# keep every call dense; 0 lets every call be sparse.
BASE = {"min_tokens": 0}
# One move per control shown at the default mode (statistical), each away from the default.
MOVES = {
    "threshold_mode": "cumulative",
    "stat_lambda": 2.0,
    "keep_ratio": 0.5,
    "cube_size": "2x8x8",
    "start_percent": 0.0,  # the first step becomes sparse too
    "end_percent": 0.5,  # the last step becomes dense
    "min_blocks": 4,
    "dense_blocks": "0",
    "min_tokens": 512,  # above the 320 tokens: every call dense
    "pooled_remainder": False,
}


def sample(model):
    """Latent of a short cfg run; grid 5x8x8 = 320 tokens, 8 cubes of 4x4x4."""
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 16, 4096, generator=g), {}]]
    negative = [[torch.randn(1, 16, 4096, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 16, 5, 16, 16)}
    return nodes.common_ksampler(model, 7, STEPS, 3.0, "euler", "simple", positive, negative, latent)[0]["samples"]


def node_latent(tiny_wan, **inputs):
    return sample(BSASparseAttention.execute(tiny_wan, **{**BASE, **inputs}).result[0])


def hidden_at_the_default_mode() -> set[str]:
    """The sparsity controls web/bsa_mode_controls.js hides while threshold_mode is at its default."""
    text = (REPO / "web" / "bsa_mode_controls.js").read_text()
    body = re.search(r"const MODE_CONTROL = \{(.*?)\};", text, re.S)[1]
    mode_control = dict(re.findall(r'(\w+): "(\w+)"', body))
    default_mode = SCHEMA_DEFAULTS["threshold_mode"]
    assert default_mode in mode_control
    return {name for mode, name in mode_control.items() if mode != default_mode}


@pytest.fixture(scope="module")
def base_latent(tiny_wan, one_torch_thread):
    return node_latent(tiny_wan)


def test_every_control_shown_at_the_default_mode_is_moved():
    assert hidden_at_the_default_mode() == {"kv_threshold"}
    assert set(MOVES) == set(SCHEMA_DEFAULTS) - hidden_at_the_default_mode()


@pytest.mark.parametrize("name,value", MOVES.items(), ids=[f"{n}={v}" for n, v in MOVES.items()])
def test_moving_a_shown_control_changes_the_output(tiny_wan, base_latent, name, value):
    assert value != {**SCHEMA_DEFAULTS, **BASE}[name], "a move must leave the base setting"
    latent = node_latent(tiny_wan, **{name: value})
    assert (latent - base_latent).abs().max() > 1e-2, f"{name}={value!r} left the latent unchanged"


@pytest.mark.parametrize("value", [0.3, 1.0], ids=lambda v: f"kv_threshold={v}")
def test_the_hidden_control_changes_nothing_in_statistical_mode(tiny_wan, base_latent, value):
    """Why the frontend hides kv_threshold at the default mode: moving it has no effect there."""
    assert SCHEMA_DEFAULTS["threshold_mode"] == "statistical" and value != SCHEMA_DEFAULTS["kv_threshold"]
    assert torch.equal(node_latent(tiny_wan, kv_threshold=value), base_latent)
