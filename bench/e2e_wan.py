"""End to end: a full-size Wan 2.1 T2V 1.3B (random weights, real key names) sampled through ComfyUI at
480p x 81 frames (latent [1, 16, 21, 60, 104], 32760 tokens): seconds per denoising step, dense
(ComfyUI's own attention, torch SDPA forced to cuDNN) vs BSA at the node's defaults (bsa_core.config.RECOMMENDED). A script, not a test.

The state dict is made directly on the GPU in bf16 (tools/tiny_wan.py, size "1.3B": N(0, 1/fan_in)
weights, std 0.026 at width 1536, so activations stay at unit scale) and loaded with
comfy.sd.load_diffusion_model_state_dict, so ComfyUI's own model detection (WAN21) builds the model and
its attention dispatch runs. Sampling is comfy.sample.sample (KSampler path), euler, cfg 1.0 (one model
call per step; --cfg above 1 adds the negative prompt, which ComfyUI batches with the positive one), through
the ModelPatcher: dense = the model as loaded, BSA = bsa_core.patch.apply_bsa
on a clone with start_percent 0 (every step sparse). With --tdq MODE the transformer blocks' linear layers
also run in FP8 (compression.tdq.apply_tdq; static, table and tdq first calibrate on a couple of dense steps of
the same latent, which is enough for timing: the linears' speed does not depend on the scales): variants
tdq (dense attention) and bsa+tdq. With --prune METHOD the blocks' linears run 2:4 sparse as the Prune
Linears 2:4 node makes them (compression.sparsity24.apply_sparsity24 on a clone, magnitude or Wanda, on
--prune-layers, calibrated on a couple of dense steps of the same latent: Wanda's input norms and each layer's
output error): variants prune and bsa+prune, with how many layers ran semi-structured and through which
library (on the GPU the bf16 weights are compressed for cuSPARSELt at their first call, in the warm-up step;
on the CPU they run masked dense: the same numbers, no speed). With --teal TARGET the linears' inputs are
thresholded as the Activation Sparsity TEAL node does (variants teal and bsa+teal; no kernel turns the zeros
into time, so no speed-up is expected) and the sparsity reached is printed. One warm-up step (Triton
autotuning, 2:4 compression) precedes the timed steps; each step is timed with torch.cuda.synchronize
between the sampler's callbacks. A last one-step run per variant times every attention call with CUDA events
(self- vs cross-attention) for the attention share and the Amdahl bound.

On the GPU machine (no ComfyUI there: make the two git-ignored folders with `bash tools/gpu_carry.sh`, then
carry [".whl", ".comfy_min"]; .whl holds the pure-Python wheels
ComfyUI's sampling path needs beyond that machine's packages, torchsde and trampoline; .comfy_min is a
pruned ComfyUI 0.3.75), from the repository root:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && COMFYUI_PATH=.comfy_min/ComfyUI python3 bench/e2e_wan.py

and with the 2:4 and TEAL rows (Wanda 2:4 on every attention / FFN linear, TEAL at the node's 10%):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.comfy_min/ComfyUI; python3 bench/e2e_wan.py --prune wanda --teal 0.1

CPU smoke check (tiny Wan, small latent, 2 steps, BSA's pure-torch reference; FP8 through fake quantization,
2:4 masked dense):

    python bench/e2e_wan.py --tiny [--tdq tdq] [--prune wanda] [--teal 0.1]

COMFYUI_PATH points at a ComfyUI checkout (default: <repo>/.comfyui/ComfyUI). Where torchvision is
missing (or does not import), ComfyUI's unrelated Cascade/Cosmos modules get a stand-in for it, used
only while ComfyUI imports; Wan never calls torchvision.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.machinery
import importlib.util
import itertools
import logging
import os
import pathlib
import platform
import statistics
import sys
import time
import types

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from run_workflow import BSARunLog
from tiny_wan import WAN21_T2V_SIZES, wan21_t2v_state_dict

from pack import load_pack  # noqa: E402

load_pack()

from comfyui_bsa.bsa_core.config import RECOMMENDED, RECOMMENDED_PATCH, THRESHOLD_MODES, BSAConfig, parse_cube_size

TEXT_DIM = 4096  # umT5-XXL width
SIZES = {  # model size, latent (T, H, W), text tokens, steps
    "full": ("1.3B", (21, 60, 104), 512, 4),  # 480x832, 81 frames -> 21 x 60 x 104 latent, 32760 tokens
    "tiny": ("tiny", (5, 16, 16), 32, 2),
}


def comfyui_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui" / "ComfyUI").resolve()


@contextlib.contextmanager
def torchvision_stand_in():
    """ComfyUI's model zoo imports torchvision at module level (Stable Cascade, Cosmos) but Wan never uses
    it. Where it does not import, put an empty stand-in in sys.modules while ComfyUI imports, then take it
    out again so that nothing later mistakes it for the real package. Yields why (None: real one used)."""
    try:
        import torchvision  # noqa: F401
        why = None
    except (ImportError, RuntimeError, OSError, AttributeError) as error:  # absent, or built for another torch
        why = f"{type(error).__name__}: {error}".splitlines()[0]
    if why is None:
        yield None
        return
    names = ("torchvision", "torchvision.transforms", "torchvision.models")
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "torchvision"}
    for name in names:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision"].models = sys.modules["torchvision.models"]
    try:
        yield why
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def bootstrap_comfyui(path: pathlib.Path, cpu: bool) -> str | None:
    """Import ComfyUI's model, sampler and memory code without parsing our command line. On the GPU it
    keeps ComfyUI's default attention choice, made explicit: torch SDPA (as --use-pytorch-cross-attention).
    Returns why torchvision was stood in for (None when it was not)."""
    if not (path / "comfy").is_dir():
        raise SystemExit(f"ComfyUI not found at {path}: run tools/setup.sh or set COMFYUI_PATH")
    sys.path.insert(0, str(path))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.use_pytorch_cross_attention = not cpu
    with torchvision_stand_in() as why:
        import comfy.ldm.wan.model  # (comfy.model_management reads the args above on import)
        import comfy.model_management
        import comfy.patcher_extension
        import comfy.sample
        import comfy.samplers
        import comfy.sd
    return why


class ConsoleFilter(logging.Filter):
    """ComfyUI's warnings once its import is over (import-time ones name optional packages Wan does not
    need), errors always, and each distinct [BSA] line once; the per-run summaries are printed by main."""

    def __init__(self):
        super().__init__()
        self.show_warnings = False
        self._seen = set()

    def filter(self, record):
        message = record.getMessage()
        if message.startswith("[BSA]"):
            if message.startswith("[BSA] run:") or message in self._seen:
                return False
            self._seen.add(message)
            return True
        return record.levelno >= (logging.WARNING if self.show_warnings else logging.ERROR)


def sdpa_context(name: str, device: torch.device):
    """torch SDPA restricted to one backend (CUDA only); 'default' leaves torch's own priority."""
    if device.type != "cuda" or name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([backend])


