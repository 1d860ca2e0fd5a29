"""Reliability on CPU: bounded temporaries, independent and resettable patch state, a 50-run soak,
bad node inputs rejected at execute with the accepted range in the message."""
import gc
import logging
import math
import pathlib

import pytest
import torch

from comfyui_bsa.bsa_core import BSAConfig
from comfyui_bsa.bsa_core.reference import keep_counts
from comfyui_bsa.bsa_core.cubes import cube_layout


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors


_MEASURE = r"""
import json, math, sys
import torch
sys.path.insert(0, sys.argv[1])
import conftest  # noqa: F401  (loads the pack as comfyui_bsa)
from memory_probe import LargestTemporary
from comfyui_bsa.bsa_core import BSAConfig, bsa_attention
from comfyui_bsa.bsa_core import reference

args = json.loads(sys.argv[2])
torch.set_num_threads(1)
if args["chunk"]:
    reference._CHUNK_ELEMENTS = args["chunk"]
grid = tuple(args["grid"])
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(args["B"], args["H"], math.prod(grid), args["D"], generator=g) for _ in range(3))
largest = LargestTemporary()
with largest:
    out, _ = bsa_attention(q, k, v, grid, BSAConfig(cube_size=tuple(args["cube"]), keep_ratio=args["keep"],
                                                  kv_threshold=args["p"],
         threshold_mode="cumulative", pooled_remainder=False))
print(json.dumps({"nbytes": largest.nbytes, "op": largest.op, "finite": bool(torch.isfinite(out).all()),
                  "chunk": reference._CHUNK_ELEMENTS}))
"""


def largest_temporary(**args) -> dict:
    """The largest storage any aten op creates during one bsa_attention call (a TorchDispatchMode:
    deterministic, unlike RSS). In a child process: the mode must not touch this process's dispatcher
    state (a later bsa::attention custom-op call crashed after it, now and then)."""
    import json
    import subprocess
    import sys
    tests = str(pathlib.Path(__file__).parent)
    result = subprocess.run([sys.executable, "-c", _MEASURE, tests, json.dumps(args)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- memory ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [4, 16], ids=["L4096", "L16384"])
def test_largest_temporary_is_linear_in_tokens(T):
    """No temporary grows like L^2/S: the largest is an attention chunk, one [B,H,L,D]-sized tensor,
    a cube row of logits, or a cubes x cubes selection table (O(N^2), what BSA_SPEC allows)."""
    chunk = 1 << 16
    B, H, D, grid, cube = 1, 1, 8, (T, 32, 32), (4, 4, 4)
    config = BSAConfig(cube_size=cube, keep_ratio=0.05, kv_threshold=0.5,
                       threshold_mode="cumulative", pooled_remainder=False)
    L = math.prod(grid)
    layout = cube_layout(grid, cube)
    N, S = layout.num_cubes, layout.cube_volume
    Kq = int(keep_counts(layout.n_valid, config.keep_ratio).max())
    bound = max(4 * chunk,  # one chunk of fp32 logits
                4 * B * H * Kq * N * S,  # one cube row of logits when a row alone exceeds the chunk
                8 * B * H * N * S * D,  # a [B,H,L,D] tensor in a 64-bit type
                8 * B * H * N * N * 2)  # selection tables [B,H,N,N] (int64 sort, with slack)
    got = largest_temporary(chunk=chunk, grid=grid, cube=cube, B=B, H=H, D=D, keep=0.05, p=0.5)
    print(f"L={L}: largest temporary {got['nbytes'] / 1e6:.2f} MB ({got['op']}), bound {bound / 1e6:.2f} MB")
    assert got["finite"]
    assert got["nbytes"] <= bound, f"L={L}: {got['op']} is {got['nbytes'] / 1e6:.2f} MB > {bound / 1e6:.2f} MB"


def test_default_chunk_bounds_the_attention_temporary():
    """With the shipped chunk size, the logits of 2 heads x 16k tokens stay one 64 MiB chunk."""
    got = largest_temporary(chunk=0, grid=(16, 32, 32), cube=(4, 4, 4), B=1, H=2, D=8, keep=0.05, p=0.5)
    assert got["finite"] and got["nbytes"] <= 4 * got["chunk"], got["op"]


# ---- ComfyUI: the node, patch state, soak ---------------------------------------------------------

@pytest.fixture(scope="module")
def wan(request):
    """The tiny Wan 2.1 through ComfyUI's loader; skips this part without ComfyUI."""
    from comfy_env import require_comfyui
    require_comfyui()
    return request.getfixturevalue("tiny_wan")


from comfy_env import tiny_wan, tiny_wan_path  # noqa: E402,F401  (fixtures)

NODE = dict(keep_ratio=0.5, kv_threshold=0.9, cube_size="4x4x4", threshold_mode="cumulative", start_percent=0.0,
            end_percent=1.0, stat_lambda=1.0, min_blocks=1, dense_blocks="", min_tokens=0)


def node_model(wan, **settings):
    from comfyui_bsa.nodes.nodes_bsa_attention import BSASparseAttention
    return BSASparseAttention.execute(wan, **{**NODE, **settings}).result[0]


def options_of(model):
    from comfyui_bsa.bsa_core.patch import find_options
    return find_options(model)


def conds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 16, 4096, generator=g), {}]], [[torch.randn(1, 16, 4096, generator=g), {}]]


