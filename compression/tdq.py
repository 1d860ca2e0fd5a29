"""TDQ: timestep-dynamic FP8 quantization of a diffusion model's linear layers (So et al., NeurIPS 2023).

Weights are e4m3 with per-output-channel scales; activations are e4m3 with one scale per layer per model
call, taken from what TDQConfig.mode says:
  off      no patch (the bf16 / model-dtype baseline)
  static   the largest input absmax seen in calibration, all sigmas (ComfyUI's `input_scale` idea)
  table    the largest absmax seen in the calibrated calls of the same timestep bin (a per-step table)
  dynamic  each token's own absmax, computed in every call (no calibration; costs a reduction per call)
  tdq      the interval generator: a small MLP per layer on a sinusoidal embedding of the model's timestep
           that outputs the layer's clipping interval, fit to minimise the layer's recorded quantization error

Fitting differs from the paper in one documented way: the paper trains the generators through the
network's output loss with a straight-through estimator; here each layer's generator minimises that
layer's own relative quantization MSE, which calibration records per call as a curve over clipping
fractions of the call's absmax (CLIP_GRID), so no activation tensor is kept (memory: L x calls x 32 floats).
The generator's output is evaluated once per model call, in the APPLY_MODEL wrapper that sees the sigma,
and the linear layers only read their entry of a scales tensor.

Only linear layers inside the transformer blocks are quantized (embeddings, time MLPs and the head keep
their dtype, as in the paper's and ComfyUI's FP8 practice); a layer that cannot be quantized keeps its dtype
and its reason is logged once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re

import torch
import torch.nn.functional as F

from .fp8 import E4M3_MAX, capability, fake_quantize, fp8_linear, no_fp8_matmul_reason, to_e4m3, weight_scales
from .linears import FP8_STORED, LinearPatch, TensorIdentity, linear_patches, patch_linears, stored_in_fp8

log = logging.getLogger(__name__)
LOG_PREFIX = "[TDQ]"
MODES = ("off", "static", "table", "dynamic", "tdq")
CALIBRATED_MODES = ("static", "table", "tdq")
FILE_FORMAT = "comfyui-bsa.tdq/1"
PATCH_KEY = "comfyui_bsa_tdq"
BLOCK_LAYER = re.compile(r"(^|\.)\w*blocks\.\d+\.")  # Wan blocks.N, HunyuanVideo double_blocks.N, LTXV transformer_blocks.N
CLIP_GRID = torch.linspace(0.25, 1.0, 32)  # clipping interval / call absmax at which calibration measures the error
SAMPLE_VALUES = 4096  # activation values per layer per call that the error curve is measured on
EMBED_FREQUENCIES = 8  # sinusoidal timestep embedding: 2 x 8 features
HIDDEN = 16
TIMESTEP_RANGE = 1000.0  # model timesteps lie in [0, 1000] for ComfyUI's samplings


@dataclasses.dataclass(frozen=True)
class TDQConfig:
    """mode: one of MODES. table_bins: timestep bins of the `table` mode's scale table. fast_accum: FP8 matmuls
    with _scaled_mm's fast accumulation (fp8.fp8_linear)."""
    mode: str = "tdq"
    table_bins: int = 20
    fast_accum: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.table_bins, bool) or not isinstance(self.table_bins, int) or self.table_bins < 1:
            raise ValueError(f"table_bins must be an integer >= 1, got {self.table_bins!r}")
        if not isinstance(self.fast_accum, bool):
            raise ValueError(f"fast_accum must be True or False, got {self.fast_accum!r}")


def timestep_embedding(timesteps: torch.Tensor) -> torch.Tensor:
    """[C] model timesteps -> [C, 2 * EMBED_FREQUENCIES] sin/cos features (periods 2x range down to ~1/64)."""
    frequencies = math.pi * torch.exp2(torch.arange(EMBED_FREQUENCIES, dtype=torch.float32)) / TIMESTEP_RANGE
    angles = timesteps.float().reshape(-1, 1) * frequencies / 2
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def generator_log_intervals(params: dict[str, torch.Tensor], timesteps: torch.Tensor) -> torch.Tensor:
    """The L interval generators at once: params w1 [L,F,H], b1 [L,H], w2 [L,H], b2 [L]; -> log interval [L, C]."""
    embedding = timestep_embedding(timesteps).to(params["w1"].device)
    hidden = F.silu(torch.einsum("cf,lfh->lch", embedding, params["w1"]) + params["b1"][:, None])
    return torch.einsum("lch,lh->lc", hidden, params["w2"]) + params["b2"][:, None]