@contextlib.contextmanager
def environment(**values):
    """os.environ with `values` set (None: left as is) for the block."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AttentionTimer:
    """Replaces the optimized_attention that comfy/ldm/wan/model.py calls (ComfyUI's dispatch, the BSA
    override inside it) with one that times each call: CUDA events on the GPU (no stall), wall clock on the
    CPU; and on both the host's time until the call returned (where it is longer than the GPU's, the step
    waits for the host). Self-attention: as many keys as queries."""

    def __init__(self, device: torch.device):
        self.device = device
        self.calls = {"self": [], "cross": []}
        self.host = {"self": [], "cross": []}

    def __enter__(self):
        import comfy.ldm.wan.model as wan
        self._module, self._original = wan, wan.optimized_attention
        original = self._original

        def timed(q, k, v, *args, **kwargs):
            kind = "self" if q.shape[-2 if kwargs.get("skip_reshape") else 1] == k.shape[
                -2 if kwargs.get("skip_reshape") else 1] else "cross"
            host_start = time.perf_counter()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = original(q, k, v, *args, **kwargs)
                end.record()
                self.calls[kind].append((start, end))
            else:
                out = original(q, k, v, *args, **kwargs)
                self.calls[kind].append(time.perf_counter() - host_start)
            self.host[kind].append(time.perf_counter() - host_start)
            return out

        wan.optimized_attention = timed
        return self

    def __exit__(self, *exc):
        self._module.optimized_attention = self._original

    def seconds(self, kind: str) -> float:
        sync(self.device)
        if self.device.type == "cuda":
            return sum(start.elapsed_time(end) for start, end in self.calls[kind]) / 1000
        return sum(self.calls[kind])


def run(model, inputs: dict, steps: int, device: torch.device, sdpa: str, launched: bool = False) -> dict:
    """One comfy.sample.sample call under inference mode; per-step seconds between the sampler's callbacks
    (synchronized), the first step from the first model call on. launched: BSA's CUDA graph replay off."""
    import comfy.patcher_extension as pe
    import comfy.sample

    marks = []
    timed = model.clone()

    def first_call(executor, *args, **kwargs):
        if not marks:
            sync(device)
            marks.append(time.perf_counter())
        return executor(*args, **kwargs)

    def callback(step, x0, x, total_steps):
        sync(device)
        marks.append(time.perf_counter())

    timed.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "e2e_wan_timer", first_call)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # inference mode, as ComfyUI's executor samples (BSA then runs as in a prompt, not as in a trainer)
    with torch.inference_mode(), sdpa_context(sdpa, device), environment(BSA_CUDA_GRAPHS="0" if launched else None):
        latent = comfy.sample.sample(timed, inputs["noise"], steps, inputs["cfg"], "euler", "simple", inputs["positive"],
                                     inputs["negative"], inputs["latent"], seed=inputs["seed"], callback=callback,
                                     disable_pbar=True)
    step_seconds = [b - a for a, b in itertools.pairwise(marks)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"latent": latent.float(), "steps": step_seconds, "peak_gib": peak}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bsa_config(args) -> BSAConfig:
    overrides = {}
    if args.keep_ratio is not None:
        overrides["keep_ratio"] = args.keep_ratio
    if args.kv_threshold is not None:
        overrides["kv_threshold"] = args.kv_threshold
    if args.cube is not None:
        overrides["cube_size"] = parse_cube_size(args.cube)
    if args.pooled_remainder is not None:
        overrides["pooled_remainder"] = args.pooled_remainder
    if args.threshold_mode is not None:
        overrides["threshold_mode"] = args.threshold_mode
    if args.stat_lambda is not None:
        overrides["stat_lambda"] = args.stat_lambda
    return dataclasses.replace(RECOMMENDED, **overrides)


