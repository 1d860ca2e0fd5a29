"""2:4 pruning and TEAL activation sparsity: speed of 2:4 linears at Wan shapes, and quality on the small
trained video model of training/ against its own unpruned samples. A script, not a test.

    python bench/bench_prune.py [--model PATH] [--recover-steps N]   # GPU: speed, then quality
    python bench/bench_prune.py --cpu-smoke                          # CPU: everything at tiny sizes, seconds

On the GPU machine (no ComfyUI there: carry .whl and .comfy_min, see bench/e2e_wan.py), from the repository root:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.comfy_min/ComfyUI && \
        python3 bench/bench_prune.py --recover-steps 300

Speed: torch.sparse.to_sparse_semi_structured vs the same masked weights dense, bf16, at the linear shapes of
Wan 1.3B 480p and 14B 720p (81 frames): median ms, TFLOP/s, error against masked dense, the GPU name, and the
MEASURED_SPEEDUP line for compression/sparsity24.py.

Quality: the model (ComfyUI Wan 2.1 key names, loaded with training.model.wan_from_state_dict; default
assets/tiny_wan_shapes_dense.safetensors, else an untrained stand-in, said loudly) samples fixed captions and
seeds with training.model.sample_euler (bf16 autocast on CUDA) at the training config's video size. Printed
per variant: PSNR of the decoded pixels (training.data.decode, [-1, 1], peak 2) against the unpruned model's
samples (mean and worst sample), the flow-matching loss on held-out videos, layers pruned / input sparsity
reached. Variants: magnitude and Wanda 2:4 on every linear, the node's default (Wanda, layers=fast,
max_error 0.1) and its error criterion at every shape (layers=all), TEAL at a few targets (thresholds per
sigma bin). Calibration as the nodes' defaults: 2 samples of 10 Euler steps (no CFG: the model is trained
without caption dropout), other captions and seeds than the evaluation's. Also printed: which max_error and
TEAL target would meet the goal. The pack's own pieces do the work on the bare WanModel (choose_layers,
Sparse24Weight, fit_thresholds, ThresholdSparsifier, installed as LinearPatch forwards); the nodes put the
same into ModelPatcher object patches and ComfyUI's sampler, whose euler equals sample_euler
(tests/test_training.py). The verdict lines say whether the nodes' defaults keep PSNR >= 30 dB.

Recovery (--recover-steps N): training.train fine-tunes the model N steps on the training set with the
variant's masks fixed (config prune_masks, a file this script writes: Wanda masks too), then PSNR and loss
before / after; the same fine-tune without masks is the control (how far N steps move the samples alone).

End to end: sampling time of the Wanda 2:4 model vs dense. The small model's linears (256-1024 wide) are far
too small for 2:4 to pay: the Wan-shape timings above are the speed evidence, this row only shows the cost
of the patch on a whole sampling run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import pathlib
import statistics
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from pack import load_pack  # noqa: E402

load_pack()
from comfyui_bsa.compression.activation_sparsity import (ActivationSparsityConfig, InputMagnitudes,  # noqa: E402
                                                          SigmaState, ThresholdSparsifier, fit_thresholds,
                                                          sigma_bin)
from comfyui_bsa.compression.linears import LinearPatch, target_linears  # noqa: E402
from comfyui_bsa.compression.sparsity24 import (InputStats, Sparse24Weight, Sparsity24Config,  # noqa: E402
                                                 choose_layers, mask_24, save_masks, semi_structured_unsupported)

# (tokens, [(out, in)] of attention q/k/v/o, ffn.0, ffn.2): 81 frames at 480p = 21x30x52 tokens, 720p 21x45x80
SHAPES = {
    "wan1.3B-480p": (21 * 30 * 52, [(1536, 1536), (8960, 1536), (1536, 8960)]),
    "wan14B-720p": (21 * 45 * 80, [(5120, 5120), (13824, 5120), (5120, 13824)]),
    "cpu-smoke": (256, [(256, 256), (512, 256), (256, 512)]),
}
DEFAULT_MODEL = REPO / "assets" / "tiny_wan_shapes_dense.safetensors"
DEFAULT_CONFIG = REPO / "training" / "configs" / "tiny_wan_dense.json"
STAND_IN = (256, 4, 1024, 0)  # dim, layers, ffn_dim, seed of training.model.initial_state_dict
PSNR_GOAL = 30.0  # dB against the unpruned model's samples: the defaults must keep it
TEAL_TARGETS = (0.1, 0.25, 0.4, 0.5, 0.6)
MAX_ERROR_SWEEP = (0.4, 0.3, 0.2, 0.1)  # Wanda at every shape: where the error criterion would have to sit
NO_LIMIT = math.inf  # max_error that prunes every eligible layer (the error is still measured)


# ---- speed: linears at Wan shapes ----------------------------------------------------------------------------

def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def bench(name: str, device: str, dtype, repeats: int) -> dict[tuple[int, int], float]:
    """Prints one row per linear shape; returns (out, in) -> speed-up of the shapes that ran semi-structured."""
    tokens, shapes = SHAPES[name]
    speedups = {}
    for out_features, in_features in shapes:
        layer = torch.nn.Linear(in_features, out_features, device=device, dtype=dtype)
        mask = mask_24(layer.weight.abs())
        x = torch.randn(tokens, in_features, device=device, dtype=dtype)
        dense_weight = layer.weight.detach() * mask.to(device)
        sparse = Sparse24Weight(mask)
        reason = semi_structured_unsupported(dense_weight)
        dense_ms = median_ms(lambda: torch.nn.functional.linear(x, dense_weight, layer.bias), repeats)
        sparse_ms = median_ms(lambda: sparse.linear(layer, x), repeats)
        error = float((sparse.linear(layer, x).float() - torch.nn.functional.linear(x, dense_weight, layer.bias).float())
                      .abs().max())
        flops = 2 * tokens * in_features * out_features
        print(f"{name:14s} {tokens:6d}x{in_features:<5d}->{out_features:<5d} dense {dense_ms:8.3f} ms "
              f"({flops / dense_ms / 1e9:6.1f} TFLOP/s)  2:4 {sparse_ms:8.3f} ms  x{dense_ms / sparse_ms:4.2f}  "
              f"max|err| {error:.2e}  {'semi-structured' if reason is None else 'masked dense: ' + reason}")
        if reason is None:
            speedups[out_features, in_features] = round(dense_ms / sparse_ms, 2)
    return speedups


def speed_part(args) -> None:
    if args.cpu_smoke:
        print("== speed: CPU (masked dense path only)")
        bench("cpu-smoke", "cpu", torch.float32, 3)
        return
    print(f"== speed: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    speedups = {}
    for name in ("wan1.3B-480p", "wan14B-720p"):
        speedups.update(bench(name, "cuda", torch.bfloat16, args.repeats))
    if speedups:
        print(f"for compression/sparsity24.py ({torch.cuda.get_device_name()}, torch {torch.__version__}, bf16):")
        print(f"MEASURED_SPEEDUP = {speedups!r}")


# ---- quality: the small trained model -------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """What every quality variant shares: the dense model, the evaluation and calibration inputs, the
    reference samples and the held-out batch of the loss."""

    model: torch.nn.Module
    model_path: pathlib.Path
    train_config: object  # training.TrainConfig: the video size, captions and the recovery's settings
    device: torch.device
    eval_noise: torch.Tensor
    eval_context: torch.Tensor
    eval_sigmas: torch.Tensor
    calibration: list  # [(noise, context)] one entry per calibration sample, as the nodes sample them
    calibration_sigmas: torch.Tensor
    held_out: tuple  # (x0, context, noise, sigma)
    reference: torch.Tensor = None  # the dense model's samples, pixels [B, 3, T, H, W]


@dataclasses.dataclass(frozen=True)
class Row:
    psnr_mean: float
    psnr_min: float
    loss: float
    zeros: float | None = None  # TEAL: share of zeroed linear inputs in the sampling run (steps x layers mean)


class SigmaAware:
    """The model as sample_euler calls it, setting `state`'s sigma (timestep / 1000) and bin for each call's
    duration, as the TEAL node's APPLY_MODEL wrapper does."""

    def __init__(self, model, state: SigmaState):
        self.model, self.state = model, state

    def __call__(self, x, timestep, context, **kwargs):
        from comfyui_bsa.training.model import TIMESTEP_SCALE
        self.state.sigma = float(timestep.max()) / TIMESTEP_SCALE
        self.state.bin = sigma_bin(self.state.edges, self.state.sigma)
        try:
            return self.model(x, timestep, context, **kwargs)
        finally:
            self.state.sigma = self.state.bin = None