def curve_error(errors: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Recorded error curves [L, C, G] over CLIP_GRID read at `fractions` [L, C] (linear interpolation,
    differentiable in fractions, clamped to the grid)."""
    grid = CLIP_GRID.to(errors.device)
    position = ((fractions.clamp(grid[0], grid[-1]) - grid[0]) / (grid[1] - grid[0]))
    low = position.floor().clamp(max=len(grid) - 2).long()
    weight = position - low
    lower = errors.gather(2, low[..., None])[..., 0]
    upper = errors.gather(2, (low + 1)[..., None])[..., 0]
    return lower + weight * (upper - lower)


def fit_generators(timesteps: torch.Tensor, absmax: torch.Tensor, errors: torch.Tensor, steps: int = 400,
                   seed: int = 0, progress=None) -> dict[str, torch.Tensor]:
    """Fits one generator per layer so that interval(t) minimises the recorded error curves: timesteps [C],
    absmax [L, C], errors [L, C, G] (NaN rows = calls the layer did not see). Starts from the best-on-average
    constant fraction. progress(i, steps) is called per optimiser step. Runs with gradients even when called
    in ComfyUI's inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_generators(timesteps.clone(), absmax.clone(), errors.clone(), steps, seed, progress)


def _fit_generators(timesteps, absmax, errors, steps, seed, progress):
    valid = torch.isfinite(absmax) & (absmax > 0)
    absmax = torch.where(valid, absmax, torch.ones_like(absmax))
    errors = torch.where(valid[..., None], errors, torch.zeros_like(errors))
    layers = absmax.shape[0]
    generator = torch.Generator().manual_seed(seed)
    best = CLIP_GRID[errors.sum(1).argmin(dim=1)]  # [L]
    mean_log_absmax = (absmax.log() * valid).sum(1) / valid.sum(1).clamp_min(1)
    params = {
        "w1": torch.randn(layers, 2 * EMBED_FREQUENCIES, HIDDEN, generator=generator) / (2 * EMBED_FREQUENCIES) ** 0.5,
        "b1": torch.zeros(layers, HIDDEN),
        "w2": torch.zeros(layers, HIDDEN),
        "b2": mean_log_absmax + best.log(),
    }
    for p in params.values():
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params.values(), lr=0.02)
    log_absmax = absmax.log()
    for i in range(steps):
        log_fraction = generator_log_intervals(params, timesteps) - log_absmax
        outside = F.relu(log_fraction) + F.relu(math.log(CLIP_GRID[0]) - log_fraction)  # pull back onto the grid
        loss = ((curve_error(errors, log_fraction.exp()) + outside ** 2) * valid).sum() / valid.sum().clamp_min(1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress(i + 1, steps)
    return {name: p.detach() for name, p in params.items()}


def base_weights(model) -> dict[str, torch.Tensor]:
    """The diffusion model's unpatched parameters by name, whatever clone is currently patched into it: LoRA
    weights are read from the patcher's backups."""
    weights = {}
    for name, module in model.model.diffusion_model.named_modules():
        for key, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{name}.{key}" if name else key
            backup = model.backup.get(f"diffusion_model.{full}")
            weights[full] = backup.weight if backup is not None else tensor
    return weights


def model_fingerprint(model) -> str:
    """sha256 of the diffusion model's base parameter names, shapes, dtypes and up to 4096 leading and
    trailing values of each."""
    digest = hashlib.sha256()
    for name, tensor in sorted(base_weights(model).items()):
        flat = tensor.detach().reshape(-1)
        values = torch.cat([flat[:4096], flat[-4096:]]).float().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


@dataclasses.dataclass
class TDQCalibration:
    """What calibration measured and fit for one model: layers (names under diffusion_model), timesteps [C] of
    the recorded calls, absmax [L, C], errors [L, C, G] (relative MSE over CLIP_GRID), generator params."""
    model_hash: str
    layers: tuple[str, ...]
    timesteps: torch.Tensor
    absmax: torch.Tensor
    errors: torch.Tensor
    generator: dict[str, torch.Tensor]

    def __repr__(self):
        return (f"TDQCalibration({len(self.layers)} layers, {len(self.timesteps)} calls, "
                f"model {self.model_hash[:12]})")

    def static_intervals(self) -> torch.Tensor:
        """[L]: the largest absmax over all recorded calls."""
        return torch.nan_to_num(self.absmax, nan=0.0).amax(dim=1)

    def table_intervals(self, bins: int) -> torch.Tensor:
        """[L, bins]: the largest absmax per timestep bin; an empty bin takes the nearest filled bin's."""
        index = timestep_bin(self.timesteps, bins)
        absmax = torch.nan_to_num(self.absmax, nan=0.0)
        table = torch.zeros(absmax.shape[0], bins).scatter_reduce(1, index.expand_as(absmax), absmax, "amax")
        filled = torch.zeros(bins, dtype=torch.bool).scatter(0, index[0], True).nonzero()[:, 0]
        nearest = filled[(torch.arange(bins)[:, None] - filled[None]).abs().argmin(dim=1)]
        return table[:, nearest]

    def generator_intervals(self, timesteps: torch.Tensor) -> torch.Tensor:
        """[L, C]: the generators' intervals at `timesteps` [C]."""
        return generator_log_intervals(self.generator, timesteps).exp()

    def save(self, path) -> None:
        from safetensors.torch import save_file
        tensors = {"timesteps": self.timesteps, "absmax": self.absmax, "errors": self.errors,
                   **{f"generator.{k}": v for k, v in self.generator.items()}}
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"format": FILE_FORMAT, "model_hash": self.model_hash, "layers": json.dumps(self.layers)})

    @classmethod
    def load(cls, path, model=None) -> TDQCalibration:
        """Reads a file written by save(); with `model`, raises ValueError naming the file when it was
        calibrated for other weights."""
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FILE_FORMAT:
            raise ValueError(f"calibration_file {path} is not a TDQ calibration ({FILE_FORMAT})")
        tensors = load_file(str(path))
        calibration = cls(metadata["model_hash"], tuple(json.loads(metadata["layers"])), tensors["timesteps"],
                          tensors["absmax"], tensors["errors"],
                          {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("generator.")})
        if model is not None:
            calibration.check_model(model, path)
        return calibration

    def check_model(self, model, source="the calibration") -> None:
        fingerprint = model_fingerprint(model)
        if fingerprint != self.model_hash:
            raise ValueError(f"calibration_file {source} was calibrated for other model weights "
                             f"(hash {self.model_hash[:12]}, this model {fingerprint[:12]}): calibrate this model")