def summary(run_stats: dict | None) -> str:
    if not run_stats:
        return "no BSA run summary logged"
    kept = (f"kept queries {run_stats['kept_query_pct']:.1f}%, kept KV cubes {run_stats['kept_kv_pct']:.1f}%"
            if run_stats["sparse_calls"] else "no sparse call")
    reasons = ", ".join(f"{reason}: {n}" for reason, n in run_stats["dense_reasons"].items())
    return f"{run_stats['sparse_calls']} sparse / {run_stats['dense_calls']} dense calls, {kept}" + (
        f" (dense: {reasons})" if reasons else "")


def tdq_model(model, args, inputs):
    """A clone of `model` with FP8 linears in mode args.tdq; static, table and tdq calibrate first on
    args.tdq_calibration_steps dense steps of the timed latent (fit 200 Adam steps)."""
    from comfyui_bsa.compression.tdq import CALIBRATED_MODES, TDQConfig, apply_tdq, calibrate_tdq

    calibration = None
    if args.tdq in CALIBRATED_MODES:
        start = time.perf_counter()
        calibration = calibrate_tdq(model, [(inputs["positive"], inputs["negative"])], {"samples": inputs["latent"]},
                                    args.tdq_calibration_steps, cfg=1.0, seed=inputs["seed"], fit_steps=200)
        print(f"TDQ: {calibration} from {args.tdq_calibration_steps} dense steps in "
              f"{time.perf_counter() - start:.1f} s (model load included)")
    patched = apply_tdq(model, TDQConfig(mode=args.tdq, fast_accum=args.tdq_fast_accum), calibration)
    print(f"TDQ: mode {args.tdq}, {sum(1 for k in patched.object_patches if k.startswith('diffusion_model.'))} "
          f"linear layers in FP8 e4m3{', fast accumulation' if args.tdq_fast_accum else ''}")
    return patched


