"""2:4 pruning and TEAL activation sparsity (compression/): masks, Wanda scores and thresholds against plain
references, the patch on a clone only, and masks that survive a recovery fine-tune."""
from __future__ import annotations

import pytest
import torch

from comfy_env import require_comfyui, tiny_wan, tiny_wan_path  # noqa: F401  (fixtures)

require_comfyui()
from comfyui_bsa.compression.activation_sparsity import (ActivationSparsityConfig, InputMagnitudes,  # noqa: E402
                                                          apply_activation_sparsity, sigma_bin)
from comfyui_bsa.compression.linears import CalibrationSampling, observe_linear_inputs, target_linears  # noqa: E402
from comfyui_bsa.compression.sparsity24 import (Sparse24Weight, Sparsity24Config, apply_sparsity24,  # noqa: E402
                                                 mask_24, masked_linear_reference, wanda_scores)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_valid_24(mask: torch.Tensor, weight: torch.Tensor | None = None):
    groups = mask.reshape(mask.shape[0], -1, 4)
    assert (groups.sum(-1) == 2).all()
    if weight is not None:  # random weights have no zeros: exactly 2 nonzeros of every 4 after masking
        assert ((weight * mask).reshape(mask.shape[0], -1, 4) != 0).sum(-1).eq(2).all()


