"""RIFLEx (Zhao et al., ICML 2025): training-free temporal extrapolation for RoPE video transformers.

A generated video starts over once the "intrinsic" temporal RoPE component k completes a period:
the slowest component that training never saw wrap around. Lowering only that frequency so the
target length fits inside one period, theta_k' = safety * 2*pi / L, removes the repetition while
every other component keeps the value the model was trained with.

Importable without ComfyUI: `apply_riflex` duck-types ComfyUI's ModelPatcher and EmbedND.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

# The official code ends the target length at 90 % of the new period: a few videos still repeat their
# last frames when it ends exactly at one period.
SAFETY = 0.9

# Training length in temporal RoPE positions (latent frames / temporal patch), keyed by the name of
# ComfyUI's model config class; looked up along the MRO, so subclasses (I2V, VACE, camera...) inherit.
TRAIN_LENGTHS = {
    "WAN22_T2V": 31,       # Wan 2.2 TI2V 5B: 121 frames
    "WAN21_T2V": 21,       # Wan 2.1 and Wan 2.2 14B: 81 frames
    "HunyuanVideo15": 31,  # HunyuanVideo 1.5: 121 frames
    "HunyuanVideo": 33,    # HunyuanVideo: 129 frames
}

# Attribute of the diffusion model that holds its EmbedND-style embedder: ids [B, N, axes] with axis 0
# the frame index -> rotations [B, 1, N, sum(axes_dim) / 2, 2, 2], temporal components first.
EMBEDDER_ATTRS = ("rope_embedder", "pe_embedder")


@dataclass(frozen=True)
class RIFLExReport:
    """Temporal RoPE periods of one model at one length, and what RIFLEx does about them.

    theta, axis_dim: the temporal axis' RoPE base and width (axis_dim / 2 components).
    length:          target length L in temporal positions (latent frames for patch 1).
    train_length:    length the model was trained at, same unit.
    k:               1-based index of the intrinsic component (the paper's and official code's k).
    periods:         N_j = 2*pi / theta_j for every component j, in positions.
    new_frequency:   theta_k' when L > N_k, else None (RIFLEx leaves the model alone).
    """

    theta: float
    axis_dim: int
    length: int
    train_length: int
    k: int
    periods: tuple[float, ...]
    new_frequency: float | None

    @property
    def repetitions(self) -> tuple[float, ...]:
        """r_j = L / N_j: how many periods of each component the target length spans."""
        return tuple(self.length / n for n in self.periods)

    @property
    def period_k(self) -> float:
        return self.periods[self.k - 1]

    @property
    def applied(self) -> bool:
        return self.new_frequency is not None

    def __str__(self) -> str:
        periods = ", ".join(f"{n:.1f}" + ("*" if j == self.k else "") for j, n in enumerate(self.periods, 1))
        head = (f"theta={self.theta:g} axis_dim={self.axis_dim} L={self.length} (trained {self.train_length}): "
                f"k={self.k} N_k={self.period_k:.1f} r_k={self.length / self.period_k:.2f}")
        if self.applied:
            head += (f"; theta_k {2 * math.pi / self.period_k:.4f} -> {self.new_frequency:.4f}"
                     f" (period {2 * math.pi / self.new_frequency:.1f})")
        else:
            head += "; L <= N_k, RoPE unchanged"
        return f"{head}; periods N_j=[{periods}]"


def temporal_frequencies(axis_dim: int, theta: float) -> list[float]:
    """theta_j = theta^(-2j / axis_dim), j = 0 .. axis_dim/2 - 1, as ComfyUI's flux rope() builds them."""
    return [theta ** (-2.0 * j / axis_dim) for j in range(axis_dim // 2)]


def intrinsic_k(periods: list[float] | tuple[float, ...], train_length: int) -> int:
    """1-based index of the shortest period >= the training length: the first component that training
    never saw complete a cycle, hence the first to wrap (and repeat the video) beyond it. Gives the
    paper's k=4 for HunyuanVideo (33 positions) and k=2 for CogVideoX-5B (13 positions)."""
    longer = [j for j, n in enumerate(periods, 1) if n >= train_length]
    return min(longer, key=lambda j: periods[j - 1]) if longer else len(periods)


def riflex_frequency(length: int, safety: float = SAFETY) -> float:
    """theta_k' = safety * 2*pi / L: one period spans L / safety positions."""
    return safety * 2.0 * math.pi / length


def riflex_report(axis_dim: int, theta: float, length: int, train_length: int, k: int = 0,
                  safety: float = SAFETY) -> RIFLExReport:
    """Periods, repetitions and the RIFLEx frequency of a temporal RoPE axis; k = 0 picks `intrinsic_k`."""
    if not isinstance(axis_dim, int) or axis_dim < 2 or axis_dim % 2:
        raise ValueError(f"axis_dim must be an even integer >= 2, got {axis_dim!r}")
    if not theta > 1:
        raise ValueError(f"theta must be > 1, got {theta!r}")
    for name, value in (("length", length), ("train_length", train_length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(k, int) or not 0 <= k <= axis_dim // 2:
        raise ValueError(f"k must be 0 (auto) or a component index in [1, {axis_dim // 2}], got {k!r}")
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety!r}")
    periods = tuple(2.0 * math.pi / f for f in temporal_frequencies(axis_dim, theta))
    k = k or intrinsic_k(periods, train_length)
    new_frequency = riflex_frequency(length, safety) if length > periods[k - 1] else None
    return RIFLExReport(float(theta), axis_dim, length, train_length, k, periods, new_frequency)


class RIFLExRope(nn.Module):
    """EmbedND-style embedder whose temporal component `index` (0-based) rotates at `frequency`.

    Runs the wrapped embedder and overwrites that one component's rotation, so every other component
    stays bit-identical to the original.
    """

    def __init__(self, inner: nn.Module, index: int, frequency: float):
        super().__init__()
        self.inner = inner
        self.index = index
        self.frequency = frequency
        # model code and other nodes read these off the embedder
        self.dim = getattr(inner, "dim", None)
        self.theta = inner.theta
        self.axes_dim = inner.axes_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, N, axes] -> rotations [B, 1, N, D/2, 2, 2]."""
        out = self.inner(ids)
        angle = ids[..., 0].float() * self.frequency  # float32: MPS has no float64
        cos, sin = torch.cos(angle), torch.sin(angle)
        out[:, 0, :, self.index] = torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"index={self.index}, frequency={self.frequency:.6g}"


def latent_length(samples: torch.Tensor) -> int:
    """Frame count of a video latent [B, C, T, H, W]."""
    if samples.ndim != 5:
        raise ValueError(f"latent must be a video latent [B, C, T, H, W], got shape {tuple(samples.shape)}")
    return samples.shape[2]


def _train_length(model) -> int | None:
    for cls in type(model.model.model_config).__mro__:
        if cls.__name__ in TRAIN_LENGTHS:
            return TRAIN_LENGTHS[cls.__name__]
    return None


def apply_riflex(model, latent_frames: int, k: int = 0, train_latent_frames: int = 0, safety: float = SAFETY):
    """Clone of a ComfyUI video model whose intrinsic temporal RoPE frequency fits `latent_frames`. The
    arguments are the RIFLEx Extend node's inputs, and errors name them.

    model:               ModelPatcher of a Wan or HunyuanVideo model; never modified.
    latent_frames:       target length in latent frames.
    k:                   1-based temporal component to lower; 0 picks the intrinsic one.
    train_latent_frames: training length in latent frames; 0 takes the family's.
    Returns (model, report): the input model itself when L <= N_k (nothing to do).
    """
    diffusion_model = model.get_model_object("diffusion_model")
    attr = next((a for a in EMBEDDER_ATTRS if hasattr(diffusion_model, a)), None)
    family_length = _train_length(model)
    if attr is None or family_length is None:
        raise ValueError(f"model: RIFLEx supports Wan and HunyuanVideo models, got "
                         f"{type(model.model.model_config).__name__} ({type(diffusion_model).__name__})")
    embedder = model.get_model_object(f"diffusion_model.{attr}")
    base = embedder.inner if isinstance(embedder, RIFLExRope) else embedder
    if len(base.axes_dim) != 3:
        raise ValueError(f"model: {type(model.model.model_config).__name__} has no temporal RoPE axis "
                         f"(axes_dim={list(base.axes_dim)})")
    if isinstance(latent_frames, bool) or not isinstance(latent_frames, int) or latent_frames < 1:
        raise ValueError(f"latent_frames must be an integer >= 1, got {latent_frames!r}")
    if isinstance(train_latent_frames, bool) or not isinstance(train_latent_frames, int) or train_latent_frames < 0:
        raise ValueError(f"train_latent_frames must be 0 (the family's) or a positive integer, got "
                         f"{train_latent_frames!r}")
    patch_t = diffusion_model.patch_size[0]
    positions = (latent_frames + patch_t // 2) // patch_t
    train = (train_latent_frames + patch_t // 2) // patch_t if train_latent_frames else family_length
    report = riflex_report(int(base.axes_dim[0]), float(base.theta), positions, train, k, safety)
    if not report.applied:
        log.info("[RIFLEx] no change: %s", report)
        return model, report
    patched = model.clone()
    patched.add_object_patch(f"diffusion_model.{attr}", RIFLExRope(base, report.k - 1, report.new_frequency))
    log.info("[RIFLEx] lowered temporal RoPE component: %s", report)
    return patched, report
