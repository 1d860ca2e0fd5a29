"""training/: the synthetic set, the schedules, and the loop run on the CPU at a tiny size (dim 256, 2 blocks,
2 latent frames of 8x8): resume, EMA, accumulation, previews, and the exported file in ComfyUI."""
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from comfy_env import require_comfyui
from safetensors.torch import load_file

from comfyui_bsa.bsa_core.config import BSAConfig
from comfyui_bsa.training import TrainConfig, data, train
from comfyui_bsa.training.loop import EXPORT_FILE, LOG_FILE, STATE_FILE, lr_factor
from comfyui_bsa.training.model import export_comfyui, initial_state_dict
from comfyui_bsa.training.sparsity import SparsityRamp

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(run_dir, **changes) -> TrainConfig:
    return TrainConfig(**{"run_dir": str(run_dir), "frames": 2, "latent_size": 8, "num_videos": 10, "text_tokens": 4,
                          "batch_size": 2, "max_steps": 4, "warmup_steps": 2, "log_every": 1, "preview_every": 100,
                          "checkpoint_every": 100, "preview_steps": 2, **changes})


# ---- the synthetic set ---------------------------------------------------------------------------------------

def test_decoder_inverts_encoder_and_latents_have_unit_scale():
    videos = data.SyntheticVideos(frames=3, latent_size=8, num_videos=8, text_tokens=4)
    pixels = videos.render(range(8))
    latents = data.encode(pixels)
    assert pixels.shape == (8, 3, 3, 16, 16) and latents.shape == (8, 16, 3, 8, 8)
    assert torch.allclose(data.decode(latents), pixels, atol=1e-6)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert 0.6 < latents.std() < 1.4  # LATENT_SCALE keeps the flow-matching target near unit scale


def test_videos_are_a_function_of_seed_and_index():
    a, b = (data.SyntheticVideos(2, 8, 6, 4, seed=3) for _ in range(2))
    assert torch.equal(a.render([5, 1]), b.render([5, 1]))
    assert torch.equal(a.render([5, 1])[1], a.render([1])[0])  # a video does not depend on its batch
    assert torch.equal(a.embeddings, b.embeddings)
    assert not torch.equal(a.render([5]), data.SyntheticVideos(2, 8, 6, 4, seed=4).render([5]))


@pytest.mark.parametrize("shape", data.SHAPES)
def test_object_colour_sits_at_its_centre_and_bounces_inside_the_frame(shape):
    """The pixel under the object's centre has the caption's colour; the centre never leaves the frame."""
    videos = data.SyntheticVideos(frames=40, latent_size=16, num_videos=200, text_tokens=1)
    index = next(i for i in range(200) if data.caption(int(videos.params(i)["class_id"])).endswith(shape))
    p = videos.params(index)
    pixels = videos.render([index])[0]  # [3, T, 32, 32]
    colour = torch.tensor(data.COLOURS[data.caption(int(p["class_id"])).split()[0]])
    position = p["start"] + p["velocity"] * torch.arange(40.0).unsqueeze(1)  # unfolded straight line
    span = 1 - 2 * p["radius"]
    centre = p["radius"] + span - ((position - p["radius"]).remainder(2 * span) - span).abs()  # folded by hand
    assert ((centre >= p["radius"]) & (centre <= 1 - p["radius"])).all()
    for t in range(40):
        x, y = (centre[t] * 32).long().clamp(0, 31)
        assert torch.allclose(pixels[:, t, y, x], colour, atol=1e-6), t


def test_stream_walks_each_epoch_once_and_resumes_from_its_state():
    videos = data.SyntheticVideos(1, 8, 10, 1)
    stream = data.BatchStream(videos, batch_size=3)
    first_epoch = sum((stream.next_indices() for _ in range(3)), []) + stream.next_indices()[:1]
    assert sorted(first_epoch) == list(range(10))
    state = stream.state_dict()
    expected = [stream.next_indices() for _ in range(4)]
    resumed = data.BatchStream(videos, batch_size=3)
    resumed.load_state_dict(state)
    assert [resumed.next_indices() for _ in range(4)] == expected


