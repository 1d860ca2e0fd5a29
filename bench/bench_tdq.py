"""TDQ FP8 linears: speed at Wan shapes, and sample quality on the small trained video model.

    python bench/bench_tdq.py                          # GPU: both parts
    python bench/bench_tdq.py --part speed             # GPU: linear layers only (no ComfyUI needed)
    python bench/bench_tdq.py --part quality [--model PATH]
    python bench/bench_tdq.py --cpu-smoke              # CPU: tiny shapes and a tiny latent, fake-quant path

Speed: one linear layer at the Wan 2.1 1.3B 480p shapes (21x30x52 tokens; q/k/v/o 1536x1536, ffn.0 8960x1536,
ffn.2 1536x8960) and 14B 720p (21x45x80 tokens; 5120x5120, 13824x5120, 5120x13824): bf16 F.linear against
a TDQ layer as a sampling run calls it (compression.linears.LinearPatch with compression.tdq.FP8Weight) (FP8 e4m3 weights with per-output-channel scales made
once; the activation quantized in every call with the layer's per-tensor scale of the call, which is the
static, table and tdq modes' path, or with each token's own absmax, the dynamic mode), so the time includes
the activation cast. Rows for the cast alone, the _scaled_mm alone on an already quantized activation, and
the former eager cast (four float32 passes before kernels/quantize_fp8.py) show where the time goes (the
cast's row also says whether its e4m3 bits and row scales, static and dynamic, are compression.fp8's
exactly, and lines under the table name each quantity that is not, with its first difference); one
more row times _scaled_mm with use_fast_accum=True (Hopper's faster, less precise FP8 accumulation), which
FP8Weight uses with TDQConfig.fast_accum (the node's fast_accumulation, off by default; its own row too).
Median ms (triton.testing.do_bench, L2 flushed), x bf16 (bf16 ms / ms), TFLOP/s (2 M K N / time), relative
RMS error against the bf16 output, and against the same layer's fake-quant reference (compression.fp8:
same rounded operands, float32 accumulation; only the accumulation order and the bf16 output differ).
Activations are N(0, 1), weights nn.Linear's default initialisation.

Quality: the small Wan 2.1 T2V trained on training.data's synthetic videos (--model, default
assets/tiny_wan_shapes_dense.safetensors; while that file does not exist, an untrained stand-in with the
same shapes, training.model.initial_state_dict, written to a temporary folder). Loaded with ComfyUI's own
loader (bf16 on the GPU) and its sampling shifted as in training (ModelSamplingSD3's shift). TDQ is
calibrated with calibrate_tdq on the training set's caption embeddings (all classes as one batch, a seed of
its own), then every mode samples the same captions and seeds (euler, cfg 1, the training config's preview
steps): reference (no quantization), static (one calibrated scale), table (per timestep bin), dynamic
(per-token absmax every call), tdq (the interval generators); on the GPU also tdq through the fake-quant
reference (compression.fp8.reference_math) to show that _scaled_mm computes the same numbers. Decoded with
training.data.decode (the set's exact decoder, pixels clamped to [-1, 1]) and compared with the reference:
PSNR with peak 2, per video, mean and lowest. Issue targets: tdq within 0.5 dB of dynamic, >= 2 dB above static.

On the GPU machine (no ComfyUI there; carry .whl and .comfy_min as for bench/e2e_wan.py), from the repository
root:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.comfy_min/ComfyUI && python3 bench/bench_tdq.py
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from pack import load_pack  # noqa: E402

load_pack()
from comfyui_bsa.compression.fp8 import E4M3_MAX, kernel_bit_differences, reference_math, to_e4m3  # noqa: E402
from comfyui_bsa.compression.linears import LinearPatch  # noqa: E402
from comfyui_bsa.compression.tdq import FP8Weight  # noqa: E402

# tokens, (out, in) of attention q/k/v/o, ffn.0, ffn.2: 81 frames at 480p = 21x30x52 tokens, 720p 21x45x80
SHAPES = {
    "wan1.3B-480p": (21 * 30 * 52, {"q/k/v/o": (1536, 1536), "ffn.0": (8960, 1536), "ffn.2": (1536, 8960)}),
    "wan14B-720p": (21 * 45 * 80, {"q/k/v/o": (5120, 5120), "ffn.0": (13824, 5120), "ffn.2": (5120, 13824)}),
    "cpu-smoke": (256, {"q/k/v/o": (256, 256), "ffn.0": (512, 256), "ffn.2": (256, 512)}),
}
DEFAULT_MODEL = REPO / "assets" / "tiny_wan_shapes_dense.safetensors"
DEFAULT_TRAIN_CONFIG = REPO / "training" / "configs" / "tiny_wan_dense.json"
EVAL_SEED, CALIBRATION_SEED = 0, 1000


def rms_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.float(), ref.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def median_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def tdq_layer(linear: torch.nn.Linear, mode: str, x_scale: torch.Tensor, fast_accum: bool = False) -> LinearPatch:
    """The forward apply_tdq patches onto `linear`: this call's per-tensor scale, or per token (dynamic)."""
    return LinearPatch(linear, fp8=FP8Weight(None if mode == "dynamic" else x_scale.reshape(()), fast_accum))