@contextlib.contextmanager
def patched(model: torch.nn.Module, patches: dict[str, LinearPatch]):
    """The layers' forwards replaced by their LinearPatch (what the nodes' object patches do), restored after."""
    modules = [model.get_submodule(name) for name in patches]
    for module, patch in zip(modules, patches.values()):
        module.forward = patch
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def autocast(device: torch.device):
    from comfyui_bsa.training.loop import autocast as training_autocast
    return training_autocast(device)


@torch.no_grad()
def sample_pixels(model, setup: Setup) -> torch.Tensor:
    from comfyui_bsa.training.data import decode
    from comfyui_bsa.training.model import sample_euler
    with autocast(setup.device):
        latents = sample_euler(model, setup.eval_noise, setup.eval_context, setup.eval_sigmas)
    return decode(latents.float().cpu()).clamp(-1, 1)


@torch.no_grad()
def held_out_loss(model, setup: Setup) -> float:
    """Flow-matching loss on the held-out videos, one video (one sigma) per call: TEAL bins by the call's sigma."""
    from comfyui_bsa.training.model import flow_matching_loss
    x0, context, noise, sigma = setup.held_out
    losses = []
    with autocast(setup.device):
        for i in range(x0.shape[0]):
            losses.append(float(flow_matching_loss(model, x0[i:i + 1], context[i:i + 1], noise[i:i + 1],
                                                   sigma[i:i + 1])))
    return statistics.mean(losses)