@pytest.mark.parametrize("shape", [(8, 16), (64, 256), (3, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_mask_keeps_two_largest_of_every_four(shape):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = mask_24(scores)
    assert_valid_24(mask, scores)
    groups, kept = scores.reshape(shape[0], -1, 4), mask.reshape(shape[0], -1, 4)
    for r in range(shape[0]):  # reference: sort each group by hand
        for g in range(shape[1] // 4):
            order = sorted(range(4), key=lambda i: -float(groups[r, g, i]))
            assert {i for i in range(4) if kept[r, g, i]} == set(order[:2])


def test_mask_rejects_input_dim_not_divisible_by_four():
    with pytest.raises(ValueError, match="in_features"):
        mask_24(torch.randn(4, 6))


def test_magnitude_and_wanda_pick_the_expected_weights():
    weight = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([0.1, 0.1, 10.0, 10.0])  # loud inputs on the small weights
    assert mask_24(weight.abs()).tolist() == [[True, True, False, False]]
    assert mask_24(wanda_scores(weight, norms)).tolist() == [[False, False, True, True]]


def test_masked_dense_equals_explicit_masked_matmul():
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(32, 16)
    mask = mask_24(torch.randn(16, 32, generator=g))
    x = torch.randn(2, 5, 32, generator=g)
    expected = x @ (layer.weight * mask).T + layer.bias
    weight24 = Sparse24Weight(mask)
    torch.testing.assert_close(weight24.linear(layer, x), expected)
    assert not weight24.compressed and weight24.kernel is None  # on the CPU
    torch.testing.assert_close(masked_linear_reference(x, layer.weight, mask, layer.bias), expected)


def test_masked_dense_under_autocast_computes_in_autocast_dtype():
    """float32 weights and input under bf16 autocast (training's previews, the bench): the masked weight is
    made in bf16, which is what lets a GPU compress it; the numbers are autocast's F.linear's."""
    g = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(64, 32)
    mask = mask_24(torch.randn(32, 64, generator=g))
    x = torch.randn(3, 7, 64, generator=g)
    weight24 = Sparse24Weight(mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = weight24.linear(layer, x)
        expected = torch.nn.functional.linear(x, layer.weight * mask, layer.bias)
    assert out.dtype == torch.bfloat16 and weight24.weight_for(layer, x.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.gpu
def test_semi_structured_equals_masked_dense_on_cuda():
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 128).cuda().half()
    mask = mask_24(torch.randn(128, 256))
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    weight24 = Sparse24Weight(mask)
    out = weight24.linear(layer, x)
    assert type(weight24.weight_for(layer, x)).__name__.startswith("SparseSemiStructured") and weight24.compressed
    assert weight24.kernel == ("CUTLASS" if torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS else "cuSPARSELt")
    torch.testing.assert_close(out.float(), masked_linear_reference(x, layer.weight, mask.cuda(), layer.bias),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_semi_structured_under_autocast_equals_masked_dense_on_cuda(dtype):
    """float32 weights and a 3-D float32 input of a token count no multiple of 64, under autocast (the
    bench's and training's setting): compressed in autocast's dtype, the masked dense numbers."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 256).cuda()
    mask = mask_24(layer.weight.detach().abs().cpu())
    x = torch.randn(2, 77, 512, device="cuda")
    weight24 = Sparse24Weight(mask)
    with torch.autocast("cuda", dtype=dtype):
        out = weight24.linear(layer, x)
        expected = torch.nn.functional.linear(x, layer.weight * mask.cuda(), layer.bias)
    assert out.dtype == dtype and out.shape == (2, 77, 256)
    assert out.is_contiguous(), out.stride()  # as a dense Linear's: cuDNN attention needs unit last-dim strides
    assert weight24.compressed
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def sampling():
    g = torch.Generator().manual_seed(3)
    cond = lambda: [[torch.randn(1, 16, 4096, generator=g), {}]]  # noqa: E731
    return CalibrationSampling(cond(), cond(), {"samples": torch.zeros(1, 16, 3, 8, 8)}, samples=2, steps=4)


def recorded_inputs(model, sampling):
    """Every input of every target linear during the calibration run, with its sigma (the reference)."""
    seen = []
    names = list(target_linears(model.get_model_object("diffusion_model")))
    observe_linear_inputs(model, names, lambda name, x, sigma: seen.append((name, x.clone(), sigma)), sampling)
    return seen


def test_observer_sees_every_call_its_sigma_and_the_whole_batch_when_asked(tiny_wan, sampling):
    import dataclasses
    events, done = [], []
    names = ["blocks.0.ffn.0", "blocks.1.self_attn.q"]
    whole = dataclasses.replace(sampling, latent={"samples": torch.zeros(2, 16, 3, 8, 8)}, whole_batch=True)
    observe_linear_inputs(tiny_wan, names, lambda name, x, sigma: events.append((name, x.shape[0], sigma)), whole,
                          on_call=lambda sigma: events.append(("call", None, sigma)),
                          progress=lambda i, total: done.append((i, total)))
    calls = [i for i, e in enumerate(events) if e[0] == "call"]
    assert len(calls) == whole.samples * whole.steps  # cfg 5: cond and uncond in one model call
    for start, end in zip(calls, calls[1:] + [len(events)]):  # each call's layers follow its on_call
        assert [e[0] for e in events[start + 1:end]] == names
        assert all(e[2] == events[start][2] and e[1] == 2 * 2 for e in events[start + 1:end])  # batch 2, x2 cfg
    assert done == [(i + 1, whole.samples * whole.steps) for i in range(whole.samples * whole.steps)]


def test_wanda_pruning_of_tiny_wan(tiny_wan, sampling):
    clone, result = apply_sparsity24(tiny_wan, Sparsity24Config(method="wanda", layers="all", max_error=10.0),
                                     sampling)
    linears = target_linears(tiny_wan.get_model_object("diffusion_model"))
    assert len(result.masks) == len(linears) == 20  # 2 blocks x (4 + 4 attention + 2 ffn)
    norms = {}
    for name, x, _ in recorded_inputs(tiny_wan, sampling):
        norms[name] = norms.get(name, 0) + x.reshape(-1, x.shape[-1]).double().square().sum(0)
    for name, mask in result.masks.items():
        weight = linears[name].weight.detach()
        assert_valid_24(mask, weight)
        reference = weight.double().abs() * norms[name].sqrt()[None, :]
        torch.testing.assert_close(wanda_scores(weight, norms[name].sqrt().float()).double(), reference,
                                   rtol=1e-5, atol=0)
        assert torch.equal(mask, mask_24(reference))
    assert "20 of 20 layers pruned" in result.to_text()


def test_error_criterion_and_speed_rule_keep_layers_dense(tiny_wan, sampling):
    _, strict = apply_sparsity24(tiny_wan, Sparsity24Config(method="magnitude", layers="all", max_error=0.0),
                                 sampling)
    assert not strict.masks and all("error above" in c.reason for c in strict.choices)
    _, fast = apply_sparsity24(tiny_wan, Sparsity24Config(method="magnitude", layers="fast"))
    assert not fast.masks  # 256-wide layers are far below the large-layer rule


def test_row_sample_of_a_large_call_is_drawn_from_its_rows():
    from comfyui_bsa.compression.linears import RowSample
    sample = RowSample(capacity=64, per_call=16, seed=0)
    small, large = torch.arange(40.0)[:, None], 100 + torch.arange(1_000_000.0)[:, None]
    sample.add(small)  # 40 <= 4 x 16 rows: 16 distinct ones
    assert len(set(sample.tensor().flatten().tolist())) == 16
    sample.add(large)  # drawn with replacement, without a permutation of a million rows
    values = sample.tensor().flatten()
    assert len(values) == 32 and ((values >= 100) & (values < 1_000_100)).sum() == 16


def test_invalid_settings_name_the_input():
    with pytest.raises(ValueError, match="method"):
        Sparsity24Config(method="random")
    with pytest.raises(ValueError, match="target"):
        ActivationSparsityConfig(target=1.5)
    with pytest.raises(ValueError, match="sigma_bins"):
        ActivationSparsityConfig(sigma_bins=0)


def sample(model, seed=0):
    import comfy.sample
    g = torch.Generator().manual_seed(7)
    pos, neg = [[torch.randn(1, 16, 4096, generator=g), {}]], [[torch.randn(1, 16, 4096, generator=g), {}]]
    latent = torch.zeros(1, 16, 3, 8, 8)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), 3, 5.0, "euler", "simple", pos, neg,
                               latent, seed=seed, disable_pbar=True)


def test_thresholds_hit_target_per_bin_and_patch_stays_on_its_clone(tiny_wan, sampling):
    config = ActivationSparsityConfig(target=0.4, sigma_bins=2)
    dense_before = sample(tiny_wan)
    pruned, _ = apply_sparsity24(tiny_wan, Sparsity24Config(method="magnitude", layers="all"))
    clone, thresholds, state = apply_activation_sparsity(pruned, config, sampling)
    # the target share of every layer's calibration inputs lies below its bin's threshold (all entries counted)
    below, total = {}, {}
    for name, x, sigma in recorded_inputs(pruned, sampling):
        key = (name, sigma_bin(thresholds.edges, sigma))
        below[key] = below.get(key, 0) + int((x.abs() < thresholds.per_layer[name][key[1]]).sum())
        total[key] = total.get(key, 0) + x.numel()
    assert len({b for _, b in total}) == 2 and len(total) == 40
    for key in total:
        assert abs(below[key] / total[key] - 0.4) < 0.03, key
    patched = sample(clone)
    achieved = state.stats.sparsity()
    assert len({s for s, _ in achieved}) == 3 and all(0.2 < v < 0.6 for v in achieved.values())
    assert "over 3 steps" in state.stats.to_text()
    assert (patched - dense_before).abs().max() > 1e-3
    torch.testing.assert_close(sample(tiny_wan), dense_before, rtol=0, atol=0)  # no leak into the base model


def test_threshold_zeroes_the_target_share_and_a_non_finite_error_keeps_the_layer():
    """TEAL's threshold: a share q of the calibration values lies strictly below it (the sparsifier zeroes
    |x| < t); 2:4: an infinite calibration input (fp16 overflow) gives a NaN error, which must not pass max_error."""
    from comfyui_bsa.compression.activation_sparsity import quantile
    from comfyui_bsa.compression.sparsity24 import InputStats, choose_layers
    values = torch.arange(1.0, 17.0)
    assert [float((values < quantile(values, q)).float().mean()) for q in (0.0, 0.25, 0.5, 1.0)] == [0, 0.25, 0.5, 1]
    layer, stats = torch.nn.Linear(8, 4), InputStats(16)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    x[:, :2] = float("inf")
    stats.observe("blocks.0.ffn.0", x)
    choice = choose_layers({"blocks.0.ffn.0": layer}, Sparsity24Config(method="magnitude", layers="all", max_error=0.1),
                           stats).choices[0]
    assert not choice.pruned and choice.reason == "non-finite calibration output", choice


def test_non_wan_model_is_returned_unpatched():
    from comfyui_bsa.compression.sparsity24 import choose_layers
    assert choose_layers({}, Sparsity24Config(method="wanda"), None).masks == {}
    magnitudes = InputMagnitudes(16)
    assert magnitudes.sigmas() == []


def test_recovery_fine_tune_keeps_masks_exactly(tmp_path):
    from safetensors.torch import load_file
    from test_training import tiny_config

    from comfyui_bsa.compression.sparsity24 import magnitude_masks
    from comfyui_bsa.training.loop import initial_weights, train
    from comfyui_bsa.training.model import wan_from_state_dict

    config = tiny_config(tmp_path / "run", max_steps=3, prune={"method": "magnitude", "layers": "all"})
    masks = magnitude_masks(wan_from_state_dict(initial_weights(config)), config.prune_config())
    assert len(masks) == 10 * config.layers  # q, k, v, o of both attentions and the two FFN linears
    train(config, progress=False)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    exported = load_file(str(tmp_path / "run" / "model_ema.safetensors"))
    for name, mask in masks.items():
        for weight in (state["model"][f"{name}.weight"], exported[f"{name}.weight"]):
            assert_valid_24(mask, weight)
            assert (weight[~mask] == 0).all()
    with pytest.raises(ValueError, match="prune.method"):
        tiny_config(tmp_path / "other", prune={"method": "wanda"})


def test_recovery_fine_tune_keeps_masks_from_a_file(tmp_path):
    """Masks that magnitude would not pick (random scores, as Wanda's differ from magnitude's) on some layers:
    the loop keeps exactly those, leaves the other layers unmasked, and checks the file against the model."""
    from safetensors.torch import load_file
    from test_training import tiny_config

    from comfyui_bsa.compression.sparsity24 import save_masks
    from comfyui_bsa.training.loop import initial_weights, train
    from comfyui_bsa.training.model import wan_from_state_dict

    linears = target_linears(wan_from_state_dict(initial_weights(tiny_config(tmp_path / "probe"))))
    g = torch.Generator().manual_seed(5)
    chosen = ["blocks.0.self_attn.q", "blocks.1.ffn.2", "blocks.1.cross_attn.v"]
    masks = {name: mask_24(torch.randn(linears[name].weight.shape, generator=g)) for name in chosen}
    save_masks(masks, tmp_path / "masks.safetensors")
    config = tiny_config(tmp_path / "run", max_steps=3, prune_masks=str(tmp_path / "masks.safetensors"))
    train(config, progress=False)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    exported = load_file(str(tmp_path / "run" / "model_ema.safetensors"))
    for name in linears:
        for weight in (state["model"][f"{name}.weight"], exported[f"{name}.weight"]):
            if name in masks:
                assert_valid_24(masks[name], weight)
                assert (weight[~masks[name]] == 0).all()
            else:
                assert (weight == 0).float().mean() < 1e-3, name  # unmasked: a zero only by fp16 rounding

    with pytest.raises(ValueError, match="exclude each other"):
        tiny_config(tmp_path / "both", prune={"method": "magnitude"}, prune_masks=str(tmp_path / "masks.safetensors"))
    q = masks["blocks.0.self_attn.q"]
    for bad, match in [({"blocks.0.ffn.1": q}, "not an attention / FFN linear"),
                       ({"blocks.0.self_attn.q": q[:, :8]}, "has shape"),
                       ({"blocks.0.self_attn.q": torch.ones_like(q)}, "2 of every 4")]:
        save_masks(bad, tmp_path / "bad.safetensors")
        with pytest.raises(ValueError, match=match):
            train(tiny_config(tmp_path / f"bad{len(match)}", prune_masks=str(tmp_path / "bad.safetensors")),
                  progress=False)


def test_bench_cpu_smoke(tmp_path, capsys, monkeypatch):
    """bench/bench_prune.py --cpu-smoke runs every part on the tiny stand-in in seconds, and its recovery keeps
    the Wanda masks it wrote."""
    import importlib.util
    import pathlib
    import sys

    from safetensors.torch import load_file

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_prune.py"
    spec = importlib.util.spec_from_file_location("bench_prune", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_prune", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    missing = tmp_path / "missing.safetensors"  # the stand-in, even once the trained model is in assets/
    assert bench.main(["--cpu-smoke", "--work-dir", str(tmp_path), "--model", str(missing)]) == 0
    out = capsys.readouterr().out
    for expected in ("UNTRAINED STAND-IN", "2:4 Wanda, every linear", "TEAL target 10%, 4 sigma bins (node default)",
                     "Prune Linears 2:4 at its defaults (0/20 layers pruned", "its error criterion at every shape",
                     "Activation Sparsity TEAL at its defaults", "dense fine-tuned (control)", "== end to end"):
        assert expected in out, expected
    masks = load_file(str(tmp_path / "masks_wanda.safetensors"))
    recovered = load_file(str(tmp_path / "recover_wanda" / "model_ema.safetensors"))
    assert len(masks) == 20
    for name, mask in masks.items():
        assert_valid_24(mask)
        assert (recovered[f"{name}.weight"][~mask] == 0).all()


def test_e2e_wan_tiny_with_prune_and_teal_variants():
    """bench/e2e_wan.py --tiny --prune wanda --teal 0.1: the quick calibrations and the prune / bsa+prune / teal /
    bsa+teal rows on the CPU, where the 2:4 weights run masked dense."""
    import os
    import re
    import subprocess
    import sys

    from comfy_env import COMFYUI_PATH, REPO
    env = {**os.environ, "COMFYUI_PATH": str(COMFYUI_PATH), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "e2e_wan.py"), "--tiny", "--prune", "wanda", "--teal",
                           "0.1", "--steps", "1", "--warmup-steps", "0", "--no-attention-share"], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout + "\n"
    assert "2:4 wanda, layers=all, max_error=inf: 20 of 20 layers pruned; calibrated on 2 dense steps" in out
    for label in ("prune", "bsa+prune"):
        row = re.search(rf"^speed-up dense/{re.escape(label)} \(wanda 2:4 linears, layers all\): .* rel L2 (\S+?)[,\n]",
                        out, re.MULTILINE)
        assert row and float(row.group(1)) > 1e-3, label  # pruned: not the dense numbers
        assert f"  {label}: 0/20 2:4 layers ran semi-structured, masked dense (on cpu, not CUDA: 20)" in out
    for label in ("teal", "bsa+teal"):
        assert f"speed-up dense/{label} (TEAL input sparsity target 10%)" in out
        mean = re.search(rf"^  {re.escape(label)}: activation sparsity of the last run: mean (\S+)% over 1 steps",
                         out, re.MULTILINE)
        assert mean and 5 < float(mean.group(1)) < 15, label
