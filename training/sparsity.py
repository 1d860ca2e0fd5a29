"""The sparsity ramp (dense -> a target BSA setting over N steps, as FastVideo ramps VSA) and the hook that
puts one step's setting on the model's forward.

There is no sampler in training, so nothing installs bsa_core.patch's per-run override: the loop asks
`attention_options` for each forward's transformer_options, which carry that module's override
(make_override over a BSARun whose every step lies in the sigma window) with the ramp's setting.
"""
from __future__ import annotations

import dataclasses

from ..bsa_core.adapters import token_layout
from ..bsa_core.config import BSAConfig
from ..bsa_core.patch import OVERRIDE_KEY, RUN_KEY, BlockRanges, BSAOptions, BSARun, make_override


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
