"""TEAL-style activation sparsity: inputs of a video model's linear layers whose magnitude lies below a
per-layer threshold are set to zero. Thresholds are calibrated per sigma bin (the input statistics change
along the schedule) as the `target` quantile of |x| seen while sampling a few seeds; at run time an
APPLY_MODEL wrapper sees each model call's sigma and picks the bin once per step.

No kernel turns the zeros into time yet: this measures what the zeros cost in quality and which sparsity
each layer reaches (RunStats), for a later sparse-input GEMM. `sparsify_reference` is the plain math.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict

import torch

from .linears import LOG_PREFIX, CalibrationSampling, RowSample, observe_linear_inputs, patch_linears, target_linears

log = logging.getLogger(__name__)

WRAPPER_KEY = "bsa_activation_sparsity"


@dataclasses.dataclass(frozen=True)
class ActivationSparsityConfig:
    """target: share of each layer's input entries to zero (0-0.95). sigma_bins: calibration steps are split
    into this many contiguous ranges of sigma, one threshold per layer and range. values_per_step: |x|
    entries sampled per layer and calibration step (CPU memory: layers x steps x values x 4 bytes)."""

    target: float = 0.1  # bench_prune on the trained model: 10 % keeps 46.8 dB, 25 % gave 24.6 dB
    sigma_bins: int = 4
    values_per_step: int = 8192

    def __post_init__(self):
        if not (isinstance(self.target, (int, float)) and 0 <= self.target <= 0.95):
            raise ValueError(f"target must lie in [0, 0.95], got {self.target!r}")
        if not isinstance(self.sigma_bins, int) or self.sigma_bins < 1:
            raise ValueError(f"sigma_bins must be an integer >= 1, got {self.sigma_bins!r}")
        if not isinstance(self.values_per_step, int) or self.values_per_step < 16:
            raise ValueError(f"values_per_step must be an integer >= 16, got {self.values_per_step!r}")


def sparsify_reference(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """x with every entry of magnitude below `threshold` set to 0."""
    return torch.where(x.abs() < threshold, torch.zeros_like(x), x)


def bin_edges(step_sigmas: list[float], bins: int) -> torch.Tensor:
    """Sigma boundaries (descending, bins - 1 of them; fewer when there are fewer steps) splitting the
    calibration steps (descending sigmas) into contiguous groups of near-equal size: midpoints between the
    last sigma of one group and the first of the next."""
    sigmas = sorted(set(step_sigmas), reverse=True)
    groups = min(bins, len(sigmas))
    starts = [round(i * len(sigmas) / groups) for i in range(1, groups)]
    return torch.tensor([(sigmas[s - 1] + sigmas[s]) / 2 for s in starts], dtype=torch.float64)


def sigma_bin(edges: torch.Tensor, sigma: float) -> int:
    """0 for the noisiest range; edges descending."""
    return int((edges > sigma).sum())


@dataclasses.dataclass
class RunStats:
    """Achieved input sparsity per (step sigma, layer) of the last sampling run: zeros and entries counted
    as tensors on the compute device (no sync per call), read when reported."""

    zeros: dict = dataclasses.field(default_factory=lambda: defaultdict(int))
    entries: dict = dataclasses.field(default_factory=lambda: defaultdict(int))

    def reset(self) -> None:
        self.zeros.clear()
        self.entries.clear()

    def record(self, sigma: float, layer: str, x_sparse: torch.Tensor) -> None:
        self.zeros[sigma, layer] = self.zeros[sigma, layer] + (x_sparse == 0).sum()
        self.entries[sigma, layer] += x_sparse.numel()

    def sparsity(self) -> dict[tuple[float, str], float]:
        return {key: float(self.zeros[key]) / self.entries[key] for key in self.entries}

    def to_text(self) -> str:
        table = self.sparsity()
        if not table:
            return "activation sparsity: no model call recorded"
        sigmas = sorted({s for s, _ in table}, reverse=True)
        mean = sum(table.values()) / len(table)
        lines = [f"activation sparsity of the last run: mean {100 * mean:.1f}% over {len(sigmas)} steps"]
        for step, sigma in enumerate(sigmas):
            row = [v for (s, _), v in table.items() if s == sigma]
            lines.append(f"step {step:3d} sigma {sigma:8.4f}: mean {100 * sum(row) / len(row):5.1f}%, "
                         f"min {100 * min(row):5.1f}%, max {100 * max(row):5.1f}% over {len(row)} layers")
        return "\n".join(lines)


class SigmaState:
    """The current model call's sigma and bin, set by the APPLY_MODEL wrapper; shared by one patch's layers."""

    def __init__(self, edges: torch.Tensor):
        self.edges = edges
        self.sigma: float | None = None
        self.bin: int | None = None
        self.stats = RunStats()


@dataclasses.dataclass(frozen=True, eq=False)
class ThresholdSparsifier:
    """One layer's input sparsifier: zeroes |x| < thresholds[bin of the current sigma]."""

    layer: str
    thresholds: torch.Tensor  # [bins], float32
    state: SigmaState

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.state.bin is None:  # called outside a sampler's model call: nothing to bin by
            return x
        threshold = float(self.thresholds[self.state.bin])
        x = torch.where(x.abs() < threshold, torch.zeros_like(x), x)
        self.state.stats.record(self.state.sigma, self.layer, x)
        return x