# ---- schedules -----------------------------------------------------------------------------------------------

def test_lr_warms_up_linearly_then_follows_a_cosine_to_min_lr(tmp_path):
    config = tiny_config(tmp_path, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lrs = [config.lr * lr_factor(s, config) for s in range(111)]
    assert lrs[:10] == pytest.approx([1e-4 * (s + 1) for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx((1e-3 + 1e-4) / 2)  # half way down the cosine
    assert lrs[35] == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert lrs[110] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_ramp_is_dense_up_to_its_start_then_interpolates_to_the_target():
    target = BSAConfig(keep_ratio=0.5, stat_lambda=1.0, kv_threshold=0.6)
    ramp = SparsityRamp(target, start=10, ramp_steps=4, from_lambda=-3.0)
    assert [ramp.at(s) for s in (0, 9, 10)] == [None, None, None]
    quarter = ramp.at(11)
    assert (quarter.keep_ratio, quarter.stat_lambda, quarter.kv_threshold) == pytest.approx((0.875, -2.0, 0.9))
    assert ramp.at(12).stat_lambda == pytest.approx(-1.0)
    assert ramp.at(14) == target and ramp.at(1000) == target
    assert quarter.cube_size == target.cube_size and quarter.threshold_mode == target.threshold_mode
    assert SparsityRamp(target, start=3).at(3) is None and SparsityRamp(target, start=3).at(4) == target
    assert SparsityRamp(None, start=0).at(5) is None


# ---- the loop ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def comfy():
    require_comfyui()


def _state(run_dir):
    return torch.load(run_dir / STATE_FILE, weights_only=False)


def _assert_states_equal(a, b):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    for index, slot in a["optimizer"]["state"].items():
        for key, value in slot.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    assert a["scheduler"] == b["scheduler"] and a["data"] == b["data"] and a["step"] == b["step"]


def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(comfy, tmp_path):
    straight = train(tiny_config(tmp_path / "straight"), progress=False)
    first = train(tiny_config(tmp_path / "resumed"), stop_at=2, progress=False)
    assert [r["step"] for r in first] == [1, 2]
    with open(tmp_path / "resumed" / LOG_FILE, "a") as log:  # a step logged by a run killed before its checkpoint
        log.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    second = train(tiny_config(tmp_path / "resumed"), progress=False)
    assert [r["step"] for r in second] == [3, 4]
    assert [r["loss"] for r in first + second] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in first + second] == [r["grad_norm"] for r in straight]
    _assert_states_equal(_state(tmp_path / "straight"), _state(tmp_path / "resumed"))
    logged = [json.loads(line) for line in (tmp_path / "resumed" / LOG_FILE).read_text().splitlines()]
    assert logged == first + second
    with pytest.raises(ValueError, match="differs"):
        train(tiny_config(tmp_path / "resumed", lr=1e-2), progress=False)


def test_crashes_leave_a_run_that_resumes_cleanly(comfy, tmp_path, monkeypatch):
    """A run killed before its first checkpoint starts its log again; a torn last log line is dropped; a run folder
    moved elsewhere resumes; an export torn by a crash is never behind state.pt (written first, atomically)."""
    import shutil

    from comfyui_bsa.training import loop
    update = loop.EMA.update

    def killed_at_step_3(self, model, step):
        if step == 2:
            raise KeyboardInterrupt
        update(self, model, step)

    monkeypatch.setattr(loop.EMA, "update", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "a"), progress=False)  # steps 1, 2 logged, no checkpoint
    monkeypatch.setattr(loop.EMA, "update", update)
    train(tiny_config(tmp_path / "a"), stop_at=2, progress=False)
    with open(tmp_path / "a" / LOG_FILE, "a") as log:
        log.write('{"step": 3, "loss": 0.12')  # a crash mid-append
    shutil.move(tmp_path / "a", tmp_path / "b")
    export = loop.export_comfyui

    def torn_export(state, path, dtype):
        path.with_suffix(path.suffix + ".tmp").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "export_comfyui", torn_export)
    with pytest.raises(KeyboardInterrupt):  # dies at its final checkpoint, inside the export
        train(tiny_config(tmp_path / "b"), progress=False)
    assert torch.load(tmp_path / "b" / STATE_FILE, weights_only=False)["step"] == 2  # state.pt not ahead
    monkeypatch.setattr(loop, "export_comfyui", export)
    assert [r["step"] for r in train(tiny_config(tmp_path / "b"), progress=False)] == [3, 4]
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / LOG_FILE).read_text().splitlines()]
    assert logged == [1, 2, 3, 4]
    exported, ema = load_file(str(tmp_path / "b" / EXPORT_FILE)), _state(tmp_path / "b")["ema"]
    assert all(torch.equal(exported[name], ema[name].half()) for name in ema)