def sample(model, frames=5, height=16, width=16, steps=1, callback=None, start_step=None, last_step=None,
           latent=None, seed=0):
    """Latent of a short cfg run; grid frames x height/2 x width/2 tokens."""
    import comfy.sample
    positive, negative = conds()
    latent = torch.zeros(1, 16, frames, height, width) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 3.0, "euler", "simple", positive, negative, latent,
                               start_step=start_step, last_step=last_step, callback=callback, disable_pbar=True,
                               seed=seed)


def runs_logged(caplog) -> list[dict]:
    return [r.bsa_run for r in caplog.records if hasattr(r, "bsa_run")]


def fresh_state(model) -> bool:
    """Nothing of a run left in the model: the override and the run state live in the sampler's copy only."""
    from comfyui_bsa.bsa_core.patch import OVERRIDE_KEY, RUN_KEY
    options = model.model_options["transformer_options"]
    return OVERRIDE_KEY not in options and RUN_KEY not in options


def test_two_patched_models_keep_independent_state(wan, caplog):
    """A Wan 2.2 style high/low pair: two patched clones, different settings, one sampling schedule."""
    caplog.set_level(logging.INFO)
    high = node_model(wan, keep_ratio=0.5, cube_size="4x4x4")
    low = node_model(wan, keep_ratio=0.25, kv_threshold=0.5, cube_size="2x8x8", dense_blocks="1")
    assert options_of(high) is not options_of(low)
    first = sample(high, steps=4, start_step=0, last_step=2)
    caplog.clear()
    both = sample(low, steps=4, start_step=2, last_step=4, latent=first)
    (low_run,) = runs_logged(caplog)
    assert low_run["kept_query_pct"] == pytest.approx(25.0) and low_run["dense_reasons"].get("block listed in "
                                                                                           "dense_blocks") == 2
    assert fresh_state(high) and fresh_state(low)
    # the second stage alone, from the same latent, with a freshly patched low model: same output
    alone = sample(node_model(wan, keep_ratio=0.25, kv_threshold=0.5, cube_size="2x8x8", dense_blocks="1"), steps=4,
                   start_step=2, last_step=4, latent=first)
    assert torch.equal(both, alone)
    # interleaving the two models does not mix their stats
    caplog.clear()
    sample(high, steps=2)
    sample(low, steps=2)
    high_run, low_run = runs_logged(caplog)
    assert high_run["kept_query_pct"] == pytest.approx(50.0) and low_run["kept_query_pct"] == pytest.approx(25.0)
    assert high_run["sparse_calls"] == 4 and high_run["dense_reasons"] == {"cross-attention": 4}
    assert low_run["sparse_calls"] == 2 and low_run["dense_reasons"]["block listed in dense_blocks"] == 2


class Cancel(Exception):
    pass


def test_cancelled_run_leaves_nothing_behind(wan, caplog):
    caplog.set_level(logging.INFO)
    model = node_model(wan, keep_ratio=0.5, kv_threshold=0.7)
    reference = sample(node_model(wan, keep_ratio=0.5, kv_threshold=0.7), steps=3)

    def cancel(step, *args):
        if step == 1:
            raise Cancel("user cancelled")

    with pytest.raises(Cancel):
        sample(model, steps=3, callback=cancel)
    assert fresh_state(model), "the cancelled run left state in the model"
    caplog.clear()
    again = sample(model, steps=3)
    assert torch.equal(again, reference)
    (run,) = runs_logged(caplog)
    assert run["sparse_calls"] == 6 and run["dense_calls"] == 6, run
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("[BSA] dense:")] == [
        "[BSA] dense: cross-attention"]


def test_state_resets_at_cleanup(wan, caplog):
    caplog.set_level(logging.INFO)
    model = node_model(wan)
    sample(model, steps=2)
    assert fresh_state(model)
    sample(model, steps=2)
    first, second = runs_logged(caplog)
    assert first == second, "the second run's stats include the first's"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[BSA] dense:")]
    assert lines == ["[BSA] dense: cross-attention"] * 2, "each run logs its reasons once"