def evaluate(model, setup: Setup, state: SigmaState | None = None) -> Row:
    """PSNR of the model's samples against the reference, the held-out loss, and with TEAL's `state` the
    input sparsity its sampling run reached."""
    runner = model if state is None else SigmaAware(model, state)
    if state is not None:
        state.stats.reset()
    from comfyui_bsa.training.evaluate import psnr_per_video
    values = psnr_per_video(sample_pixels(runner, setup), setup.reference)
    zeros = None
    if state is not None:
        reached = state.stats.sparsity()
        zeros = sum(reached.values()) / max(1, len(reached))
    return Row(float(values.mean()), float(values.min()), held_out_loss(runner, setup), zeros)


def print_header() -> None:
    print(f"{'variant':64s} {'2:4 layers':>10s} {'input zeros':>11s} {'PSNR mean / min dB':>19s} "
          f"{'held-out loss':>13s}")


def print_row(name: str, row: Row, layers: str = "-", zeros: str = "-") -> None:
    print(f"{name:64s} {layers:>10s} {zeros:>11s} {row.psnr_mean:9.2f} / {row.psnr_min:6.2f} {row.loss:13.5f}")


@torch.no_grad()
def calibrate(setup: Setup, stats: InputStats, magnitudes: InputMagnitudes) -> None:
    """Both methods' calibration in one pass over the calibration samples: every target linear's input with
    the call's sigma, from forward pre-hooks on the dense model (the nodes' observe_linear_inputs)."""
    from comfyui_bsa.training.model import sample_euler
    state = SigmaState(torch.empty(0, dtype=torch.float64))

    def observe(module, args, name):
        x = args[0].detach()
        stats.observe(name, x, state.sigma)
        magnitudes.observe(name, x, state.sigma)

    handles = [module.register_forward_pre_hook(lambda m, a, name=name: observe(m, a, name))
               for name, module in target_linears(setup.model).items()]
    try:
        for noise, context in setup.calibration:
            with autocast(setup.device):
                sample_euler(SigmaAware(setup.model, state), noise, context, setup.calibration_sigmas)
    finally:
        for handle in handles:
            handle.remove()


def prune_patches(linears, masks) -> dict[str, LinearPatch]:
    return {name: LinearPatch(linears[name], weight24=Sparse24Weight(mask)) for name, mask in masks.items()}


def teal_patches(linears, thresholds) -> tuple[dict[str, LinearPatch], SigmaState]:
    state = SigmaState(thresholds.edges)
    return {name: LinearPatch(linears[name], sparsify=ThresholdSparsifier(name, t, state))
            for name, t in thresholds.per_layer.items()}, state