def timestep_bin(timesteps: torch.Tensor, bins: int) -> torch.Tensor:
    return (timesteps.float() / TIMESTEP_RANGE * bins).long().clamp(0, bins - 1).reshape(1, -1)


class FP8Weight:
    """The FP8 form of one linear layer, set as LinearPatch.fp8 on a clone (the nn.Linear, its parameters and
    ComfyUI's weight patches such as LoRA stay in place): its e4m3 weight with per-output-channel scales (of the
    2:4-masked weight when the layer is pruned too), made again only when the weight or bias tensor is replaced
    (a LoRA patch) or moved, and its activation scale `x_scale`, a 0-d view into the per-layer scales apply_tdq
    updates in place once per model call (a tensor, not an index, so torch.compile does not specialise each
    layer's graph on it), or per token when None (dynamic)."""

    def __init__(self, x_scale: torch.Tensor | None, fast_accum: bool = False):
        self.x_scale, self.fast_accum = x_scale, fast_accum
        self._cache_key, self._cache = None, None

    def quantized(self, module: torch.nn.Linear, device, mask: torch.Tensor | None = None):
        """(e4m3 weight [out, in], scales [out, 1], bias or None) on `device`. Inside torch.compile the cache is
        read as it is: apply_tdq's APPLY_MODEL wrapper checks it before each model call (comparing data pointers
        is a graph break, and one per layer made Dynamo recompile past its limit)."""
        if torch.compiler.is_compiling() and self._cache is not None:
            return self._cache
        weight, bias = module.weight, module.bias
        if self._cache_key is None or not self._cache_key.matches((weight, bias, mask), str(device)):
            key = TensorIdentity((weight, bias, mask), str(device))  # inference tensors have no _version
            weight = weight.detach().to(device)
            if mask is not None:
                weight = weight * mask.to(device)
            scales = weight_scales(weight)
            bias = None if bias is None else bias.detach().to(device)
            self._cache, self._cache_key = (to_e4m3(weight, scales), scales, bias), key
        return self._cache

    def linear(self, module: torch.nn.Linear, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        weight_fp8, w_scale, bias = self.quantized(module, x.device, mask)
        return fp8_linear(x, weight_fp8, w_scale, None if bias is None else bias.to(x.dtype), self.x_scale,
                          self.fast_accum)


def quantizable_layers(model) -> tuple[list[str], dict[str, str]]:
    """(names of the linear layers to quantize, {name: reason} of the linears that keep their dtype)."""
    chosen, skipped = [], {}
    for name, module in model.get_model_object("diffusion_model").named_modules():
        if not name or not isinstance(module, torch.nn.Linear):
            continue
        if not BLOCK_LAYER.search(name):
            skipped[name] = "outside the transformer blocks (embeddings, time MLPs and head keep their dtype)"
        elif module.in_features % 16 or module.out_features % 16:
            skipped[name] = "in/out features not multiples of 16 (torch._scaled_mm)"
        elif stored_in_fp8(module):
            skipped[name] = FP8_STORED
        else:
            chosen.append(name)
    return chosen, skipped


def _log_skipped(skipped: dict[str, str]) -> None:
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        log.info(f"{LOG_PREFIX} {len(names)} linear layers keep their dtype: {reason} (e.g. {names[0]})")


def _call_timestep(executor, args, kwargs) -> torch.Tensor:
    """APPLY_MODEL (x, t, ...): the model timestep of the call's largest sigma (a 0-d float tensor)."""
    sigma = kwargs["t"] if "t" in kwargs else args[1]
    return executor.class_obj.model_sampling.timestep(sigma.max()).float().cpu()


def apply_tdq(model, config: TDQConfig, calibration: TDQCalibration | None = None):
    """A clone of `model` (a ComfyUI ModelPatcher) whose transformer-block linear layers run in FP8 as
    config.mode says; `model` is untouched. static, table and tdq need the model's `calibration`."""
    import comfy.patcher_extension as pe

    if not isinstance(config, TDQConfig):
        raise ValueError(f"config must be a TDQConfig, got {type(config).__name__}")
    patched = model.clone()
    if config.mode == "off":
        return patched
    earlier = [name for name, patch in linear_patches(patched).items() if patch.fp8 is not None]
    if earlier:  # TDQ on a TDQ model: the new one replaces it (its wrapper would keep refreshing stale layers)
        log.warning(f"{LOG_PREFIX} this model already has FP8 linear layers: the later TDQ node's replace them")
        patch_linears(patched, earlier, fp8=None)
        patched.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, PATCH_KEY)
    if config.mode in CALIBRATED_MODES:
        if calibration is None:
            raise ValueError(f"calibration is required for mode {config.mode!r} (run TDQ Calibrate)")
        calibration.check_model(model)
        layers = list(calibration.layers)
    else:
        layers, skipped = quantizable_layers(model)
        _log_skipped(skipped)
    device = model.load_device
    # per layer; static: always, table and tdq: outside sampling (each call writes its sigma's in place)
    scales = None if config.mode == "dynamic" else (
        calibration.static_intervals() / E4M3_MAX).clamp_min(1e-12).to(device)
    weights = [FP8Weight(None if scales is None else scales[index], config.fast_accum) for index in range(len(layers))]
    for name, fp8 in zip(layers, weights):
        patch_linears(patched, [name], fp8=fp8)
    table = calibration.table_intervals(config.table_bins) if config.mode == "table" else None
    slow_path_logged = []  # once per patched model: its first call says when FP8 matmuls are not there

    def before_call(executor, *args, **kwargs):
        """APPLY_MODEL, before the model runs: the layers' FP8 weights checked on the input's device (read as
        they are inside torch.compile), with the 2:4 mask of the patch live in this run (a prune node may come
        after this one), and, for table and tdq, the activation scales of this call's sigma."""
        x = kwargs["x"] if "x" in kwargs else args[0]
        if x.is_cuda:
            capability(x.device.index)  # read here, outside the compiled model (fp8.capability)
        if not slow_path_logged:
            slow_path_logged.append(True)
            reason = no_fp8_matmul_reason(x.device)
            if reason is not None:
                log.warning(f"{LOG_PREFIX} {reason}: the FP8 layers run the fake-quantized reference (float32), "
                            "slower than the model without TDQ; mode 'off' keeps its speed")
        diffusion_model = executor.class_obj.diffusion_model
        for name, fp8 in zip(layers, weights):
            patch = diffusion_model.get_submodule(name).forward
            if isinstance(patch, LinearPatch) and patch.fp8 is fp8:
                fp8.quantized(patch.module, x.device, None if patch.weight24 is None else patch.weight24.mask)
        if config.mode in ("table", "tdq"):
            timestep = _call_timestep(executor, args, kwargs)
            if table is not None:
                intervals = table[:, timestep_bin(timestep, config.table_bins)[0, 0]]
            else:
                intervals = calibration.generator_intervals(timestep.reshape(1))[:, 0]
            scales.copy_((intervals / E4M3_MAX).clamp_min(1e-12))
        return executor(*args, **kwargs)

    patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, PATCH_KEY, before_call)
    return patched


