"""The BSA Report's kept-KV plot: one cell per (step, layer) in the colour of the table's kept KV cubes %."""
from __future__ import annotations

import pytest
import torch

from comfyui_bsa.bsa_core.report import (DENSE_RGB, KEPT_RGB, PLOT_MARGINS, SKIPPED_RGB, ReportSpec, RunReport,
                                         kept_kv_plot, placeholder_image)

STEPS, LAYERS = 5, 3


def recorded_run(steps: int = STEPS, layers: int = LAYERS) -> RunReport:
    """Layer 0 dense at every step; layer l > 0 keeps kept_share(s, l) of the KV cubes at step s, the mean of
    two calls (cond and uncond)."""
    report = RunReport((ReportSpec(),))
    q = torch.zeros(1)
    for step in range(steps):
        report.begin_forward(step, 1.0 - step / steps)
        for layer in range(layers):
            for offset in (-0.01, 0.01):
                timer = report.start_timer(q)
                if layer == 0:
                    report.record_dense(layer, timer, "dense_blocks")
                else:
                    kept = kept_share(step, layer, steps, layers) + offset
                    report.record_sparse(layer, timer, torch.tensor(1.0), torch.tensor(kept, dtype=torch.float64))
    return report


def kept_share(step: int, layer: int, steps: int, layers: int) -> float:
    return 0.05 + 0.9 * (step * layers + layer) / (steps * layers)


def ramp(fraction: float) -> torch.Tensor:
    return torch.tensor([round(255 * (s + (k - s) * fraction)) for s, k in zip(SKIPPED_RGB, KEPT_RGB)])


@pytest.mark.parametrize("steps, layers", [(STEPS, LAYERS), (50, 40)], ids=["5x3-labelled", "50x40-small-cells"])
def test_each_cell_has_the_colour_of_its_kept_share(steps, layers):
    image = kept_kv_plot(recorded_run(steps, layers))
    assert image.dtype == torch.float32 and image.shape[0] == 1 and image.shape[-1] == 3
    pixels = (image[0] * 255).round().long()
    left, top, right, bottom = PLOT_MARGINS
    cell = (pixels.shape[1] - left - right) // steps
    assert pixels.shape[1] == left + right + cell * steps and pixels.shape[0] == top + bottom + cell * layers
    for step in range(steps):
        for layer in range(layers):
            corner = pixels[top + cell * layer + 2, left + cell * step + 2]  # clear of the centred value text
            if layer == 0:
                expected = torch.tensor([round(255 * c) for c in DENSE_RGB])
            else:
                expected = ramp(kept_share(step, layer, steps, layers))
            assert torch.equal(corner, expected), (step, layer, corner, expected)


def test_nothing_recorded_gives_the_placeholder():
    assert torch.equal(kept_kv_plot(None), placeholder_image())
    assert torch.equal(kept_kv_plot(RunReport((ReportSpec(),))), placeholder_image())