def test_non_finite_step_stops_before_it_is_applied_or_saved(comfy, tmp_path):
    config = tiny_config(tmp_path, lr=1e4, min_lr=0.0, warmup_steps=1, max_steps=6, grad_clip=0.0, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="nothing of this step was applied or saved"):
        train(config, progress=False)
    state = _state(tmp_path)
    assert state["step"] >= 1 and all(torch.isfinite(w).all() for w in state["model"].values())


def test_ema_is_the_hand_computed_average_of_the_weights(comfy, tmp_path):
    config = tiny_config(tmp_path, ema_decay=0.5, max_steps=3)
    weights = [initial_state_dict(config.dim, config.layers, config.ffn_dim, config.seed)]
    for stop in (1, 2, 3):
        train(config, stop_at=stop, progress=False)
        weights.append(_state(tmp_path)["model"])
    ema = _state(tmp_path)["ema"]
    for name in ("blocks.1.self_attn.q.weight", "head.head.bias", "patch_embedding.weight"):
        expected = weights[0][name].double()
        for step in range(3):
            decay = min(0.5, (1 + step) / (10 + step))  # 0.1, 0.1818..., 0.25
            expected = decay * expected + (1 - decay) * weights[step + 1][name].double()
        assert torch.allclose(ema[name].double(), expected, rtol=1e-6, atol=1e-7), name
        assert not torch.allclose(ema[name], weights[3][name])


def test_accumulated_micro_batches_equal_one_large_batch(comfy, tmp_path):
    """2 micro-batches of 2 vs one batch of 4 over the same videos and noise, clipping off. Adam's eps = 1
    makes its first update ~ lr * gradient, so the weights show the gradient's scale, not only its sign."""
    common = dict(max_steps=1, grad_clip=0.0, adam_eps=1.0, lr=1.0, min_lr=0.0, warmup_steps=1)
    accumulated = train(tiny_config(tmp_path / "acc", batch_size=2, grad_accum=2, **common), progress=False)
    large = train(tiny_config(tmp_path / "large", batch_size=4, grad_accum=1, **common), progress=False)
    assert accumulated[0]["loss"] == pytest.approx(large[0]["loss"], rel=1e-6)
    assert accumulated[0]["grad_norm"] == pytest.approx(large[0]["grad_norm"], rel=1e-5)
    a, b = _state(tmp_path / "acc")["model"], _state(tmp_path / "large")["model"]
    initial = initial_state_dict(256, 2, 512, 0)
    for name in a:
        update_a, update_b = a[name] - initial[name], b[name] - initial[name]
        assert (update_a - update_b).norm() <= 1e-4 * update_b.norm(), name  # weights ~0.1 in float32, updates ~1e-3


