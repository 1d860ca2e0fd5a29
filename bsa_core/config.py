"""Settings of one BSA call, validated once so that a bad node value fails before sampling, and the
recommended defaults that BSAConfig, apply_bsa and the node all read."""
from __future__ import annotations

import math
from dataclasses import dataclass

THRESHOLD_MODES = ("cumulative", "statistical")
CUBE_SIZES = ("4x4x4", "2x8x8", "4x4x8", "4x8x8")  # the node's options (64-256 tokens a cube)
# A cube holds at most this many tokens: kernels and reference pad every cube to its volume, so one huge cube
# costs like dense attention over its padding (64x64x64 took 52 s for 1,280 tokens). Small cubes are allowed
# (the tests use them) but the selection tables grow as (tokens / volume)^2 per head: the node offers 64-256.
MAX_CUBE_VOLUME = 1024


@dataclass(frozen=True)
class BSAConfig:
    """What BSA keeps. The defaults are the recommended settings (RECOMMENDED, the node's defaults).

    cube_size:      (ct, ch, cw) tokens per cube along time, height, width; at most MAX_CUBE_VOLUME tokens.
    keep_ratio:     r in (0, 1]: share of each cube's queries that are computed.
    kv_threshold:   p in (0, 1]: cumulative block mass a query cube keeps (cumulative mode).
    threshold_mode: "cumulative" (mass share p) or "statistical" (z >= mean + stat_lambda * std).
    stat_lambda:    lambda of the statistical mode, in standard deviations of the row's block logits.
    min_blocks:     every query cube keeps at least this many KV cubes (its own cube always).
    pooled_remainder: fold every KV cube a query cube did not select into its softmax as one pooled key
                    (mean key, mean value, weight = the cube's token count), so the dropped mass still
                    counts in the denominator and the output instead of vanishing.
    """

    # The defaults, from the H100 Pareto sweep on video-like attention (bench/NOTES_pareto.md): every query
    # kept (dropping half of them alone cost rel L2 >= 0.28), the KV cubes scoring >= mean + 1 std of their
    # row, plus the pooled remainder: rel L2 0.075 (480p) / 0.078 (720p) vs dense at 14-16 % of the KV cubes,
    # where the same cut without the remainder gave 0.17-0.20. The statistical cut adapts to each row, so a
    # head with flat attention stays sparse too (a mass threshold would keep most of its cubes).
    cube_size: tuple[int, int, int] = (4, 4, 4)
    keep_ratio: float = 1.0
    kv_threshold: float = 0.7
    threshold_mode: str = "statistical"
    stat_lambda: float = 1.0
    min_blocks: int = 1
    pooled_remainder: bool = True

    def __post_init__(self):
        cube = tuple(int(c) for c in self.cube_size) if _is_triple(self.cube_size) else None
        if cube is None or any(c < 1 for c in cube) or math.prod(cube) > MAX_CUBE_VOLUME:
            raise ValueError(f"cube_size must be three integers >= 1 with at most {MAX_CUBE_VOLUME} tokens in "
                             f"all, got {self.cube_size!r}")
        object.__setattr__(self, "cube_size", cube)
        _check_unit("keep_ratio", self.keep_ratio)
        _check_unit("kv_threshold", self.kv_threshold)
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {self.threshold_mode!r}")
        if not isinstance(self.stat_lambda, (int, float)) or not math.isfinite(self.stat_lambda) or abs(self.stat_lambda) > 10:
            raise ValueError(f"stat_lambda must be a finite number in [-10, 10], got {self.stat_lambda!r}")
        if not isinstance(self.min_blocks, int) or isinstance(self.min_blocks, bool) or self.min_blocks < 1:
            raise ValueError(f"min_blocks must be an integer >= 1, got {self.min_blocks!r}")
        if not isinstance(self.pooled_remainder, bool):
            raise ValueError(f"pooled_remainder must be True or False, got {self.pooled_remainder!r}")

    @property
    def cube_volume(self) -> int:
        return self.cube_size[0] * self.cube_size[1] * self.cube_size[2]

    @property
    def is_dense(self) -> bool:
        """r = 1 and p = 1 in cumulative mode select everything: exactly dense attention."""
        return self.keep_ratio >= 1.0 and self.kv_threshold >= 1.0 and self.threshold_mode == "cumulative"


def _is_triple(value) -> bool:
    try:
        return len(value) == 3 and all(float(c).is_integer() for c in value)
    except TypeError:
        return False


def _check_unit(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def parse_cube_size(text: str) -> tuple[int, int, int]:
    """'4x4x4' -> (4, 4, 4). The node accepts only CUBE_SIZES (see node_cube_size); this parses any."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        cube = tuple(int(p) for p in parts)
    except ValueError:
        cube = ()
    if len(cube) != 3:
        raise ValueError(f"cube_size must look like '4x4x4' (time x height x width, integers), "
                         f"got {text!r}")
    return cube


def node_cube_size(text: str) -> tuple[int, int, int]:
    """The node's cube_size: one of its options, also when it comes from an API prompt."""
    if text not in CUBE_SIZES:
        raise ValueError(f"cube_size must be one of {', '.join(CUBE_SIZES)}, got {text!r}")
    return parse_cube_size(text)


@dataclass(frozen=True)
class PatchDefaults:
    """Where and on what BSA runs (apply_bsa and the node): the sampling window as fractions of the schedule,
    blocks kept dense, the shortest sequence BSA takes. On short videos a call's launch work outweighs what sparsity
    saves where the rest of a block is quick. A sampling step of Wan 1.3B on an H200 (bench/NOTES_speed.md, session
    23), small calls replayed from CUDA graphs (bsa_core/call_graphs.py): at cfg 1 x0.99 at 7,800 tokens, x1.14 at
    9,360, x1.19 at 10,920; at cfg 5 (batch 2) x1.04 at 7,800, x1.12 at 9,360, x1.16 already at 6,240. Wan 14B
    never lost (x1.00 at 3,120, session 22). Above 8,192 every size measured gains at both; below it one loses."""

    start_percent: float = 0.2  # the first steps decide the layout: keep them dense
    end_percent: float = 1.0
    dense_blocks: str = ""
    min_tokens: int = 8192


RECOMMENDED = BSAConfig()
RECOMMENDED_PATCH = PatchDefaults()