def calibration_sampling(args, inputs):
    """The quick calibration of --prune and --teal: args.prune_calibration_steps dense steps of the timed
    latent, seed and prompt, as the nodes' calibration_* inputs would sample them (one seed, cfg 1.0)."""
    from comfyui_bsa.compression.linears import CalibrationSampling
    return CalibrationSampling(inputs["positive"], inputs["negative"], {"samples": inputs["latent"]}, samples=1,
                               steps=args.prune_calibration_steps, cfg=1.0, seed=inputs["seed"])


def prune_model(model, args, inputs, device: torch.device):
    """A clone of `model` with 2:4 linears as the Prune Linears 2:4 node makes it (apply_sparsity24: method
    args.prune on args.prune_layers, max_error args.prune_max_error), calibrated quickly, which is enough for
    timing: the 2:4 kernels' speed does not depend on which 2 of every 4 weights are kept."""
    from comfyui_bsa.compression.sparsity24 import Sparsity24Config, apply_sparsity24

    config = Sparsity24Config(method=args.prune, layers=args.prune_layers, max_error=args.prune_max_error)
    start = time.perf_counter()
    patched, result = apply_sparsity24(model, config, calibration_sampling(args, inputs))
    print(f"{result.to_text().splitlines()[0]}; calibrated on {args.prune_calibration_steps} dense steps in "
          f"{time.perf_counter() - start:.1f} s (model load included)")
    errors = sorted(c.rel_error for c in result.choices if c.rel_error is not None)
    if errors:
        print(f"2:4: relative output error per layer on the calibration inputs: min {errors[0]:.3f}, median "
              f"{errors[len(errors) // 2]:.3f}, max {errors[-1]:.3f} (the node's default max_error is "
              f"{Sparsity24Config().max_error})")
    dense = collections.Counter(c.reason for c in result.choices if not c.pruned)
    if dense:
        print(f"2:4: layers left dense: {', '.join(f'{reason}: {n}' for reason, n in dense.items())}")
    if device.type == "cuda":
        sparselt = torch.backends.cusparselt
        picks = "CUTLASS" if torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS else "cuSPARSELt"
        print(f"2:4: cuSPARSELt {sparselt.version() if sparselt.is_available() else 'not available'} in this torch "
              f"(to_sparse_semi_structured picks {picks})")
    return patched


def semi_structured(model) -> str:
    """How many of `model`'s 2:4 layers ran semi-structured in its last run and through which library, and
    why the others ran masked dense (Sparse24Weight.compressed / .kernel / .dense_reason)."""
    from comfyui_bsa.compression.linears import LinearPatch

    weights = [p.weight24 for p in model.object_patches.values()
               if isinstance(p, LinearPatch) and p.weight24 is not None]
    if not weights:
        return "no 2:4 layer"
    kernels = collections.Counter(w.kernel for w in weights if w.compressed)
    dense = collections.Counter(w.dense_reason or "not called" for w in weights if not w.compressed)
    ran = f"{sum(kernels.values())}/{len(weights)} 2:4 layers ran semi-structured"
    if kernels:
        ran += f" ({', '.join(f'{kernel}: {n}' for kernel, n in kernels.items())})"
    if dense:
        ran += f", masked dense ({', '.join(f'{reason}: {n}' for reason, n in dense.items())})"
    return ran