class InputMagnitudes:
    """Calibration: per layer and step (sigma) a uniform sample of |x| entries."""

    def __init__(self, values_per_step: int):
        self.values_per_step = values_per_step
        self.samples: dict[str, dict[float, RowSample]] = defaultdict(dict)

    def observe(self, name: str, x: torch.Tensor, sigma: float) -> None:
        by_sigma = self.samples[name]
        if sigma not in by_sigma:
            by_sigma[sigma] = RowSample(self.values_per_step, per_call=self.values_per_step, seed=len(by_sigma))
        by_sigma[sigma].add(x.detach().abs().reshape(-1, 1))

    def sigmas(self) -> list[float]:
        return sorted({s for by_sigma in self.samples.values() for s in by_sigma}, reverse=True)

    def values(self, name: str, edges: torch.Tensor, bin_index: int) -> torch.Tensor:
        parts = [sample.tensor().flatten() for sigma, sample in self.samples[name].items()
                 if sigma_bin(edges, sigma) == bin_index]
        return torch.cat(parts) if parts else torch.empty(0)


def quantile(values: torch.Tensor, q: float) -> float:
    """The threshold below which (strictly, as the sparsifier zeroes |x| < t) a share q of `values` lies: the
    (k+1)-th smallest value for k = round(q n) (torch.quantile caps its input at 2^24 entries; kthvalue does
    not); above the largest value when k = n."""
    n = values.numel()
    k = min(n, round(q * n)) if q > 0 else 0
    if k == 0:
        return 0.0
    if k == n:
        return float(torch.nextafter(values.max().float(), torch.tensor(math.inf)))
    return float(values.kthvalue(k + 1).values)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    edges: torch.Tensor  # [bins - 1] descending sigma boundaries
    per_layer: dict  # name -> [bins] float32
    calibration_sparsity: dict  # (name, bin) -> share of calibration |x| below the threshold

    def to_text(self) -> str:
        bins = len(self.edges) + 1
        edges = ", ".join(f"{float(e):.3f}" for e in self.edges)
        lines = [f"activation thresholds for {len(self.per_layer)} layers, {bins} sigma bins (edges {edges or '-'})"
                 f"; sparsity reached on calibration inputs per bin:"]
        for name, thresholds in self.per_layer.items():
            cells = "  ".join(f"{float(t):.4f} ({100 * self.calibration_sparsity[name, b]:4.1f}%)"
                              for b, t in enumerate(thresholds))
            lines.append(f"{name:28s} {cells}")
        return "\n".join(lines)


def fit_thresholds(magnitudes: InputMagnitudes, config: ActivationSparsityConfig) -> Thresholds:
    """Per layer and bin the `target` quantile of the sampled |x|; a bin with no samples takes the nearest
    noisier bin's threshold (or 0: no sparsity)."""
    edges = bin_edges(magnitudes.sigmas(), config.sigma_bins)
    per_layer, reached = {}, {}
    for name in magnitudes.samples:
        thresholds = []
        for b in range(len(edges) + 1):
            values = magnitudes.values(name, edges, b)
            if values.numel():
                thresholds.append(quantile(values, config.target))
                reached[name, b] = float((values < thresholds[-1]).float().mean())
            else:
                thresholds.append(thresholds[-1] if thresholds else 0.0)
                reached[name, b] = float("nan")
        per_layer[name] = torch.tensor(thresholds, dtype=torch.float32)
    return Thresholds(edges, per_layer, reached)


def calibrate_thresholds(model, config: ActivationSparsityConfig, sampling: CalibrationSampling) -> Thresholds:
    names = list(target_linears(model.get_model_object("diffusion_model")))
    magnitudes = InputMagnitudes(config.values_per_step)
    if names:  # not a Wan-shaped model: nothing to calibrate, nothing to patch
        observe_linear_inputs(model, names, magnitudes.observe, sampling)
    return fit_thresholds(magnitudes, config)


def install_thresholds(model, thresholds: Thresholds):
    """(clone of `model` with the thresholds on its layers' inputs, its SigmaState: .stats holds the last
    run's achieved sparsity)."""
    import comfy.patcher_extension

    state = SigmaState(thresholds.edges)

    def pick_bin(executor, x, t, *args, **kwargs):
        state.sigma = float(t.max())
        state.bin = sigma_bin(state.edges, state.sigma)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            state.sigma = state.bin = None

    def new_run(executor, *args, **kwargs):
        state.stats.reset()
        try:
            return executor(*args, **kwargs)
        finally:
            log.info("%s %s", LOG_PREFIX, state.stats.to_text().splitlines()[0])

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, pick_bin)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, new_run)
    for name, layer_thresholds in thresholds.per_layer.items():
        patch_linears(clone, [name], sparsify=ThresholdSparsifier(name, layer_thresholds, state))
    return clone, state


def apply_activation_sparsity(model, config: ActivationSparsityConfig, sampling: CalibrationSampling):
    """(patched clone, Thresholds, SigmaState): calibrates on `model` as it is, then installs."""
    thresholds = calibrate_thresholds(model, config, sampling)
    clone, state = install_thresholds(model, thresholds)
    return clone, thresholds, state