def make_setup(args, device: torch.device) -> Setup:
    from safetensors.torch import load_file

    from comfyui_bsa.training import TrainConfig
    from comfyui_bsa.training.data import SyntheticVideos
    from comfyui_bsa.training.loop import draw_noise
    from comfyui_bsa.training.model import (export_comfyui, initial_state_dict, latent_shape, sampling_sigmas,
                                            wan_from_state_dict)

    config = TrainConfig.load(args.config)
    if args.cpu_smoke:  # the tiny size of tests/test_training.py
        config = dataclasses.replace(config, frames=2, latent_size=8, num_videos=64, batch_size=2,
                                     preview_steps=2, preview_classes=(0,))
    path = pathlib.Path(args.model)
    if not path.exists():
        size = (128, 2, 256, 0) if args.cpu_smoke else STAND_IN
        path = export_comfyui(initial_state_dict(*size), pathlib.Path(args.work_dir) / "stand_in.safetensors")
        print(f"!! {args.model} not found: UNTRAINED STAND-IN initial_state_dict{size} (random weights); the quality "
              f"numbers below say nothing about a trained model")
    model = wan_from_state_dict(load_file(str(path))).to(device).eval().requires_grad_(False)
    shape = latent_shape(config.frames, config.latent_size)
    videos = SyntheticVideos(config.frames, config.latent_size, config.num_videos + args.held_out,
                             config.text_tokens, config.seed)

    def noise_and_context(classes, seeds):
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return noise.to(device), videos.embeddings[list(classes)].to(device)

    classes = list(args.eval_classes) * args.seeds
    eval_noise, eval_context = noise_and_context(classes, range(len(classes)))  # a noise seed per sample
    calibration_classes = [(1, 6, 11, 2)[i % 4] for i in range(args.calibration_samples)]  # not evaluated
    calibration = [noise_and_context([c], [1000 + i]) for i, c in enumerate(calibration_classes)]
    x0, context, _ = videos.batch(range(config.num_videos, config.num_videos + args.held_out), device)
    noise, sigma = draw_noise(torch.Generator().manual_seed(4321), args.held_out, shape, config.shift)
    print(f"model {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
          f"{len(target_linears(model))} target linears, latents {tuple(shape)}, device {device}"
          f"{' (bf16 autocast)' if device.type == 'cuda' else ' (float32)'}")
    print(f"evaluation: classes {tuple(args.eval_classes)} x {args.seeds} each (noise seeds 0..{len(classes) - 1}), "
          f"{args.steps} Euler steps, "
          f"shift {config.shift}; calibration: {args.calibration_samples} samples x {args.calibration_steps} steps "
          f"(classes {tuple(calibration_classes)}, no CFG); held-out loss on {args.held_out} videos")
    return Setup(model, path, config, device, eval_noise, eval_context,
                 sampling_sigmas(args.steps, config.shift, device), calibration,
                 sampling_sigmas(args.calibration_steps, config.shift, device),
                 (x0, context, noise.to(device), sigma.to(device)))