def test_distillation_blends_the_teachers_velocity_into_the_target(comfy, tmp_path):
    """A student starting from its teacher's weights: the teacher's velocity is the student's, so the first
    step's loss is (1 - w) times the plain flow-matching loss of the same batch, which the row also logs as
    flow_loss, and with w = 1 nothing moves."""
    teacher = export_comfyui(initial_state_dict(256, 2, 512, 0), tmp_path / "teacher.safetensors", torch.float32)
    common = {"max_steps": 1, "init_from": str(teacher)}
    plain = train(tiny_config(tmp_path / "plain", **common), progress=False)[0]
    for weight in (0.5, 1.0):
        row = train(tiny_config(tmp_path / f"w{weight}", distill_from=str(teacher), distill_weight=weight, **common),
                    progress=False)[0]
        assert row["loss"] == pytest.approx((1 - weight) * plain["loss"], rel=1e-5, abs=1e-12), weight
        assert row["flow_loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert row["grad_norm"] == 0.0
    with pytest.raises(ValueError, match="distill_from and distill_weight"):
        tiny_config(tmp_path, distill_weight=0.5)
    with pytest.raises(FileNotFoundError, match="distill_from"):  # before the run folder is made
        train(tiny_config(tmp_path / "missing", distill_from=str(tmp_path / "nope.safetensors"), distill_weight=0.5))
    assert not (tmp_path / "missing").exists()


def test_sparse_distillation_resumes_bit_for_bit_and_refuses_another_teacher(comfy, tmp_path):
    """BSA on the student, a teacher that differs from it: a run paused after step 2 and resumed ends as the
    uninterrupted one; a resume after the teacher's file changed stops with an error naming distill_from."""
    teacher = export_comfyui(initial_state_dict(256, 2, 512, 7), tmp_path / "teacher.safetensors", torch.float16)
    settings = {"distill_from": str(teacher), "distill_weight": 0.7,
                "bsa": {"cube_size": [1, 4, 4], "keep_ratio": 0.5, "threshold_mode": "statistical"}}
    straight = train(tiny_config(tmp_path / "straight", **settings), progress=False)
    resumed = train(tiny_config(tmp_path / "paused", **settings), stop_at=2, progress=False)
    resumed += train(tiny_config(tmp_path / "paused", **settings), progress=False)
    assert resumed == straight and all("flow_loss" in row for row in straight)
    assert any("kept_kv_pct" in row for row in straight)  # the student's attention was sparse
    _assert_states_equal(_state(tmp_path / "straight"), _state(tmp_path / "paused"))
    train(tiny_config(tmp_path / "changed", **settings), stop_at=2, progress=False)
    export_comfyui(initial_state_dict(256, 2, 512, 8), teacher, torch.float16)
    with pytest.raises(ValueError, match="distill_from"):
        train(tiny_config(tmp_path / "changed", **settings), progress=False)


def test_preview_and_exported_model(comfy, tmp_path):
    """The preview is a PNG strip (a row per caption, a column per frame); the exported EMA weights load with
    ComfyUI's own loader as WAN21_T2V, and comfy.sample's euler gives what the loop's sampler gives."""
    from PIL import Image

    config = tiny_config(tmp_path, max_steps=2, preview_every=2)
    train(config, progress=False)
    preview = Image.open(tmp_path / "previews" / "step_0000002.png")
    assert preview.size == (config.frames * 16, len(config.preview_classes) * 16)
    assert preview.text["captions"] == " | ".join(data.caption(c) for c in config.preview_classes)

    import comfy.sample
    import comfy.samplers
    import comfy.sd

    from comfyui_bsa.training.model import sample_euler, sampling_sigmas, wan_from_state_dict

    model = comfy.sd.load_diffusion_model(str(tmp_path / EXPORT_FILE))
    assert type(model.model.model_config).__name__ == "WAN21_T2V"
    exported = load_file(str(tmp_path / EXPORT_FILE))
    ema = _state(tmp_path)["ema"]
    assert all(torch.equal(exported[n], ema[n].half()) for n in ema)

    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(1, 16, config.frames, 8, 8, generator=generator)
    context = data.SyntheticVideos(config.frames, 8, 1, config.text_tokens).embeddings[:1]
    sigmas = sampling_sigmas(3, config.shift)
    out = comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                     [[context, {}]], [[torch.zeros_like(context), {}]], torch.zeros_like(noise),
                                     disable_pbar=True)
    ours = sample_euler(wan_from_state_dict(exported), noise, context, sigmas)
    theirs = model.model.latent_format.process_in(out)
    assert (theirs - ours).norm() / ours.norm() < 1e-4


