"""The number of queries a cube keeps at a keep ratio: a rule the kernels and bsa_core share, in a module that
imports nothing else of the pack and no Triton (bsa_core imports it on machines without Triton too).
"""
import math

import torch


def keep_counts(n_valid: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """ceil(r * n) per cube, at least 1; r*n is rounded first so 0.3 * 10 keeps 3, not 4."""
    raw = torch.round(n_valid.double() * keep_ratio * 1e6) / 1e6
    return torch.ceil(raw).clamp(min=1).long()


def kept_width(grid, cube_size, keep_ratio: float) -> int:
    """The widest kept-query list of a layout, keep_counts' rule as a Python int for its largest cube (the
    first one): output shapes need it where tensors are only faked (torch.compile) or a read-back would sync."""
    largest = math.prod(min(c, g) for c, g in zip(cube_size, grid))
    return max(1, math.ceil(round(largest * keep_ratio * 1e6) / 1e6))