def test_a_later_override_is_chained_every_run_and_left_as_it_was(wan, caplog):
    """A node applied after ours sets its own override: each run puts BSA on top of it in the sampler's copy
    of the options (its dense calls go to that override), and the later model keeps exactly its own."""
    from comfyui_bsa.bsa_core.patch import OVERRIDE_KEY
    caplog.set_level(logging.INFO)
    model = node_model(wan)
    later = model.clone()
    calls = []

    def foreign(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs)

    later.model_options["transformer_options"][OVERRIDE_KEY] = foreign
    for run in range(3):
        sample(later, 1, 8, 8)
        assert later.model_options["transformer_options"][OVERRIDE_KEY] is foreign
        assert len(calls) == 2 * (run + 1), "the later override got BSA's dense (cross-attention) calls"
    assert [r["sparse_calls"] for r in runs_logged(caplog)] == [2, 2, 2]


def test_cross_attention_with_text_as_long_as_the_video_stays_dense(wan, caplog):
    """Text exactly as long as the video (1x4x4 = 16 tokens here; 512 for padded umT5): the block
    order tells the cross-attention apart, so each block counts once and cross stays dense."""
    caplog.set_level(logging.INFO)
    sample(node_model(wan), 1, 8, 8)  # grid 1x4x4 = 16 tokens, text 16 tokens
    (run,) = runs_logged(caplog)
    assert run["sparse_calls"] == 2 and run["dense_reasons"] == {"cross-attention": 2}, run