def _bsa_backward_missing() -> str | None:
    """Why a backward through bsa::attention fails here, or None when the op has autograd."""
    from comfyui_bsa.bsa_core.attention import bsa_attention_op
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    out = bsa_attention_op(q, k, v, (2, 4, 4), BSAConfig(cube_size=(1, 2, 2)))[0]
    try:
        out.sum().backward()
    except RuntimeError as error:
        if "autograd" in str(error):
            return str(error)
        raise
    return None


def test_sparse_step_runs_bsa_and_moves_the_weights_differently_from_dense(comfy, tmp_path):
    reason = _bsa_backward_missing()
    if reason is not None:
        pytest.skip(f"bsa::attention has no backward here (branch autograd adds it): {reason}")
    sparse_setting = {"cube_size": [1, 2, 2], "stat_lambda": 1.0}
    common = dict(max_steps=2, grad_clip=0.0, bsa_start_step=0, bsa_ramp_steps=1)
    rows = train(tiny_config(tmp_path / "bsa", bsa=sparse_setting, **common), progress=False)
    dense = train(tiny_config(tmp_path / "dense", **common), progress=False)
    assert "kept_kv_pct" not in rows[0] and rows[0]["loss"] == dense[0]["loss"]  # the ramp's start is dense
    assert 0 < rows[1]["kept_kv_pct"] < 100
    assert math.isfinite(rows[1]["loss"]) and rows[1]["loss"] != dense[1]["loss"]


def test_config_round_trips_through_its_file_and_rejects_unknown_settings(tmp_path):
    config = tiny_config(tmp_path, bsa={"cube_size": [2, 2, 2], "keep_ratio": 0.5}, betas=[0.9, 0.95])
    config.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == config
    (tmp_path / "bad.json").write_text(json.dumps({**dataclasses.asdict(config), "learning_rate": 1}))
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="keep_ratio"):
        tiny_config(tmp_path, bsa={"keep_ratio": 0})


@pytest.mark.parametrize("key, value", [("ema_decay", -1.0), ("ema_decay", 1.5), ("warmup_steps", -5),
                                        ("bsa_ramp_steps", -10), ("bsa_ramp_from_lambda", -20.0),
                                        ("bsa_dense_blocks", "0-x"), ("preview_classes", (0, 99)), ("shift", -1.0),
                                        ("batch_size", True), ("distill_weight", 1.5),
                                        ("distill_weight", True)])
def test_invalid_settings_raise_naming_the_key_before_any_step(tmp_path, key, value):
    with pytest.raises(ValueError, match=key):
        tiny_config(tmp_path, **{key: value})


def test_shipped_configs_load_and_the_dense_model_fits_16_mb():
    configs = {p.stem: TrainConfig.load(p) for p in (REPO / "training" / "configs").glob("*.json")}
    assert {"tiny_wan_dense", "tiny_wan_bsa_finetune"} <= set(configs)
    assert configs["tiny_wan_bsa_finetune"].bsa_config() is not None
    dense = configs["tiny_wan_dense"]
    weights = initial_state_dict(dense.dim, dense.layers, dense.ffn_dim, dense.seed)
    assert sum(w.numel() for w in weights.values()) * 2 <= 16e6  # float16 export


def test_train_tool_runs_pauses_and_fine_tunes_from_a_file(comfy, tmp_path):
    """tools/train.py --config: a run paused after step 1, then a second run starting from its export."""
    from comfy_env import COMFYUI_PATH
    env = {**os.environ, "COMFYUI_PATH": str(COMFYUI_PATH), "OMP_NUM_THREADS": "1"}
    tiny_config(tmp_path / "first").save(tmp_path / "first.json")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "--config", str(tmp_path / "first.json"),
                           "--stop-at", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step 1: loss" in done.stdout and (tmp_path / "first" / EXPORT_FILE).exists()
    config = tiny_config(tmp_path / "second", max_steps=1, lr=0.0, min_lr=0.0,  # a step that keeps the weights
                         init_from=str(tmp_path / "first" / EXPORT_FILE))
    train(config, progress=False)
    exported = load_file(str(tmp_path / "first" / EXPORT_FILE))
    assert all(torch.equal(w, exported[n].float()) for n, w in _state(tmp_path / "second")["model"].items())