@torch.no_grad()
def bench_shape(name: str, label: str, tokens: int, out_features: int, in_features: int, device, dtype) -> None:
    linear = torch.nn.Linear(in_features, out_features, device=device, dtype=dtype)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    x_scale = (x.float().abs().amax() / E4M3_MAX).reshape(())  # precomputed, as calibration would
    flops = 2 * tokens * in_features * out_features
    reference = F.linear(x, linear.weight, linear.bias)
    rows = [(f"{str(dtype)[6:]} F.linear", lambda: F.linear(x, linear.weight, linear.bias), None, True)]
    differences = []  # the cast's quantities that are not compression.fp8's bits (CUDA only)
    for mode, what in (("static", "per-tensor scale (static/table/tdq)"), ("dynamic", "per-token absmax (dynamic)")):
        layer = tdq_layer(linear, mode, x_scale)
        with reference_math():
            fake = layer(x)
        rows.append((f"fp8 TDQ linear, {what}", lambda layer=layer: layer(x), fake, True))
    if device.type == "cuda":  # the node's fast_accumulation option; its reference is the static row's
        layer = tdq_layer(linear, "static", x_scale, fast_accum=True)
        static_fake = rows[1][2]
        rows.append(("fp8 TDQ linear, per-tensor scale, fast accumulation", lambda: layer(x), static_fake, True))
    if device.type == "cuda":  # the pieces of the _scaled_mm path, and the path before the one-pass cast
        from comfyui_bsa.kernels.quantize_fp8 import quantize_fp8_rows
        weight_fp8, w_scale, bias = tdq_layer(linear, "static", x_scale).fp8.quantized(linear, device)
        x_fp8, scale_a = quantize_fp8_rows(x, x_scale)
        scale_b = w_scale.reshape(1, -1)
        differences = ([f"static {line}" for line in kernel_bit_differences(x, x_scale)]
                       + [f"dynamic {line}" for line in kernel_bit_differences(x)])

        def eager_former():
            s = x_scale.reshape(1, 1)
            y = torch._scaled_mm(to_e4m3(x, s), weight_fp8.t(), scale_a=s.expand(tokens, 1).contiguous(),
                                 scale_b=scale_b.contiguous(), out_dtype=torch.bfloat16)
            return (y + bias.float()).to(dtype)

        rows += [(f"  its activation cast alone (bits == to_e4m3: {'NO' if differences else 'yes'})",
                  lambda: quantize_fp8_rows(x, x_scale), None, False),
                 ("  its _scaled_mm alone (activation already e4m3)",
                  lambda: torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=scale_a, scale_b=scale_b, bias=bias,
                                           out_dtype=torch.bfloat16), None, True),
                 ("  its _scaled_mm alone with use_fast_accum=True",
                  lambda: torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=scale_a, scale_b=scale_b, bias=bias,
                                           out_dtype=torch.bfloat16, use_fast_accum=True), None, True),
                 ("fp8 former eager cast (4 float32 passes) + _scaled_mm", eager_former, None, True)]
    print(f"{name} {label}: {tokens} x {in_features} -> {out_features}")
    base_ms = None
    for i, (title, fn, fake, product) in enumerate(rows):
        t = median_ms(fn, device)
        base_ms = base_ms or t
        line = f"  {title:60s} {t:8.3f} ms  x{base_ms / t:5.2f}"
        if not product:  # the cast: read x, write e4m3 and the row scales
            line += f"  {tokens * (in_features * (x.element_size() + 1) + 4) / t / 1e6:7.0f} GB/s"
        if product:
            line += f"  {flops / t / 1e9:7.1f} TFLOP/s"
            if i:
                out = fn()
                line += f"  rel err vs {str(dtype)[6:]} {rms_rel(out, reference):.2e}"
                if fake is not None:
                    line += f", vs its fake-quant reference {rms_rel(out, fake):.1e}"
        print(line, flush=True)
    for difference in differences:
        print(f"    NOT to_e4m3's bits: {difference}", flush=True)
    del x, reference


