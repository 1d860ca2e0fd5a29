"""2:4 semi-structured pruning of a video model's linear layers (magnitude or Wanda), chosen per layer.

In every group of 4 consecutive weights along the input dimension the 2 with the highest score are kept:
magnitude scores |W|, Wanda scores |W| * ||X_j||_2 (the L2 norm of input channel j over calibration
tokens; Sun et al. 2023). A layer is pruned only when (a) its relative output error on calibration inputs,
||X (W - W*M)^T|| / ||X W^T + b||, is at most `max_error` and (b) its shape is expected to run faster
2:4 than dense (`layers="fast"`: MEASURED_SPEEDUP, else the large-layer rule) or `layers="all"`.

`apply_sparsity24(model_clone, config, sampling)` patches the chosen layers' forward on the clone. On a GPU
that runs 2:4 (CUDA, compute capability >= 8.0, fp16/bf16, both dims multiples of 64) the masked weight is
compressed once with torch.sparse.to_sparse_semi_structured (cuSPARSELt / CUTLASS) at the layer's first
call after the model is loaded (under autocast: in autocast's dtype); elsewhere the masked weight runs
dense: the same numbers, no speed.
`masked_linear_reference` is the plain-torch math both paths are tested against.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

from .linears import (FP8_STORED, LOG_PREFIX, CalibrationSampling, RowSample, TensorIdentity, observe_linear_inputs,
                      patch_linears, stored_in_fp8, target_linears)

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda")
LAYER_RULES = ("fast", "all")
# (out_features, in_features) -> speed-up of 2:4 over the same masked weights dense, bf16, measured by
# `python3 bench/bench_prune.py` on an H200 (torch 2.11, Wan 1.3B 480p / 14B 720p token counts,
# bench/results/session5_final_h200.txt). Shapes not listed follow the large-layer rule.
MEASURED_SPEEDUP: dict[tuple[int, int], float] = {
    (1536, 1536): 0.23, (8960, 1536): 0.59, (1536, 8960): 0.63,
    (5120, 5120): 0.97, (13824, 5120): 1.19, (5120, 13824): 0.95,
}
LARGE_LAYER_FEATURES = 5120


@dataclasses.dataclass(frozen=True)
class Sparsity24Config:
    """method: 'magnitude' (no calibration needed for the masks) or 'wanda'. max_error: largest relative
    output error on calibration inputs a pruned layer may have (layers above stay dense). layers: 'fast'
    (only shapes expected to gain speed) or 'all' (every Wan attention / FFN linear; quality experiments).
    error_rows: calibration input rows kept per layer to measure the error (CPU memory: rows x in_features
    x 4 bytes per layer)."""

    method: str = "wanda"
    max_error: float = 0.1  # bench_prune on the trained model: 0.1 keeps >= 30 dB, 0.2 gave 23 dB
    layers: str = "fast"
    error_rows: int = 128

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.layers not in LAYER_RULES:
            raise ValueError(f"layers must be one of {LAYER_RULES}, got {self.layers!r}")
        if not (isinstance(self.max_error, (int, float)) and self.max_error >= 0):
            raise ValueError(f"max_error must be a number >= 0, got {self.max_error!r}")
        if not isinstance(self.error_rows, int) or self.error_rows < 1:
            raise ValueError(f"error_rows must be an integer >= 1, got {self.error_rows!r}")


def mask_24(scores: torch.Tensor) -> torch.Tensor:
    """Boolean mask [out, in] keeping the 2 highest scores of every 4 consecutive along the input dim."""
    out_features, in_features = scores.shape
    if in_features % 4:
        raise ValueError(f"2:4 needs in_features divisible by 4, got {in_features}")
    groups = scores.float().reshape(out_features, in_features // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(out_features, in_features)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2: weight [out, in], input_norm [in] (L2 norm of each input channel)."""
    return weight.detach().float().abs() * input_norm.to(weight.device, torch.float32)[None, :]


def masked_linear_reference(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias=None) -> torch.Tensor:
    """The plain-torch 2:4 linear: x @ (W * mask)^T + b, in float32."""
    y = x.float() @ (weight.float() * mask.float()).T
    return y if bias is None else y + bias.float()


def relative_output_error(rows: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias=None) -> float:
    """||X (W - W*M)^T|| / ||X W^T + b|| over calibration rows [N, in] (float32)."""
    weight = weight.detach().float().cpu()
    full = rows @ weight.T + (0 if bias is None else bias.detach().float().cpu())
    removed = rows @ (weight * (~mask.cpu()).float()).T
    return float(removed.norm() / full.norm().clamp_min(1e-12))


def expected_speedup(out_features: int, in_features: int) -> float | None:
    """Measured 2:4 / dense speed-up of the shape, or None when unmeasured (then the large-layer rule)."""
    return MEASURED_SPEEDUP.get((out_features, in_features))


def expected_to_gain(out_features: int, in_features: int) -> bool:
    speedup = expected_speedup(out_features, in_features)
    if speedup is not None:
        return speedup > 1.0
    return min(out_features, in_features) >= LARGE_LAYER_FEATURES