class Recorder:
    """Per model call: each layer's input absmax and relative quantization MSE over CLIP_GRID, measured on
    SAMPLE_VALUES values drawn (seeded) from the input; nothing else is kept."""

    def __init__(self, layers: int):
        self.layers = layers
        self.timesteps, self.absmax, self.errors = [], [], []
        self._generator = torch.Generator().manual_seed(0)

    def begin_call(self, timestep: torch.Tensor) -> None:
        self.timesteps.append(float(timestep))
        self.absmax.append(torch.full((self.layers,), float("nan")))
        self.errors.append(torch.full((self.layers, len(CLIP_GRID)), float("nan")))

    @torch.no_grad()
    def record(self, index: int, x: torch.Tensor) -> None:
        if not self.timesteps:
            return  # a call outside sampling
        flat = x.detach().reshape(-1)
        low, high = torch.aminmax(flat)  # one pass, no |x| copy
        absmax = torch.maximum(-low, high).float()
        picks = torch.randint(0, flat.numel(), (min(SAMPLE_VALUES, flat.numel()),), generator=self._generator)
        sample = flat[picks.to(flat.device)].float()
        self.absmax[-1][index] = absmax.cpu()
        self.errors[-1][index] = clipping_error_curve(sample, absmax).cpu()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """timesteps [C], absmax [L, C], errors [L, C, G]."""
        return (torch.tensor(self.timesteps), torch.stack(self.absmax, dim=1), torch.stack(self.errors, dim=1))


