"""Fidelity of BSA on the trained tiny Wan 2.1 (training/, issue 15): validation loss and sample PSNR of the
dense-trained model with BSA, of the models trained with BSA, and of comfy-kitchen's sol_attn beside.

    python bench/bench_trained.py [--out DIR]                 # GPU: the trained models (assets/)
    PYTHONPATH=.ck python bench/bench_trained.py [--out DIR]  # with comfy-kitchen's sol_attn rows
    python bench/bench_trained.py --cpu-smoke [--out DIR]     # CPU: random stand-ins at a tiny size

1. Validation loss: the flow-matching loss on a held-out set (training.evaluate: other videos than training's,
   fixed noise, a fixed grid of sigmas; the same for every model) of the dense model dense and at the sparse
   training setting, and of each BSA-trained model at its own training setting (and dense), with the kept KV
   cubes % of every sparse evaluation. BSA runs at every sigma there, as in training.
2. Samples: fixed captions and noise, Euler steps of the training schedule (shift 3), bf16 autocast on CUDA as
   the training loop; decoded with the set's exact decoder and compared in pixels ([-1, 1], peak 2) with the
   dense model's dense samples (PSNR dB of the mean squared error over all videos; "own" against the same
   model's dense samples). Node settings run as
   the node runs them: dense up to start_percent (0.2) of the schedule, sparse after. Time per sample is the
   wall time of a whole sampling run over the videos (the second run on CUDA: the first compiles) / videos.
   Another model's samples differ from the dense model's also where its attention is dense (its "dense" row
   shows how much): "own" isolates what sparse attention changes, the validation loss compares the models.
3. --out DIR: strip_<video>.png per video (rows: the settings, frames left to right) and bench_trained.txt
   (what is printed).

The BSA-trained models and their configs are optional (a missing file is reported and skipped); the data
settings (frames, latent size, caption tokens, seed, shift) come from the dense model's config.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from pack import load_pack  # noqa: E402
from train import import_comfyui  # noqa: E402  (ComfyUI on sys.path, CPU mode without CUDA)

CONFIGS = REPO / "training" / "configs"
MODELS = {  # name -> (weights, training config)
    "dense": (REPO / "assets" / "tiny_wan_shapes_dense.safetensors", CONFIGS / "tiny_wan_dense.json"),
    "bsa_scratch": (REPO / "assets" / "tiny_wan_shapes_bsa_scratch.safetensors", CONFIGS / "tiny_wan_bsa_scratch.json"),
    "bsa_finetune": (REPO / "assets" / "tiny_wan_shapes_bsa_finetune.safetensors",
                     CONFIGS / "tiny_wan_bsa_finetune.json"),
    "bsa_distill": (REPO / "assets" / "tiny_wan_shapes_bsa_distill.safetensors", CONFIGS / "tiny_wan_bsa_distill.json"),
}
CLASSES = (0, 5, 10, 3, 6, 11)  # red disc, green square, blue triangle, yellow disc, blue square, yellow triangle
SAMPLE_SEED = 1234
SOL_SETTINGS = ({"tau": 1.0}, {"tau": 2.0}, {"tau": 3.0}, {"topk_ratio": 0.1}, {"topk_ratio": 0.2})


@dataclasses.dataclass
class Model:
    name: str
    module: torch.nn.Module
    setting: object  # BSAConfig of its sparse training (None: trained dense)
    dense_blocks: str = ""


@dataclasses.dataclass
class Sampled:
    """One sampling run over every video: latents [N, 16, T, h, w] (CPU, float32), kept queries % over the
    sparse self-attention calls, kept KV % over them and over all of them (dense ones count 100 %), seconds
    per sample."""

    latents: torch.Tensor
    q_sparse: float | None = None
    kv_sparse: float | None = None
    kv_all: float | None = None
    seconds: float = 0.0


class Report:
    """Prints each line and keeps it for bench_trained.txt."""

    def __init__(self):
        self.lines = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def describe(config) -> str:
    """'stat λ1.0', 'keep 0.5 stat λ1.5', 'cum 0.9', ... (fields that differ from the node's cube / pooling too)."""
    if config is None:
        return "dense"
    parts = [f"keep {config.keep_ratio:g}"] if config.keep_ratio < 1 else []
    parts.append(f"stat λ{config.stat_lambda:g}" if config.threshold_mode == "statistical"
                 else f"cum {config.kv_threshold:g}")
    if config.cube_size != (4, 4, 4):
        parts.append("x".join(map(str, config.cube_size)))
    if not config.pooled_remainder:
        parts.append("no pool")
    return " ".join(parts)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_model(path: pathlib.Path, device: torch.device) -> torch.nn.Module:
    from safetensors.torch import load_file

    from comfyui_bsa.training.model import wan_from_state_dict
    return wan_from_state_dict(load_file(str(path))).to(device).eval().requires_grad_(False)


def kept(run) -> tuple[float | None, float | None, float | None]:
    """(kept queries % and kept KV % over the run's sparse calls, kept KV % over all its self-attention calls
    with dense ones at 100 %)."""
    if run is None:
        return None, None, None
    stats = run.stats.as_dict()
    dense_self = stats["dense_calls"] - stats["dense_reasons"].get("cross-attention", 0)
    total = stats["sparse_calls"] + dense_self
    if not stats["sparse_calls"]:
        return None, None, 100.0 if total else None
    return (stats["kept_query_pct"], stats["kept_kv_pct"],
            (stats["kept_kv_pct"] * stats["sparse_calls"] + 100.0 * dense_self) / total)


def sample(model, noise, context, sigmas, device, repeats: int, options_for) -> Sampled:
    """Samples every video `repeats` times (the last one timed); options_for() -> (options_at, run) per run."""
    from comfyui_bsa.training.loop import autocast
    from comfyui_bsa.training.model import sample_euler

    for _ in range(repeats):
        options_at, run = options_for()
        sync(device)
        start = time.perf_counter()
        with autocast(device):
            latents = sample_euler(model, noise, context, sigmas, options_at)
        sync(device)
        seconds = time.perf_counter() - start
    return Sampled(latents.float().cpu(), *kept(run), seconds / noise.shape[0])


def sol_attn_override(ck, settings: dict):
    """comfy-kitchen's sol_attn on the Wan blocks' self-attention ([B, L, H*D] in, as ComfyUI calls it);
    cross-attention and masked calls go to ComfyUI's attention."""

    def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        if skip_reshape or skip_output_reshape or mask is not None or q.shape[1] != k.shape[1]:
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        qs, ks, vs = (t.unflatten(-1, (heads, -1)).to(torch.bfloat16).contiguous() for t in (q, k, v))
        return ck.sol_attn(qs, ks, vs, **settings).flatten(-2).to(q.dtype)

    return override


def sol_attn_module(device: torch.device):
    """(comfy_kitchen, None) when sol_attn runs here, else (None, the reason)."""
    try:
        import comfy_kitchen as ck
    except Exception as error:  # noqa: BLE001 - a failed import only drops these rows
        return None, f"comfy_kitchen import failed: {type(error).__name__}: {error}"
    if not ck.sol_attn_is_available(device):
        return None, f"sol_attn is not available on {device.type} here"
    return ck, None


def models_and_config(args, device, tmp: pathlib.Path):
    """(data TrainConfig, the sparse training setting, [Model]) for the real run or the CPU smoke."""
    from comfyui_bsa.bsa_core.config import BSAConfig
    from comfyui_bsa.training import TrainConfig
    from comfyui_bsa.training.model import export_comfyui, initial_state_dict

    if args.cpu_smoke:  # random stand-ins written and read back as the real files are
        config = TrainConfig(run_dir=str(tmp), frames=8, latent_size=16, text_tokens=4)
        setting = BSAConfig(keep_ratio=0.5, threshold_mode="statistical", stat_lambda=1.5)
        models = []
        for seed, name in enumerate(MODELS):
            path = export_comfyui(initial_state_dict(256, 2, 512, seed), tmp / f"{name}.safetensors")
            models.append(Model(name, load_model(path, device), None if name == "dense" else setting))
        return config, setting, models

    paths = {"dense": args.dense, "bsa_scratch": args.scratch, "bsa_finetune": args.finetune,
             "bsa_distill": args.distill}
    config = TrainConfig.load(MODELS["dense"][1])
    if not pathlib.Path(paths["dense"]).is_file():
        raise SystemExit(f"{paths['dense']}: no dense model (train training/configs/tiny_wan_dense.json and copy "
                         "its runs/tiny_wan_dense/model_ema.safetensors there, or pass --dense)")
    models = [Model("dense", load_model(pathlib.Path(paths["dense"]), device), None)]
    setting = None
    for name in [name for name in MODELS if name != "dense"]:
        weights, config_path = pathlib.Path(paths[name]), MODELS[name][1]
        if not config_path.is_file():
            print(f"{name}: skipped, no config {config_path.relative_to(REPO)}")
            continue
        trained = TrainConfig.load(config_path)
        setting = setting or trained.bsa_config()  # the first BSA config's setting is the one compared
        if not weights.is_file():
            print(f"{name}: skipped, no weights {weights}")
            continue
        for field in ("frames", "latent_size", "text_tokens", "seed", "shift"):
            if getattr(trained, field) != getattr(config, field):
                raise SystemExit(f"{config_path.name}: {field} {getattr(trained, field)} differs from the dense "
                                 f"model's {getattr(config, field)}: not the same data")
        models.append(Model(name, load_model(weights, device), trained.bsa_config(), trained.bsa_dense_blocks))
    if setting is None:
        raise SystemExit(f"no BSA training config in {CONFIGS.relative_to(REPO)}: no sparse training setting")
    return config, setting, models


def validation_rows(report: Report, config, setting, models, device, args) -> None:
    from comfyui_bsa.training.evaluate import validation_loss, validation_set

    vset = validation_set(config, num_videos=args.val_videos, num_sigmas=args.val_sigmas)
    report(f"validation loss: {args.val_videos} videos of SyntheticVideos seed {config.seed + 1} (training: seed "
           f"{config.seed}) x {args.val_sigmas} sigmas {', '.join(f'{s:.3f}' for s in vset.sigmas)}; fixed noise")
    report(f"  {'model':14s} {'attention':24s} {'loss':>8s} {'kept KV %':>9s}")
    for model in models:
        runs = [(None, "")] + ([(setting, "")] if model.setting is None else [(model.setting, model.dense_blocks)])
        for bsa, dense_blocks in runs:
            result = validation_loss(model.module, vset, bsa, dense_blocks, args.val_batch, device)
            kv = "-" if result.kept_kv_pct is None else f"{result.kept_kv_pct:.1f}"
            label = describe(bsa) + (f", dense blocks {dense_blocks}" if dense_blocks else "")
            report(f"  {model.name:14s} {label:24s} {result.loss:8.4f} {kv:>9s}")
    if any(m.setting is not None and m.setting != setting for m in models):
        report("  note: a BSA model's own training setting differs from the one the dense model is evaluated at")


def sample_rows(report: Report, config, setting, models, device, args, out: pathlib.Path | None) -> None:
    from comfyui_bsa.bsa_core.config import RECOMMENDED, RECOMMENDED_PATCH
    from comfyui_bsa.bsa_core.patch import OVERRIDE_KEY
    from comfyui_bsa.training.data import SyntheticVideos, caption, decode
    from comfyui_bsa.training.evaluate import psnr, strip_image
    from comfyui_bsa.training.model import latent_shape, sampling_sigmas
    from comfyui_bsa.training.sparsity import sampling_attention, sparse_steps

    classes = torch.tensor(CLASSES[:args.videos])
    noise = torch.randn(len(classes), *latent_shape(config.frames, config.latent_size),
                        generator=torch.Generator().manual_seed(SAMPLE_SEED)).to(device)
    context = SyntheticVideos(1, 2, 1, config.text_tokens, config.seed).embeddings[classes].to(device)
    sigmas = sampling_sigmas(args.steps, config.shift, device)
    start, end = RECOMMENDED_PATCH.start_percent, RECOMMENDED_PATCH.end_percent
    window = sparse_steps(sigmas.cpu(), config.shift, start, end)
    repeats = 2 if device.type == "cuda" else 1

    def bsa_run(model, bsa, start_percent, dense_blocks=""):
        return sample(model.module, noise, context, sigmas, device, repeats, lambda: sampling_attention(
            bsa, model.module, noise.shape, context.shape[1], sigmas.cpu(), config.shift, start_percent, end,
            dense_blocks))

    report()
    report(f"samples: {len(classes)} videos ({', '.join(caption(c) for c in classes.tolist())}), {args.steps} "
           f"Euler steps, shift {config.shift:g}, noise seed {SAMPLE_SEED}; node window: start_percent {start:g} "
           f"= steps {window.index(True) if True in window else '-'}..{args.steps - 1} sparse "
           f"({sum(window)}/{args.steps})")
    report("  PSNR dB of decoded frames vs the dense model's dense samples (own: vs the same model's dense "
           "samples); kept Q %: over sparse calls; kept KV %: over sparse calls / over all self-attention calls")
    report(f"  {'model':13s} {'setting':30s} {'from':>5s} {'kept Q %':>8s} {'kept KV %':>11s} {'PSNR':>6s} {'own':>6s} "
           f"{'s/sample':>9s}")
    dense_model = models[0]
    reference = bsa_run(dense_model, None, 0.0)
    frames = {}  # row label -> decoded pixels [N, 3, T, H, W]

    def row(model, label, start_percent, result, own_reference):
        pixels = decode(result.latents)
        frames[f"{model.name} {label}" + (f" from {start_percent:g}" if start_percent else "")] = pixels
        kv = "-" if result.kv_all is None else f"{_pct(result.kv_sparse)}/{_pct(result.kv_all)}"
        report(f"  {model.name:13s} {label:30s} {start_percent:5.2g} {_pct(result.q_sparse):>8s} {kv:>11s} "
               f"{psnr(pixels, decode(reference.latents)):6.2f} {psnr(pixels, decode(own_reference.latents)):6.2f} "
               f"{result.seconds:9.4f}")

    row(dense_model, "dense", 0.0, reference, reference)
    node_settings = [("defaults", RECOMMENDED), ("", dataclasses.replace(RECOMMENDED, stat_lambda=1.5)),
                     ("", dataclasses.replace(RECOMMENDED, stat_lambda=2.0)),
                     ("", dataclasses.replace(RECOMMENDED, keep_ratio=0.5)),
                     ("", dataclasses.replace(RECOMMENDED, threshold_mode="cumulative", kv_threshold=0.9)),
                     ("", dataclasses.replace(RECOMMENDED, pooled_remainder=False)),
                     ("nearly every cube", dataclasses.replace(RECOMMENDED, threshold_mode="cumulative",
                                                               kv_threshold=0.9999))]  # the kernel's own rounding
    for name, bsa in node_settings:
        label = f"{name} ({describe(bsa)})" if name else describe(bsa)
        row(dense_model, label, start, bsa_run(dense_model, bsa, start), reference)

    if device.type == "cuda":  # how far another dense kernel's rounding alone moves the samples
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def efficient_sdpa(func, *args, **kwargs):
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return func(*args, **kwargs)
        options = {OVERRIDE_KEY: efficient_sdpa}
        result = sample(dense_model.module, noise, context, sigmas, device, repeats,
                        lambda: ((lambda step: options if window[step] else {}), None))
        row(dense_model, "dense, mem-efficient SDPA", start, result, reference)

    ck, why = sol_attn_module(device)
    if ck is None:
        report(f"  sol_attn: skipped ({why})")
    else:
        for settings in SOL_SETTINGS:
            override = sol_attn_override(ck, settings)
            options = {OVERRIDE_KEY: override}
            result = sample(dense_model.module, noise, context, sigmas, device, repeats,
                            lambda options=options: ((lambda step: options if window[step] else {}), None))
            (key, value), = settings.items()
            row(dense_model, f"sol_attn {key} {value:g}", start, result, reference)

    for model in models:  # the sparse training setting: the dense-trained model first, for comparison
        bsa = setting if model.setting is None else model.setting
        own = reference if model.setting is None else bsa_run(model, None, 0.0)
        if model.setting is not None:
            row(model, "dense", 0.0, own, own)
        for start_percent in (0.0, start):
            row(model, f"trained ({describe(bsa)})", start_percent,
                bsa_run(model, bsa, start_percent, model.dense_blocks), own)

    if out is not None:
        for i, class_id in enumerate(classes.tolist()):
            rows = [(label.replace("λ", "lambda "), pixels[i]) for label, pixels in frames.items()]  # PIL's font
            image = strip_image(rows)
            image.save(out / f"strip_{i}_{caption(class_id).replace(' ', '_')}.png")
        report(f"strips: {out}/strip_*.png (rows as above, frames left to right)")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="random stand-ins, tiny shapes, few steps, CPU")
    parser.add_argument("--dense", default=str(MODELS["dense"][0]), help="the dense-trained model (safetensors)")
    parser.add_argument("--scratch", default=str(MODELS["bsa_scratch"][0]), help="the model trained with BSA")
    parser.add_argument("--finetune", default=str(MODELS["bsa_finetune"][0]), help="the dense one fine-tuned with BSA")
    parser.add_argument("--distill", default=str(MODELS["bsa_distill"][0]),
                        help="the dense one fine-tuned with BSA on the dense one's velocities (distill_from)")
    parser.add_argument("--steps", type=int, help="Euler steps (default 20; smoke 4)")
    parser.add_argument("--videos", type=int, help=f"sampled videos, at most {len(CLASSES)} (default 6; smoke 2)")
    parser.add_argument("--val-videos", type=int, help="validation videos (default 16; smoke 2)")
    parser.add_argument("--val-sigmas", type=int, help="validation sigma grid points (default 8; smoke 2)")
    parser.add_argument("--val-batch", type=int, default=16, help="validation forward batch")
    parser.add_argument("--out", help="folder for strip_*.png and bench_trained.txt")
    parser.add_argument("--device", default="cuda", help="cuda (bf16 autocast) or cpu (float32)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    for name, default, small in (("steps", 20, 4), ("videos", len(CLASSES), 2), ("val_videos", 16, 2),
                                 ("val_sigmas", 8, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else default)
    if not 1 <= args.videos <= len(CLASSES):
        raise SystemExit(f"--videos must be 1..{len(CLASSES)}")

    import_comfyui()
    load_pack()
    device = torch.device("cpu" if smoke else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu-smoke, or --device cpu for the real models in float32: slow)")
    out = pathlib.Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    report = Report()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (float32)"
    report(f"device: {name}; torch {torch.__version__}" + ("; bf16 autocast" if device.type == "cuda" else "")
           + ("; --cpu-smoke: random stand-in models, tiny shapes" if smoke else ""))
    with tempfile.TemporaryDirectory(prefix="bench_trained_") as tmp:
        config, setting, models = models_and_config(args, device, pathlib.Path(tmp))
    report(f"models: {', '.join(m.name for m in models)}; data: {config.frames} frames x {config.latent_size}^2 "
           f"latents, {config.text_tokens} caption tokens; sparse training setting: {describe(setting)}")
    validation_rows(report, config, setting, models, device, args)
    sample_rows(report, config, setting, models, device, args, out)
    if out is not None:
        (out / "bench_trained.txt").write_text("\n".join(report.lines) + "\n")
        print(f"table: {out / 'bench_trained.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
