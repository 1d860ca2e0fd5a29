"""The sparsity ramp (dense -> a target BSA setting over N steps, as FastVideo ramps VSA) and the hook that
puts one step's setting on the model's forward.

There is no sampler in training, so nothing installs bsa_core.patch's per-run override: the loop asks
`attention_options` for each forward's transformer_options, which carry that module's override
(make_override over a BSARun whose every step lies in the sigma window) with the ramp's setting.
`sampling_attention` does the same for a whole Euler run (training.model.sample_euler) with the node's
sigma window: steps outside start_percent..end_percent stay dense, decided as the node decides them.
"""
from __future__ import annotations

import dataclasses

from ..bsa_core.adapters import token_layout
from ..bsa_core.config import BSAConfig
from ..bsa_core.patch import OVERRIDE_KEY, RUN_KEY, BlockRanges, BSAOptions, BSARun, make_override
from .model import TIMESTEP_SCALE


@dataclasses.dataclass(frozen=True)
class SparsityRamp:
    """target: the setting reached at start + ramp_steps (None: dense throughout). Steps up to `start` are
    dense; then keep_ratio and kv_threshold go linearly from 1 and stat_lambda from `from_lambda` to the
    target's values (the other fields are the target's from the first sparse step on)."""

    target: BSAConfig | None
    start: int = 0
    ramp_steps: int = 0
    from_lambda: float = -3.0

    def progress(self, step: int) -> float:
        """0 at and before `start`, 1 from start + ramp_steps on, linear in between."""
        if step <= self.start:
            return 0.0
        return 1.0 if self.ramp_steps == 0 else min(1.0, (step - self.start) / self.ramp_steps)

    def at(self, step: int) -> BSAConfig | None:
        """The setting of optimizer step `step` (0-based), None for dense attention."""
        if self.target is None:
            return None
        f = self.progress(step)
        if f == 0.0:
            return None
        if f == 1.0:
            return self.target
        target = self.target
        return dataclasses.replace(target, keep_ratio=1 + f * (target.keep_ratio - 1),
                                   kv_threshold=1 + f * (target.kv_threshold - 1),
                                   stat_lambda=self.from_lambda + f * (target.stat_lambda - self.from_lambda))


def attention_options(config: BSAConfig | None, diffusion_model, x_shape, context_tokens: int,
                      dense_blocks: str = "") -> tuple[dict, BSARun | None]:
    """(transformer_options, run) for one forward of `diffusion_model` on a latent of `x_shape`: empty
    options and no run when `config` is None (dense), else bsa_core's override with `config` on every
    block but `dense_blocks` and every sequence length; run.stats counts what it did."""
    if config is None:
        return {}, None
    options = BSAOptions(config, start_percent=0.0, end_percent=1.0, dense_blocks=BlockRanges.of(dense_blocks),
                         min_tokens=0)
    run = BSARun(options)
    run.begin_forward(token_layout(diffusion_model, x_shape), context_tokens)
    return {RUN_KEY: run, OVERRIDE_KEY: make_override(run, None)}, run


def flow_model_sampling(shift: float):
    """ComfyUI's model sampling of a Wan model after ModelSamplingSD3(shift): what the node's sigma window
    (percent_to_sigma) is read from."""
    import comfy.model_sampling

    model_sampling = comfy.model_sampling.ModelSamplingDiscreteFlow()
    model_sampling.set_parameters(shift=shift, multiplier=TIMESTEP_SCALE)
    return model_sampling


def _sampling_run(config: BSAConfig, sigmas, shift: float, start_percent: float, end_percent: float,
                  dense_blocks: str) -> BSARun:
    options = BSAOptions(config, start_percent=float(start_percent), end_percent=float(end_percent),
                         dense_blocks=BlockRanges.of(dense_blocks), min_tokens=0)
    return BSARun(options, flow_model_sampling(shift), [float(s) for s in sigmas])


def sparse_steps(sigmas, shift: float, start_percent: float = 0.0, end_percent: float = 1.0) -> list[bool]:
    """Per step of a run over `sigmas` (steps + 1 of them), whether the node would run it sparse:
    bsa_core.patch's rule (the step's starting sigma between the sigmas of end_percent and start_percent)."""
    run = _sampling_run(BSAConfig(), sigmas, shift, start_percent, end_percent, "")
    steps = []
    for step in range(len(sigmas) - 1):
        run.begin_step(step)
        steps.append(run.in_window)
    return steps


def sampling_attention(config: BSAConfig | None, diffusion_model, x_shape, context_tokens: int, sigmas,
                       shift: float, start_percent: float = 0.0, end_percent: float = 1.0,
                       dense_blocks: str = ""):
    """(options_at, run) for training.model.sample_euler over `sigmas`: options_at(step) is that step's
    transformer_options, BSA with `config` on every block but `dense_blocks` and every sequence length, as
    the node runs it between start_percent and end_percent of the schedule (ModelSamplingSD3 at `shift`);
    outside that window the step is dense. run.stats counts the whole run. config None: dense, run None."""
    if config is None:
        return (lambda step: {}), None
    run = _sampling_run(config, sigmas, shift, start_percent, end_percent, dense_blocks)
    layout = token_layout(diffusion_model, x_shape)
    override = make_override(run, None)

    def options_at(step: int) -> dict:
        run.begin_step(step)
        run.begin_forward(layout, context_tokens)
        return {RUN_KEY: run, OVERRIDE_KEY: override}

    return options_at, run