def speed(device, dtype, shape_names) -> None:
    for name in shape_names:
        tokens, layers = SHAPES[name]
        for label, (out_features, in_features) in layers.items():
            bench_shape(name, label, tokens, out_features, in_features, device, dtype)
            if device.type == "cuda":
                torch.cuda.empty_cache()


class TDQLines(logging.Filter):
    """[TDQ] lines and errors; ComfyUI's own chatter stays out."""

    def filter(self, record):
        return record.getMessage().startswith("[TDQ]") or record.levelno >= logging.ERROR


def stand_in_model(folder: pathlib.Path, config) -> pathlib.Path:
    from comfyui_bsa.training.model import export_comfyui, initial_state_dict
    return export_comfyui(initial_state_dict(config.dim, config.layers, config.ffn_dim, config.seed),
                          folder / "tiny_wan_stand_in.safetensors")


@torch.no_grad()
def quality(args, device) -> dict:
    from e2e_wan import bootstrap_comfyui, comfyui_path

    bootstrap_comfyui(comfyui_path(), cpu=device.type == "cpu")
    import comfy.model_sampling
    import comfy.sample
    import comfy.sd

    from comfyui_bsa.compression.tdq import TDQConfig, apply_tdq, calibrate_tdq
    from comfyui_bsa.training.config import TrainConfig
    from comfyui_bsa.training.data import SyntheticVideos, caption, decode
    from comfyui_bsa.training.evaluate import psnr_per_video

    config = TrainConfig.load(args.train_config)
    frames, size = (args.frames or config.frames), (args.latent_size or config.latent_size)
    steps = args.steps or config.preview_steps
    temporary = tempfile.TemporaryDirectory()
    if args.model:
        path = pathlib.Path(args.model)
        if not path.is_file():
            raise SystemExit(f"--model {path} does not exist")
    elif args.cpu_smoke or not DEFAULT_MODEL.is_file():
        print(f"{'--cpu-smoke' if args.cpu_smoke else str(DEFAULT_MODEL.relative_to(REPO)) + ' not there yet'}: "
              f"an UNTRAINED stand-in of the same shapes (dim {config.dim}, {config.layers} blocks, ffn "
              f"{config.ffn_dim}) instead")
        path = stand_in_model(pathlib.Path(temporary.name), config)
    else:
        path = DEFAULT_MODEL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})

    class FlowShift(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass  # what ComfyUI's ModelSamplingSD3 node patches in

    sampling = FlowShift(model.model.model_config)
    sampling.set_parameters(shift=config.shift, multiplier=1000)
    model.add_object_patch("model_sampling", sampling)

    videos = SyntheticVideos(frames, size, 1, config.text_tokens, config.seed)
    classes = [i % len(videos.embeddings) for i in range(args.samples)]
    positive = [[videos.embeddings[classes], {}]]
    negative = [[torch.zeros_like(positive[0][0]), {}]]  # unused at cfg 1
    latent = torch.zeros(len(classes), 16, frames, size, size)
    print(f"model {path.name}: {type(model.model.model_config).__name__}, weights {model.model_dtype()}; "
          f"{len(classes)} videos ({', '.join(caption(c) for c in classes[:4])}{', ...' * (len(classes) > 4)}), "
          f"latent {list(latent.shape[1:])}, {steps} euler steps, shift {config.shift}, cfg 1")

    start = time.perf_counter()
    all_classes = list(range(len(videos.embeddings)))
    calibration = calibrate_tdq(model, [([[videos.embeddings[all_classes], {}]],
                                         [[torch.zeros_like(videos.embeddings[all_classes]), {}]])],
                                {"samples": torch.zeros(len(all_classes), 16, frames, size, size)}, steps, cfg=1.0,
                                seed=CALIBRATION_SEED, fit_steps=args.fit_steps)
    print(f"calibrated {calibration} on all {len(all_classes)} captions, seed {CALIBRATION_SEED}, {steps} steps: "
          f"{time.perf_counter() - start:.1f} s")

    def sample(patched) -> tuple[torch.Tensor, torch.Tensor, float]:
        start = time.perf_counter()
        noise = comfy.sample.prepare_noise(latent, EVAL_SEED)
        out = comfy.sample.sample(patched, noise, steps, 1.0, "euler", "simple", positive, negative, latent,
                                  seed=EVAL_SEED, disable_pbar=True)
        out = model.model.latent_format.process_in(out.float().cpu())  # the model's own latent space
        return out, decode(out).clamp(-1, 1), time.perf_counter() - start

    ref_latent, ref_pixels, ref_s = sample(model)
    print(f"  {'reference (' + str(dtype)[6:] + ', no FP8)':34s} {ref_s:6.1f} s")
    results = {}
    variants = [(mode, apply_tdq(model, TDQConfig(mode=mode), calibration), False)
                for mode in ("static", "table", "dynamic", "tdq")]
    if device.type == "cuda":
        variants.append(("tdq, fake-quant reference", variants[-1][1], True))
        variants.append(("tdq, fast accumulation", apply_tdq(model, TDQConfig(mode="tdq", fast_accum=True),
                                                             calibration), False))
    for label, patched, fake in variants:
        if fake:
            with reference_math():
                out, pixels, seconds = sample(patched)
        else:
            out, pixels, seconds = sample(patched)
        db = psnr_per_video(pixels, ref_pixels)
        results[label] = (float(db.mean()), out, pixels)
        print(f"  {label:34s} {seconds:6.1f} s  PSNR vs reference {float(db.mean()):6.2f} dB (lowest "
              f"{float(db.min()):6.2f}), latent rel L2 {float((out - ref_latent).norm() / ref_latent.norm()):.2e}",
              flush=True)
    tdq, dynamic, static = (results[m][0] for m in ("tdq", "dynamic", "static"))
    print(f"tdq - dynamic: {tdq - dynamic:+.2f} dB (target >= -0.5: {'met' if tdq - dynamic >= -0.5 else 'MISSED'}); "
          f"tdq - static: {tdq - static:+.2f} dB (target >= +2: {'met' if tdq - static >= 2 else 'MISSED'})")
    if "tdq, fake-quant reference" in results:
        fake = results["tdq, fake-quant reference"]
        same = psnr_per_video(results["tdq"][2], fake[2])
        print(f"tdq through _scaled_mm vs through the fake-quant reference: PSNR {float(same.mean()):.2f} dB "
              f"(lowest {float(same.min()):.2f}), latent rel L2 "
              f"{float((results['tdq'][1] - fake[1]).norm() / fake[1].norm()):.2e}")
    temporary.cleanup()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="CPU: tiny linear shapes in float32, stand-in model at a 4x8x8 latent, 3 steps, 2 videos")
    parser.add_argument("--part", choices=("speed", "quality", "both"), default="both")
    parser.add_argument("--shapes", default="wan1.3B-480p,wan14B-720p", help="speed: comma-separated SHAPES keys")
    parser.add_argument("--model", help=f"quality: a Wan 2.1 safetensors (default {DEFAULT_MODEL.relative_to(REPO)})")
    parser.add_argument("--train-config", default=str(DEFAULT_TRAIN_CONFIG),
                        help="quality: the model's training config (latent size, frames, caption tokens and seed, "
                             "shift)")
    parser.add_argument("--samples", type=int, help="quality: videos sampled per mode (default 12, one per caption)")
    parser.add_argument("--steps", type=int, help="quality: sampling steps (default: the config's preview_steps)")
    parser.add_argument("--frames", type=int, help="quality: latent frames (default: the config's)")
    parser.add_argument("--latent-size", type=int, help="quality: latent height = width (default: the config's)")
    parser.add_argument("--fit-steps", type=int, default=400, help="quality: Adam steps of the generator fit")
    args = parser.parse_args(argv)
    console = logging.StreamHandler(sys.stdout)
    console.addFilter(TDQLines())
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[console], force=True)

    if args.cpu_smoke:
        device, dtype, shapes = torch.device("cpu"), torch.float32, ["cpu-smoke"]
        args.samples, args.steps = args.samples or 2, args.steps or 3
        args.frames, args.latent_size, args.fit_steps = args.frames or 4, args.latent_size or 8, min(args.fit_steps, 50)
        print(f"device: CPU ({platform.machine()}), torch {torch.__version__}: fake-quant path only")
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu-smoke)")
    else:
        import triton
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, args.shapes.split(",")
        args.samples = args.samples or 12
        print(f"device: {torch.cuda.get_device_name()} (sm{''.join(map(str, torch.cuda.get_device_capability()))}), "
              f"torch {torch.__version__}, triton {triton.__version__}")
    if args.part in ("speed", "both"):
        speed(device, dtype, shapes)
    if args.part in ("quality", "both"):
        quality(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