def semi_structured_unsupported(weight: torch.Tensor) -> str | None:
    """Why `weight` (masked, on its compute device and dtype) cannot run through
    to_sparse_semi_structured, or None when it can."""
    if weight.device.type != "cuda":
        return f"on {weight.device.type}, not CUDA"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "GPU compute capability below 8.0"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {weight.dtype} (2:4 runs fp16 / bf16)"
    if weight.shape[0] % 64 or weight.shape[1] % 64:
        return f"shape {tuple(weight.shape)} not a multiple of 64"
    return None


_logged_reasons: set[str] = set()


class Sparse24Weight:
    """A layer's 2:4 mask and, per compute device / dtype / weight tensor, the weight it runs: compressed
    semi-structured where supported, else masked dense (made once per load, not per call)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.to(torch.bool).cpu()
        self._key = None
        self._weight = None
        self.dense_reason: str | None = None  # why the last call's weight runs masked dense (None: compressed)

    def weight_for(self, module: torch.nn.Linear, x: torch.Tensor):
        weight = module.weight
        if self._key is None or not self._key.matches((weight,), x.device, x.dtype):  # LoRA patches swap it
            key = TensorIdentity((weight,), x.device, x.dtype)
            masked = weight.detach().to(x.device, x.dtype) * self.mask.to(x.device)
            reason = self.dense_reason = semi_structured_unsupported(masked)
            if reason is None:
                from torch.sparse import to_sparse_semi_structured
                masked = to_sparse_semi_structured(masked)
            elif reason not in _logged_reasons:
                _logged_reasons.add(reason)
                log.info("%s 2:4 weights run masked dense (same numbers, no speed-up): %s", LOG_PREFIX, reason)
            self._key, self._weight = key, masked
        return self._weight

    @property
    def compressed(self) -> bool:
        """Whether the weight of the last call runs semi-structured (2:4 sparse tensor cores)."""
        return self._weight is not None and self.dense_reason is None

    @property
    def kernel(self) -> str | None:
        """Which library the last call's semi-structured weight runs through: 'cuSPARSELt' or 'CUTLASS'
        (torch picks cuSPARSELt unless SparseSemiStructuredTensor._FORCE_CUTLASS); None when masked dense."""
        if not self.compressed:
            return None
        name = type(self._weight).__name__
        return {"SparseSemiStructuredTensorCUSPARSELT": "cuSPARSELt",
                "SparseSemiStructuredTensorCUTLASS": "CUTLASS"}.get(name, name)

    def linear(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # compute in autocast's dtype, as F.linear would
            x = x.to(torch.get_autocast_dtype(x.device.type))
        weight = self.weight_for(module, x)
        bias = None if module.bias is None else module.bias.to(x.device, x.dtype)
        rows = x.reshape(-1, x.shape[-1])
        # the sparse GEMM computes (W x^T)^T and returns that column-major view: a dense Linear's output is
        # row-major, and fused attention kernels (cuDNN SDPA) refuse a V without unit last-dim stride
        return torch.nn.functional.linear(rows, weight, bias).contiguous().reshape(*x.shape[:-1], -1)


class InputStats:
    """Per layer: sum of squares of each input channel over all calibration tokens, and a row sample."""

    def __init__(self, error_rows: int):
        self.error_rows = error_rows
        self.sum_sq: dict[str, torch.Tensor] = {}
        self.rows: dict[str, RowSample] = {}

    def observe(self, name: str, x: torch.Tensor, sigma=None) -> None:
        rows = x.reshape(-1, x.shape[-1])
        sum_sq = rows.float().square().sum(0)
        self.sum_sq[name] = self.sum_sq[name] + sum_sq if name in self.sum_sq else sum_sq
        if name not in self.rows:
            self.rows[name] = RowSample(self.error_rows, per_call=max(1, self.error_rows // 16), seed=len(self.rows))
        self.rows[name].add(rows)

    def input_norm(self, name: str) -> torch.Tensor:
        return self.sum_sq[name].sqrt()


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    rel_error: float | None
    pruned: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class Sparsity24Result:
    config: Sparsity24Config
    choices: tuple[LayerChoice, ...]
    masks: dict  # name -> bool mask [out, in] of the pruned layers

    def to_text(self) -> str:
        pruned = [c for c in self.choices if c.pruned]
        lines = [f"2:4 {self.config.method}, layers={self.config.layers}, max_error={self.config.max_error}: "
                 f"{len(pruned)} of {len(self.choices)} layers pruned"]
        for c in self.choices:
            error = "   -  " if c.rel_error is None else f"{c.rel_error:6.3f}"
            lines.append(f"{c.name:28s} {c.shape[0]:6d}x{c.shape[1]:<6d} err {error}  "
                         f"{'2:4  ' if c.pruned else 'dense'} {c.reason}")
        return "\n".join(lines)


def choose_layers(linears: dict[str, torch.nn.Linear], config: Sparsity24Config,
                  stats: InputStats | None) -> Sparsity24Result:
    """Masks for every eligible layer and the per-layer decision (see the module docstring). Without
    stats (no calibration) the error is not measured and every eligible layer is pruned (magnitude only)."""
    if stats is None and config.method == "wanda" and linears:
        raise ValueError("method 'wanda' needs calibration inputs")
    choices, masks = [], {}
    for name, module in linears.items():
        out_features, in_features = module.weight.shape
        shape = (out_features, in_features)
        if in_features % 4:
            choices.append(LayerChoice(name, shape, None, False, "in_features not divisible by 4"))
            continue
        if stored_in_fp8(module):
            choices.append(LayerChoice(name, shape, None, False, FP8_STORED))
            continue
        if config.layers == "fast" and not expected_to_gain(out_features, in_features):
            choices.append(LayerChoice(name, shape, None, False, "shape not expected to gain speed"))
            continue
        if stats is not None and name not in stats.sum_sq:
            choices.append(LayerChoice(name, shape, None, False, "not called during calibration"))
            continue
        scores = (wanda_scores(module.weight, stats.input_norm(name)) if config.method == "wanda"
                  else magnitude_scores(module.weight))
        mask = mask_24(scores)
        error = None if stats is None else relative_output_error(stats.rows[name].tensor(), module.weight, mask,
                                                                 module.bias)
        if error is not None and not math.isfinite(error):  # inf in the calibration inputs (fp16 overflow)
            choices.append(LayerChoice(name, shape, error, False, "non-finite calibration output"))
            continue
        if error is not None and error > config.max_error:
            choices.append(LayerChoice(name, shape, error, False, f"error above {config.max_error}"))
            continue
        choices.append(LayerChoice(name, shape, error, True, ""))
        masks[name] = mask
    return Sparsity24Result(config, tuple(choices), masks)


def calibrate_inputs(model, names, config: Sparsity24Config, sampling: CalibrationSampling) -> InputStats:
    stats = InputStats(config.error_rows)
    observe_linear_inputs(model, names, stats.observe, sampling)
    return stats


def apply_sparsity24(model, config: Sparsity24Config, sampling: CalibrationSampling | None = None):
    """(clone of the ModelPatcher `model` with the chosen layers 2:4-pruned, Sparsity24Result). Calibrates
    with `sampling` when given (needed for Wanda and for the error criterion)."""
    linears = target_linears(model.get_model_object("diffusion_model"))
    stats = None if sampling is None or not linears else calibrate_inputs(model, list(linears), config, sampling)
    result = choose_layers(linears, config, stats)
    clone = model.clone()
    for name, mask in result.masks.items():
        patch_linears(clone, [name], weight24=Sparse24Weight(mask))
    log.info("%s %s", LOG_PREFIX, result.to_text().splitlines()[0])
    return clone, result


def magnitude_masks(diffusion_model: torch.nn.Module, config: Sparsity24Config) -> dict[str, torch.Tensor]:
    """Masks of the layers `config` prunes without calibration (magnitude scores, no error criterion)."""
    if config.method != "magnitude":
        raise ValueError(f"method must be 'magnitude' without calibration inputs, got {config.method!r}")
    return choose_layers(target_linears(diffusion_model), config, None).masks


def save_masks(masks: dict[str, torch.Tensor], path) -> None:
    """Writes masks (layer name -> bool [out, in]) as a safetensors file: what a recovery fine-tune keeps
    (training config `prune_masks`), e.g. the Wanda masks of a calibration run."""
    from safetensors.torch import save_file
    save_file({name: mask.to(torch.bool).cpu().contiguous() for name, mask in masks.items()}, str(path))


def load_masks(path, diffusion_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """save_masks' file, checked against `diffusion_model`: every name a target linear, every mask of its
    weight's shape with 2 of every 4 kept."""
    from safetensors.torch import load_file
    masks = {name: mask.to(torch.bool) for name, mask in load_file(str(path)).items()}
    linears = target_linears(diffusion_model)
    for name, mask in masks.items():
        if name not in linears:
            raise ValueError(f"prune_masks {path}: {name!r} is not an attention / FFN linear of the model")
        if tuple(mask.shape) != tuple(linears[name].weight.shape):
            raise ValueError(f"prune_masks {path}: {name!r} has shape {tuple(mask.shape)}, the weight "
                             f"{tuple(linears[name].weight.shape)}")
        if mask.shape[1] % 4 or not (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all():
            raise ValueError(f"prune_masks {path}: {name!r} does not keep 2 of every 4 weights")
    return masks


@torch.no_grad()
def apply_masks_(diffusion_model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zeroes the masked-out weights in place: run once before training and after every optimizer step, it
    keeps a recovery fine-tune on the same 2:4 pattern (Adam's moments would otherwise revive them)."""
    for name, mask in masks.items():
        weight = diffusion_model.get_submodule(name).weight
        weight.mul_(mask.to(weight.device, weight.dtype))