def rss_mb() -> float:
    import psutil
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def test_soak_fifty_runs(wan, caplog):
    """50 one-step runs through the node, resolutions and settings varying: equal inputs give bitwise
    equal outputs, process memory does not grow over the last 25 runs, the layout cache stays bounded."""
    from comfyui_bsa.bsa_core.cubes import _cube_layout
    caplog.set_level(logging.WARNING)  # no record kept per run
    cubes, modes = ["4x4x4", "2x8x8", "4x4x8", "4x8x8"], ["cumulative", "statistical"]
    configs = [dict(frames=1 + i % 3, height=8 + 4 * (i % 3), width=8 + 4 * (i // 3 % 3),
                    settings=dict(keep_ratio=(0.05, 0.3, 0.5, 1.0)[i % 4], kv_threshold=(0.2, 0.9, 1.0)[i % 3],
                                  cube_size=cubes[i % 4], threshold_mode=modes[i // 4 % 2], min_blocks=1 + i % 3))
               for i in range(40)]
    repeated = [0, 7, 13]  # runs 40..49 repeat these configs (and one from the first half is run again)
    schedule = configs + [configs[i] for i in repeated * 3 + [21]]
    outputs, rss = {}, {}
    for run, c in enumerate(schedule):
        if run == 25:
            rss[25] = rss_mb()
        out = sample(node_model(wan, **c["settings"]), c["frames"], c["height"], c["width"], steps=1)
        assert torch.isfinite(out).all()
        key = configs.index(c)
        if key in outputs:
            assert torch.equal(out, outputs[key]), f"run {run}: config {key} gave a different output"
        outputs[key] = out
    rss[50] = rss_mb()
    growth = rss[50] - rss[25]
    info = _cube_layout.cache_info()
    message = (f"RSS after run 25: {rss[25]:.1f} MiB, after run 50: {rss[50]:.1f} MiB, growth {growth:+.1f} MiB; "
               f"layout cache {info.currsize}/{info.maxsize} (hits {info.hits}, misses {info.misses})")
    print(message)
    assert not [r for r in caplog.records if r.getMessage().startswith("[BSA] dense: BSA failed")], message
    assert info.currsize <= info.maxsize, message
    assert growth < 40, message


# ---- bad node inputs: rejected at execute, naming the input and what it accepts ---------------------

UNIT = r"in \(0, 1\]"
BAD_INPUTS = [
    ({"keep_ratio": 0.0}, "keep_ratio", UNIT), ({"keep_ratio": -0.5}, "keep_ratio", UNIT),
    ({"keep_ratio": 1.5}, "keep_ratio", UNIT), ({"keep_ratio": math.nan}, "keep_ratio", UNIT),
    ({"kv_threshold": 0.0}, "kv_threshold", UNIT), ({"kv_threshold": math.inf}, "kv_threshold", UNIT),
    ({"kv_threshold": 2.0}, "kv_threshold", UNIT),
    ({"cube_size": "4x4"}, "cube_size", r"one of 4x4x4, 2x8x8, 4x4x8, 4x8x8"), ({"cube_size": "ax4x4"}, "cube_size", r"one of 4x4x4, 2x8x8, 4x4x8, 4x8x8"),
    ({"cube_size": ""}, "cube_size", r"one of 4x4x4, 2x8x8, 4x4x8, 4x8x8"), ({"cube_size": "0x4x4"}, "cube_size", r"one of 4x4x4, 2x8x8, 4x4x8, 4x8x8"),
    ({"cube_size": "4x4x65"}, "cube_size", r"one of 4x4x4, 2x8x8, 4x4x8, 4x8x8"), ({"cube_size": "4x4x4x4"}, "cube_size", r"one of 4x4x4, 2x8x8, 4x4x8, 4x8x8"),
    ({"cube_size": "1x1x1"}, "cube_size", r"one of 4x4x4, 2x8x8, 4x4x8, 4x8x8"), ({"cube_size": "64x64x64"}, "cube_size", r"one of 4x4x4, 2x8x8, 4x4x8, 4x8x8"),
    ({"threshold_mode": "topk"}, "threshold_mode", "cumulative.*statistical"),
    ({"threshold_mode": ""}, "threshold_mode", "cumulative.*statistical"),
    ({"stat_lambda": math.nan}, "stat_lambda", r"\[-10, 10\]"), ({"stat_lambda": 11.0}, "stat_lambda", r"\[-10, 10\]"),
    ({"min_blocks": 0}, "min_blocks", ">= 1"), ({"min_blocks": 2.5}, "min_blocks", ">= 1"),
    ({"min_tokens": -1}, "min_tokens", ">= 0"),
    ({"start_percent": 0.8, "end_percent": 0.5}, "start_percent", "0 <= start_percent <= end_percent <= 1"),
    ({"end_percent": 1.5}, "end_percent", "0 <= start_percent <= end_percent <= 1"),
    ({"start_percent": -0.1}, "start_percent", "0 <= start_percent <= end_percent <= 1"),
    ({"start_percent": math.nan}, "start_percent", "0 <= start_percent <= end_percent <= 1"),
    ({"dense_blocks": "0,a"}, "dense_blocks", "0,1,28-29"), ({"dense_blocks": "1;2"}, "dense_blocks", "0,1,28-29"),
    ({"dense_blocks": "-1"}, "dense_blocks", "0,1,28-29"), ({"dense_blocks": "1-"}, "dense_blocks", "0,1,28-29"),
    ({"dense_blocks": "1.5"}, "dense_blocks", "0,1,28-29"), ({"dense_blocks": "5-3"}, "dense_blocks", "'3-5'"),
]


@pytest.mark.parametrize("bad,name,accepted", BAD_INPUTS,
                         ids=[f"{k}={v!r}" for bad, _, _ in BAD_INPUTS for k, v in list(bad.items())[-1:]])
def test_bad_node_input_names_input_and_range(wan, bad, name, accepted):
    """Raised by execute, so before any sampling; the model given to the node is untouched."""
    from comfyui_bsa.bsa_core.patch import OVERRIDE_KEY
    with pytest.raises(ValueError, match=name) as error:
        node_model(wan, **bad)
    assert name in str(error.value)
    import re
    assert re.search(accepted, str(error.value)), str(error.value)
    assert OVERRIDE_KEY not in wan.model_options["transformer_options"]


def test_node_inputs_fuzz(wan):
    """Any mix of in- and out-of-range values: a patched model, or a ValueError naming a bad input."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-0.5, 1.5))
    inputs = st.fixed_dictionaries({
        "keep_ratio": number, "kv_threshold": number, "start_percent": number, "end_percent": number,
        "stat_lambda": st.one_of(st.floats(-20, 20), st.just(math.nan)),
        "cube_size": st.one_of(st.sampled_from(["4x4x4", "2x8x8", "4x4x8", "4x8x8", "4x4", "0x1x1", "x"]),
                               st.text(max_size=8)),
        "threshold_mode": st.sampled_from(["cumulative", "statistical", "topk"]),
        "min_blocks": st.integers(-2, 5000), "min_tokens": st.integers(-2, 1 << 21),
        "dense_blocks": st.one_of(st.sampled_from(["", "0", "0,1,28-29", "3-1", " 2 , 4 "]), st.text(max_size=8)),
    })

    @settings(max_examples=80, deadline=None, derandomize=True)
    @given(values=inputs)
    def check(values):
        try:
            model = node_model(wan, **values)
        except ValueError as error:
            assert any(name in str(error) for name in values), str(error)
        else:
            assert model is not wan
    check()