def clipping_error_curve(values: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """[G]: relative MSE of per-tensor e4m3 fake quantization of `values` [N] with interval f * absmax, f in CLIP_GRID."""
    scales = (CLIP_GRID.to(values.device) * absmax / E4M3_MAX).clamp_min(1e-12)[:, None]
    quantized = fake_quantize(values[None], scales)
    return ((quantized - values) ** 2).mean(dim=1) / (values ** 2).mean().clamp_min(1e-30)


def calibrate_tdq(model, prompts, latent: dict, steps: int = 20, cfg: float = 5.0, sampler_name: str = "euler",
                  scheduler: str = "simple", seed: int = 0, seeds_per_prompt: int = 1, fit_steps: int = 400,
                  progress=None) -> TDQCalibration:
    """Samples every (positive, negative) of `prompts` with seeds seed.. seed+seeds_per_prompt-1 on a clone of
    `model` (the whole `latent` batch), records its block linear layers' inputs per model call
    (compression.linears.observe_linear_inputs) and fits the interval generators. progress(done, total)
    follows the sampling steps and then the fit (tqdm is shown as well)."""
    from tqdm.auto import tqdm

    from .linears import CalibrationSampling, observe_linear_inputs

    for name, value, low in (("steps", steps, 1), ("seeds_per_prompt", seeds_per_prompt, 1), ("fit_steps", fit_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not prompts:
        raise ValueError("prompts must hold at least one (positive, negative) pair")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**64 - seeds_per_prompt:
        raise ValueError(f"seed must be an integer in [0, 2**64 - seeds] (seeds {seeds_per_prompt} follow it), "
                         f"got {seed!r}")
    layers, skipped = quantizable_layers(model)
    _log_skipped(skipped)
    index = {name: i for i, name in enumerate(layers)}
    recorder = Recorder(len(layers))
    model_sampling = model.get_model_object("model_sampling")
    per_prompt = seeds_per_prompt * steps
    total = len(prompts) * per_prompt + fit_steps
    bar = tqdm(total=total, desc=f"{LOG_PREFIX} calibrate", leave=False)

    def advance(done):
        bar.update(done - bar.n)
        if progress is not None:
            progress(done, total)

    for p, (positive, negative) in enumerate(prompts):
        sampling = CalibrationSampling(positive, negative, latent, seeds_per_prompt, steps, cfg, sampler_name,
                                       scheduler, seed, whole_batch=True)
        observe_linear_inputs(
            model, layers, lambda name, x, sigma: recorder.record(index[name], x), sampling,
            on_call=lambda sigma: recorder.begin_call(model_sampling.timestep(torch.tensor(sigma)).float()),
            progress=lambda done, _, p=p: advance(p * per_prompt + done))
    timesteps, absmax, errors = recorder.tensors()
    generator = fit_generators(timesteps, absmax, errors, fit_steps,
                               progress=lambda i, n: advance(len(prompts) * per_prompt + i))
    bar.close()
    log.info(f"{LOG_PREFIX} calibrated {len(layers)} layers on {len(timesteps)} model calls")
    return TDQCalibration(model_fingerprint(model), tuple(layers), timesteps, absmax, errors, generator)