def recover(setup: Setup, masks: dict, name: str, args) -> torch.nn.Module:
    """The model fine-tuned args.recover_steps steps by the training loop with `masks` fixed (none: the
    control); returns the exported EMA weights as a model on the device."""
    from safetensors.torch import load_file

    from comfyui_bsa.training import train
    from comfyui_bsa.training.loop import EXPORT_FILE
    from comfyui_bsa.training.model import wan_from_state_dict

    run_dir = pathlib.Path(args.work_dir) / f"recover_{name}"
    masks_file = None
    if masks:
        masks_file = run_dir.parent / f"masks_{name}.safetensors"
        save_masks(masks, masks_file)
    steps = args.recover_steps
    config = dataclasses.replace(
        setup.train_config, run_dir=str(run_dir), init_from=str(setup.model_path), prune=None,
        prune_masks=None if masks_file is None else str(masks_file), bsa=None, max_steps=steps,
        lr=args.recover_lr, min_lr=args.recover_lr / 10, warmup_steps=max(1, steps // 10),
        log_every=max(1, steps // 4), preview_every=steps, checkpoint_every=steps)
    start = time.perf_counter()
    rows = train(config, progress=False)
    head = statistics.mean(r["loss"] for r in rows[:max(1, steps // 10)])
    tail = statistics.mean(r["loss"] for r in rows[-max(1, steps // 10):])
    print(f"   fine-tune {name}: {steps} steps in {time.perf_counter() - start:.1f} s, training loss "
          f"{head:.4f} (first 10%) -> {tail:.4f} (last 10%); run folder {run_dir}")
    return wan_from_state_dict(load_file(str(run_dir / EXPORT_FILE))).to(setup.device).eval().requires_grad_(False)


def timed_sampling(model, setup: Setup, repeats: int) -> float:
    """Median seconds of one sampling run of the evaluation batch (one warm-up run first)."""
    return median_ms(lambda: sample_pixels(model, setup), repeats) / 1e3


def verdict(name: str, row: Row) -> None:
    ok = row.psnr_mean >= PSNR_GOAL
    print(f"{name}: PSNR {row.psnr_mean:.2f} dB (worst sample {row.psnr_min:.2f}) -> "
          f"{'MEETS' if ok else 'FAILS'} the >= {PSNR_GOAL:.0f} dB goal (on the mean)")


def quality_part(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    setup = make_setup(args, device)
    linears = target_linears(setup.model)
    setup.reference = sample_pixels(setup.model, setup)
    dense = Row(math.inf, math.inf, held_out_loss(setup.model, setup))
    stats, magnitudes = InputStats(Sparsity24Config().error_rows), InputMagnitudes(
        ActivationSparsityConfig().values_per_step)
    calibrate(setup, stats, magnitudes)

    print("\n== quality vs the unpruned model's samples")
    print_header()
    print_row("dense (the reference)", dense, f"0/{len(linears)}")
    node_default = Sparsity24Config()  # = nodes/nodes_prune.py PRUNE_DEFAULTS
    variants = {
        "magnitude": ("2:4 magnitude, every linear", Sparsity24Config(method="magnitude", layers="all",
                                                                      max_error=NO_LIMIT)),
        "wanda": ("2:4 Wanda, every linear", Sparsity24Config(method="wanda", layers="all", max_error=NO_LIMIT)),
        "default": (f"2:4 node default (wanda, layers=fast, max_error {node_default.max_error})", node_default),
        "default-all": (f"2:4 default criterion at every shape (layers=all, max_error {node_default.max_error})",
                        dataclasses.replace(node_default, layers="all")),
        **{f"max_error={e}": (f"2:4 Wanda, layers=all, max_error {e}", dataclasses.replace(node_default, layers="all",
                                                                                            max_error=e))
           for e in MAX_ERROR_SWEEP},
    }
    results, rows = {}, {}
    for key, (name, config) in variants.items():
        results[key] = choose_layers(linears, config, stats)
        with patched(setup.model, prune_patches(linears, results[key].masks)):
            rows[key] = evaluate(setup.model, setup)
        print_row(name, rows[key], f"{len(results[key].masks)}/{len(linears)}")
    teal_default = ActivationSparsityConfig()  # = nodes/nodes_prune.py TEAL_DEFAULTS
    teal_rows = {}
    for target in sorted({*TEAL_TARGETS, teal_default.target}):
        config = dataclasses.replace(teal_default, target=target)
        patches, state = teal_patches(linears, fit_thresholds(magnitudes, config))
        with patched(setup.model, patches):
            row = evaluate(setup.model, setup, state)
        default = " (node default)" if target == teal_default.target else ""
        print_row(f"TEAL target {100 * target:.0f}%, {config.sigma_bins} sigma bins{default}", row,
                  zeros=f"{100 * row.zeros:.1f}%")
        teal_rows[target] = row
    print("(input zeros: mean over steps and layers of a sampling run; 2:4 layers: pruned / target linears)")
    print("\nper-layer choice of the default criterion at every shape (relative output error on calibration "
          "inputs):")
    print(results["default-all"].to_text())

    print(f"\n== the defaults (goal: PSNR >= {PSNR_GOAL:.0f} dB against the unpruned model's samples)")
    verdict(f"Prune Linears 2:4 at its defaults ({len(results['default'].masks)}/{len(linears)} layers pruned"
            f"{': no layer of this model passes the speed rule' if not results['default'].masks else ''})",
            rows["default"])
    verdict(f"its error criterion at every shape ({len(results['default-all'].masks)}/{len(linears)} layers)",
            rows["default-all"])
    verdict(f"Activation Sparsity TEAL at its defaults (target {teal_default.target})", teal_rows[teal_default.target])
    sweep = {node_default.max_error: "default-all", **{e: f"max_error={e}" for e in MAX_ERROR_SWEEP}}
    meeting = [e for e, key in sweep.items() if rows[key].psnr_mean >= PSNR_GOAL]
    print(f"largest max_error of {tuple(sweep)} meeting the goal at every shape: "
          + (f"{max(meeting)} ({len(results[sweep[max(meeting)]].masks)}/{len(linears)} layers pruned)" if meeting
             else "none"))
    meeting = [t for t, row in teal_rows.items() if row.psnr_mean >= PSNR_GOAL]
    print(f"largest TEAL target of {tuple(teal_rows)} meeting the goal: "
          + (f"{max(meeting)}" if meeting else "none"))

    if args.recover_steps:
        print(f"\n== recovery: {args.recover_steps} fine-tune steps of the training loop (lr {args.recover_lr}, "
              f"batch {setup.train_config.batch_size}, the variant's masks fixed) for {', '.join(args.recover)} "
              f"('dense': the control, the same fine-tune without masks)")
        for key in args.recover:
            masks = {} if key == "dense" else results[key].masks
            model = recover(setup, masks, key, args)
            with patched(model, prune_patches(target_linears(model), masks)):
                after = evaluate(model, setup)
            before = dense if key == "dense" else rows[key]
            name = "dense fine-tuned (control)" if key == "dense" else variants[key][0]
            print(f"{name}: PSNR {before.psnr_mean:.2f} -> {after.psnr_mean:.2f} dB (worst {before.psnr_min:.2f} "
                  f"-> {after.psnr_min:.2f}), held-out loss {before.loss:.5f} -> {after.loss:.5f} "
                  f"(dense {dense.loss:.5f})")

    print("\n== end to end: sampling time of the evaluation batch "
          f"({setup.eval_noise.shape[0]} videos x {args.steps} steps)")
    dense_s = timed_sampling(setup.model, setup, args.e2e_repeats)
    patches = prune_patches(linears, results["wanda"].masks)
    with patched(setup.model, patches):
        pruned_s = timed_sampling(setup.model, setup, args.e2e_repeats)
    compressed = sum(p.weight24.compressed for p in patches.values())
    dense_why = sorted({p.weight24.dense_reason for p in patches.values() if not p.weight24.compressed})
    print(f"dense {dense_s:.3f} s, 2:4 Wanda every linear {pruned_s:.3f} s (x{dense_s / pruned_s:.2f}); "
          f"{compressed}/{len(patches)} layers ran semi-structured"
          + (f" (the others masked dense: {'; '.join(dense_why)})" if dense_why else ""))
    widths = sorted({w for module in linears.values() for w in module.weight.shape})
    print(f"note: this model's linears ({widths[0]}-{widths[-1]} wide) are far too small for 2:4 to gain; the "
          f"Wan 1.3B / 14B linear-shape timings are the speed evidence")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes and a tiny model on the CPU, seconds")
    parser.add_argument("--part", choices=("all", "speed", "quality"), default="all")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per linear shape")
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="dense Wan 2.1 safetensors (ComfyUI key names); missing: an untrained stand-in")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="the model's training config: video size, captions, shift, recovery settings")
    parser.add_argument("--steps", type=int, default=30, help="Euler steps of the evaluation samples")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per evaluation caption")
    parser.add_argument("--eval-classes", type=lambda s: tuple(int(c) for c in s.split(",")), default=(0, 5, 10, 3),
                        help="caption classes of the evaluation samples (comma-separated)")
    parser.add_argument("--calibration-samples", type=int, default=2, help="as the nodes' default")
    parser.add_argument("--calibration-steps", type=int, default=10, help="as the nodes' default")
    parser.add_argument("--held-out", type=int, default=16, help="held-out videos of the loss")
    parser.add_argument("--recover-steps", type=int, default=0, help="recovery fine-tune steps (0: none)")
    parser.add_argument("--recover", type=lambda s: s.split(","), default=["wanda", "dense"],
                        help="variants to recover, comma-separated: magnitude, wanda, default-all, dense (control)")
    parser.add_argument("--recover-lr", type=float, default=1e-4)
    parser.add_argument("--e2e-repeats", type=int, default=5)
    parser.add_argument("--work-dir", help="recovery runs and the stand-in (default: a temporary folder)")
    args = parser.parse_args(argv)
    bad = sorted(set(args.recover) - {"magnitude", "wanda", "default-all", "dense"})
    if bad:
        parser.error(f"--recover: unknown variant(s) {', '.join(bad)}")
    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny tensors: one thread is faster, two crawl when another process holds a core
        args.repeats, args.steps, args.seeds, args.eval_classes = 3, 3, 1, (0, 5)
        args.calibration_steps, args.held_out, args.e2e_repeats = 3, 2, 1
        args.recover_steps = args.recover_steps or 2
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu-smoke)")
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            args.work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_prune_"))
        if args.part in ("all", "speed"):
            with torch.no_grad():
                speed_part(args)
        if args.part in ("all", "quality"):
            import_comfyui()
            quality_part(args)
    return 0


def import_comfyui() -> None:
    """ComfyUI importable (tools/train.py's way), unless it already is (the CPU test imports it first)."""
    if "comfy.model_management" not in sys.modules:
        from train import import_comfyui as import_it
        import_it()


if __name__ == "__main__":
    sys.exit(main())