def teal_model(model, args, inputs):
    """(a clone of `model` with TEAL thresholds as the Activation Sparsity TEAL node makes it, target args.teal,
    its SigmaState: .stats holds the sparsity of the last run)."""
    from comfyui_bsa.compression.activation_sparsity import ActivationSparsityConfig, apply_activation_sparsity

    start = time.perf_counter()
    patched, thresholds, state = apply_activation_sparsity(model, ActivationSparsityConfig(target=args.teal),
                                                           calibration_sampling(args, inputs))
    print(f"TEAL: target {100 * args.teal:g}%, thresholds for {len(thresholds.per_layer)} layers in "
          f"{len(thresholds.edges) + 1} sigma bins, calibrated on {args.prune_calibration_steps} dense steps in "
          f"{time.perf_counter() - start:.1f} s; no kernel turns the zeros into time (no speed-up expected)")
    return patched, state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke check: tiny Wan, latent 5x16x16, 32 text tokens, 2 steps, BSA reference")
    parser.add_argument("--steps", type=int, help="timed denoising steps (default 4; --tiny: 2)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first, per variant (Triton autotuning)")
    parser.add_argument("--latent", help="latent T,H,W (default 21,60,104: 480x832, 81 frames)")
    parser.add_argument("--size", choices=("1.3B", "14B"), help="Wan 2.1 T2V size (default 1.3B; 14B: ~28 GB of "
                                                                  "bf16 weights made on the GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=1.0,
                        help="classifier-free guidance scale (default 1.0: one model call a step; above 1 ComfyUI "
                             "batches the positive and negative prompts where memory allows: batch 2)")
    parser.add_argument("--sdpa", choices=("cudnn", "flash", "efficient", "default"), default="cudnn",
                        help="torch SDPA backend for ComfyUI's dense attention (both runs: BSA's cross-attention "
                             "stays dense); ignored on the CPU")
    parser.add_argument("--keep-ratio", type=float, help="BSAConfig.keep_ratio (default: the node's, RECOMMENDED)")
    parser.add_argument("--kv-threshold", type=float, help="BSAConfig.kv_threshold (default: the node's, RECOMMENDED)")
    parser.add_argument("--cube", help="BSAConfig.cube_size as TxHxW, e.g. 4x4x4 (default: the node's, RECOMMENDED)")
    parser.add_argument("--pooled-remainder", action=argparse.BooleanOptionalAction, default=None,
                        help="BSAConfig.pooled_remainder (default: the node's, RECOMMENDED)")
    parser.add_argument("--threshold-mode", choices=THRESHOLD_MODES,
                        help="BSAConfig.threshold_mode (default: the node's, RECOMMENDED)")
    parser.add_argument("--stat-lambda", type=float, help="BSAConfig.stat_lambda (default: the node's, RECOMMENDED)")
    parser.add_argument("--min-tokens", type=int,
                        help="the node's min_tokens: shorter videos stay dense (default: the node's; --tiny: 0; "
                             "0 makes a small --latent sparse, to find where BSA starts to pay)")
    parser.add_argument("--tdq", choices=("static", "table", "dynamic", "tdq"),
                        help="also time FP8 linear layers in this TDQConfig mode: variants tdq (dense attention) and "
                             "bsa+tdq")
    parser.add_argument("--tdq-fast-accum", action="store_true",
                        help="the FP8 linears with _scaled_mm's fast accumulation (TDQConfig.fast_accum)")
    parser.add_argument("--tdq-calibration-steps", type=int, default=2,
                        help="sampling steps of the quick calibration (static, table, tdq)")
    parser.add_argument("--prune", choices=("magnitude", "wanda"),
                        help="also time 2:4 linear layers pruned by this method (Prune Linears 2:4's apply path): "
                             "variants prune (dense attention) and bsa+prune")
    parser.add_argument("--prune-layers", choices=("fast", "all"), default="all",
                        help="Sparsity24Config.layers: all (every attention / FFN linear) or fast (only shapes "
                             "measured faster 2:4; none of the 1.3B's)")
    parser.add_argument("--prune-max-error", type=float, default=float("inf"),
                        help="Sparsity24Config.max_error (default inf: every layer of --prune-layers pruned; on "
                             "these random weights the node's 0.1 leaves every layer dense)")
    parser.add_argument("--teal", type=float, metavar="TARGET",
                        help="also time TEAL activation sparsity at this target (0-0.95, the node's default 0.1): "
                             "variants teal and bsa+teal")
    parser.add_argument("--prune-calibration-steps", type=int, default=2,
                        help="sampling steps of the quick calibration of --prune and --teal")
    parser.add_argument("--launched", action="store_true",
                        help="also time BSA with CUDA graph replay off (BSA_CUDA_GRAPHS=0; bsa_core/call_graphs.py): "
                             "variant bsa-launched, every call launched")
    parser.add_argument("--no-attention-share", action="store_true", help="skip the attention-timing step")
    parser.add_argument("--compile", action="store_true",
                        help="also sample dense, BSA (and with --tdq BSA + TDQ) through ComfyUI's TorchCompileModel "
                             "wrapper: variants dense+BACKEND, bsa+BACKEND, bsa+tdq+BACKEND")
    parser.add_argument("--compile-backend", choices=("inductor", "cudagraphs"), default="inductor",
                        help="TorchCompileModel's backend for --compile (default inductor)")
    parser.add_argument("--skip", default="", metavar="LABELS",
                        help="comma-separated variants not to run (e.g. tdq,bsa+tdq,bsa+inductor: less device time); "
                             "dense and bsa always run")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's own log lines")
    args = parser.parse_args(argv)

    console = logging.StreamHandler(sys.stdout)
    if not args.verbose:
        console.addFilter(ConsoleFilter())
    run_log = BSARunLog()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[console, run_log], force=True)

    size_name, (T, H, W), text_tokens, default_steps = SIZES["tiny" if args.tiny else "full"]
    if args.size and not args.tiny:
        size_name = args.size
    if args.latent:
        T, H, W = (int(n) for n in args.latent.split(","))
    steps = args.steps or default_steps
    if args.tiny:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        raise SystemExit("no CUDA device: the full-size run needs a GPU (use --tiny for the CPU smoke check)")
    config = bsa_config(args)
    min_tokens = args.min_tokens  # --tiny: 0, its latent is far below the node's min_tokens (BSA would never run)
    if min_tokens is None:
        min_tokens = 0 if args.tiny else RECOMMENDED_PATCH.min_tokens

    path = comfyui_path()
    stand_in = bootstrap_comfyui(path, cpu=device.type == "cpu")
    for f in console.filters:
        f.show_warnings = True  # from here on, e.g. "unet missing: ..." from the loader
    import comfy.ldm.modules.attention
    import comfy.sample
    import comfy.sd
    import comfyui_version
    from comfyui_bsa.bsa_core.patch import apply_bsa

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    print(f"device {name}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()}), triton {triton_version}, Python {platform.python_version()}")
    print(f"ComfyUI {comfyui_version.__version__} at {path}" +
          (f"; torchvision stood in for ({stand_in})" if stand_in else ""))

    # the model: random weights made on the target device, loaded by ComfyUI's own detection and loader
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    state = wan21_t2v_state_dict(size_name, seed=args.seed, dtype=torch.bfloat16, device=device)
    n_params = sum(t.numel() for t in state.values())
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": dtype})
    del state
    if model is None:
        raise SystemExit("ComfyUI did not recognise the state dict as a model")
    detected = f"{type(model.model).__name__} / {type(model.model.model_config).__name__}"
    dims = WAN21_T2V_SIZES[size_name]
    print(f"model Wan 2.1 T2V {size_name}: {n_params / 1e9:.3f} B params, dim {dims['dim']}, ffn "
          f"{dims['ffn_dim']}, {dims['layers']} blocks, {dims['dim'] // 128} heads; ComfyUI detected {detected}, "
          f"weights {model.model_dtype()}, built + loaded in {time.perf_counter() - start:.1f} s")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the state dict made on the GPU is gone: ComfyUI copied it to its own model

    generator = torch.Generator().manual_seed(args.seed)
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 16, T, H, W))
    inputs = {
        "latent": latent, "seed": args.seed, "noise": comfy.sample.prepare_noise(latent, args.seed),
        "positive": [[torch.randn(1, text_tokens, TEXT_DIM, generator=generator), {}]],
        "negative": [[torch.randn(1, text_tokens, TEXT_DIM, generator=generator), {}]],  # unused at cfg 1
        "cfg": args.cfg,
    }
    grid = (T, H // 2, W // 2)
    tokens = grid[0] * grid[1] * grid[2]
    calls_a_step = "one model call per step" if args.cfg == 1.0 else "positive and negative prompts a step"
    print(f"latent {list(latent.shape)} -> grid {grid} = {tokens} tokens; text {text_tokens} x {TEXT_DIM}; "
          f"euler / simple, cfg {args.cfg:g} ({calls_a_step}), {args.warmup_steps} warm-up + {steps} timed steps, "
          f"seed {args.seed}")
    sdpa = args.sdpa if device.type == "cuda" else "default"
    backend = f", torch SDPA backend {sdpa}" if device.type == "cuda" else ""
    print(f"dense attention: ComfyUI's {comfy.ldm.modules.attention.optimized_attention.__name__}{backend}; "
          f"the BSA run uses the same for cross-attention")
    print(f"BSA: {config} (start_percent 0, end_percent 1: every step sparse; min_tokens {min_tokens})")

    def with_bsa(m):
        return apply_bsa(m, config, start_percent=0.0, end_percent=1.0, min_tokens=min_tokens)

    bsa_model = with_bsa(model)
    compiled_suffix = f"+{args.compile_backend}"
    variants = {"dense": model, "bsa": bsa_model}
    if args.launched:
        variants["bsa-launched"] = bsa_model
    if args.tdq:
        variants["tdq"] = tdq_model(model, args, inputs)
        variants["bsa+tdq"] = with_bsa(variants["tdq"])
    if args.prune:
        variants["prune"] = prune_model(model, args, inputs, device)
        variants["bsa+prune"] = with_bsa(variants["prune"])
    teal_state = None
    if args.teal is not None:
        variants["teal"], teal_state = teal_model(model, args, inputs)
        variants["bsa+teal"] = with_bsa(variants["teal"])
    if args.compile:  # what TorchCompileModel does to the model it is given: dense, BSA and BSA + TDQ
        from comfy_api.torch_helpers import set_torch_compile_wrapper
        for label in ("dense", "bsa", "bsa+tdq")[:2 + bool(args.tdq)]:
            variants[label + compiled_suffix] = variants[label].clone()
            set_torch_compile_wrapper(variants[label + compiled_suffix], backend=args.compile_backend)
    skipped = {label.strip() for label in args.skip.split(",") if label.strip()} - {"dense", "bsa"}
    if skipped - set(variants):
        raise SystemExit(f"--skip: no variant {sorted(skipped - set(variants))} in this run (it has {list(variants)})")
    variants = {label: m for label, m in variants.items() if label not in skipped}
    results, stats, notes = {}, {}, {}
    width = max(7, *(len(label) for label in variants))
    for label, m in variants.items():
        # a compiled model warms up on the timed run's step count: its graphs are specialised on the schedule
        warmup = max(args.warmup_steps, steps) if label.endswith(compiled_suffix) else args.warmup_steps
        if warmup:
            start = time.perf_counter()
            run(m, inputs, warmup, device, sdpa, launched=label == "bsa-launched")
            print(f"{label:{width}s} warm-up ({warmup} step, model load, autotuning and compiling included): "
                  f"{time.perf_counter() - start:.2f} s", flush=True)
    for label, m in variants.items():
        runs_before = len(run_log.runs)
        results[label] = run(m, inputs, steps, device, sdpa, launched=label == "bsa-launched")
        stats[label] = run_log.runs[-1] if len(run_log.runs) > runs_before else None
        if label.endswith("prune"):  # read right after the timed run: the weights its last call used
            notes[label] = semi_structured(m)
        elif label.endswith("teal"):
            notes[label] = teal_state.stats.to_text()
        r = results[label]
        per_step = statistics.median(r["steps"])  # a compiled model's odd recompiling step does not count
        r["per_step"] = per_step
        peak = f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
        print(f"{label:{width}s} {per_step:8.3f} s/step (median; steps: {', '.join(f'{s:.3f}' for s in r['steps'])}){peak}",
              flush=True)

    dense, bsa = results["dense"], results["bsa"]
    compiled_dense = "dense" + compiled_suffix
    for label in [k for k in results if k.endswith(compiled_suffix) and k != compiled_dense]:
        compiled, eager = results[label], results.get(label.removesuffix(compiled_suffix))
        versus = (f", {results[compiled_dense]['per_step'] / compiled['per_step']:.2f}x over {compiled_dense}"
                  if compiled_dense in results else "")
        latent = ("" if eager is None else f"; final latent vs eager {label.removesuffix(compiled_suffix)} rel L2 "
                  f"{rel_l2(compiled['latent'], eager['latent']):.2e}")
        print(f"{label}: {dense['per_step'] / compiled['per_step']:.2f}x over dense{versus}; "
              f"{summary(stats[label])}{latent}")
    print(f"speed-up dense/BSA: {dense['per_step'] / bsa['per_step']:.2f}x "
          f"({dense['per_step']:.3f} -> {bsa['per_step']:.3f} s/step)")
    print(f"BSA run: {summary(stats['bsa'])}")
    if "bsa-launched" in results:
        launched = results["bsa-launched"]
        print(f"speed-up dense/bsa-launched (no CUDA graph replay): {dense['per_step'] / launched['per_step']:.2f}x "
              f"({launched['per_step']:.3f} s/step); replay gains {launched['per_step'] / bsa['per_step']:.2f}x; final "
              f"latent vs bsa rel L2 {rel_l2(launched['latent'], bsa['latent']):.3e}")
    diff = bsa["latent"] - dense["latent"]
    print(f"final latent BSA vs dense (same seed, {steps} step{'s' * (steps != 1)}): max abs {float(diff.abs().max()):.3e}, "
          f"rel L2 {rel_l2(bsa['latent'], dense['latent']):.3e} (|dense| max {float(dense['latent'].abs().max()):.3g})")
    kinds = {"tdq": f"{args.tdq} FP8 linears", "prune": f"{args.prune} 2:4 linears, layers {args.prune_layers}",
             "teal": f"TEAL input sparsity target {100 * (args.teal or 0):g}%"}
    for label, r in results.items():
        kind = kinds.get(label.removeprefix("bsa+"))
        if kind is None or label == "bsa":
            continue
        versus_bsa = f", vs BSA alone {rel_l2(r['latent'], bsa['latent']):.3e}" if label.startswith("bsa+") else ""
        print(f"speed-up dense/{label} ({kind}): {dense['per_step'] / r['per_step']:.2f}x "
              f"({dense['per_step']:.3f} -> {r['per_step']:.3f} s/step); final latent vs dense rel L2 "
              f"{rel_l2(r['latent'], dense['latent']):.3e}{versus_bsa}")
        for line in notes.get(label, "").splitlines():
            print(f"  {label}: {line}")
    if args.tdq:
        print(f"issue targets for bsa+tdq over dense: >= 2.4x at the node's defaults, >= 2.8x at statistical "
              f"lambda 1.5 (this run: {config.threshold_mode}, lambda {config.stat_lambda})")

    if not args.no_attention_share:
        share = {}
        for label, m in variants.items():
            with AttentionTimer(device) as timer:
                r = run(m, inputs, 1, device, sdpa, launched=label == "bsa-launched")
            share[label] = (r["steps"][0], timer.seconds("self"), timer.seconds("cross"),
                            len(timer.calls["self"]), len(timer.calls["cross"]))
            step, self_s, cross_s, n_self, n_cross = share[label]
            host_ms = {kind: 1e3 * sum(times) / max(len(times), 1) for kind, times in timer.host.items()}
            print(f"{label:{width}s} one step {step:.3f} s: self-attention {self_s:.3f} s ({n_self} calls, "
                  f"{100 * self_s / step:.1f}%, host {host_ms['self']:.3f} ms a call), cross-attention {cross_s:.3f} s "
                  f"({n_cross} calls, {100 * cross_s / step:.1f}%, host {host_ms['cross']:.3f} ms a call), rest "
                  f"{step - self_s - cross_s:.3f} s")
        step, self_s = share["dense"][0], share["dense"][1]
        bsa_self = share["bsa"][1]
        print(f"Amdahl: self-attention is {100 * self_s / step:.1f}% of a dense step; free self-attention "
              f"would give at most {step / max(step - self_s, 1e-12):.2f}x; BSA's self-attention takes "
              f"{bsa_self / max(self_s, 1e-12):.2f}x dense's ({self_s / max(bsa_self, 1e-12):.2f}x speed-up) -> predicted step "
              f"{step - self_s + bsa_self:.3f} s ({step / (step - self_s + bsa_self):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
