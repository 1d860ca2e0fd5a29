"""One training run's settings: a dataclass written to (and read back from) config.json in the run folder."""
from __future__ import annotations

import dataclasses
import json
import pathlib

from ..bsa_core.config import BSAConfig
from ..bsa_core.patch import parse_block_ranges
from ..compression.sparsity24 import Sparsity24Config
from .data import num_classes

CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """run_dir holds config.json, state.pt (resume), model_ema.safetensors (ComfyUI), log.jsonl, previews/.

    Model: ComfyUI's Wan 2.1 T2V at width `dim` (heads = dim / 128), `layers` blocks, seeded random weights
    or those of the file `init_from` (its architecture then, not dim / layers / ffn_dim).
    Data: SyntheticVideos of `frames` latent frames at `latent_size`^2 latents, `text_tokens` per caption.
    Flow matching: sigma = shift * u / (1 + (shift - 1) * u), u ~ U(0, 1) (ComfyUI's ModelSamplingSD3 shift).
    Schedule: linear warm-up over `warmup_steps`, cosine from lr to min_lr at max_steps.
    grad_clip: max global gradient norm (0 = off). EMA decay: min(ema_decay, (1 + step) / (10 + step)).
    bsa: BSAConfig fields of the target sparse setting (None = dense training); the ramp is dense up to
    bsa_start_step, then interpolates over bsa_ramp_steps (keep_ratio and kv_threshold from 1, stat_lambda
    from bsa_ramp_from_lambda) to the target. bsa_dense_blocks: blocks that stay dense ('0,1').
    distill_from / distill_weight: the loss blends in the squared error to a frozen teacher's velocity (dense
    attention), so a sparse student learns what its sparsity changes rather than the flow-matching target's
    noise again; the file's hash is kept in state.pt and a resume against another file is refused.
    Every `*_every` counts optimizer steps; previews sample the EMA weights dense with `preview_steps`
    Euler steps, one row per caption in preview_classes.
    """

    run_dir: str
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when there is one (bf16 autocast), else the CPU (float32)
    # model
    dim: int = 256
    layers: int = 2
    ffn_dim: int = 512
    init_from: str | None = None  # a Wan 2.1 safetensors (e.g. a dense run's model_ema) to fine-tune instead
    # data
    frames: int = 4
    latent_size: int = 8
    num_videos: int = 4096
    text_tokens: int = 8
    # optimisation
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    shift: float = 3.0
    # sparse attention
    bsa: dict | None = None
    bsa_start_step: int = 0
    bsa_ramp_steps: int = 0
    bsa_ramp_from_lambda: float = -3.0
    bsa_dense_blocks: str = ""
    # distillation: the loss weighs in the squared error to a frozen teacher's velocity (dense attention)
    distill_from: str | None = None  # the teacher, a Wan 2.1 safetensors (e.g. the dense run's model_ema)
    distill_weight: float = 0.0  # w in [0, 1]: loss = (1 - w) flow matching + w squared error to the teacher
    # 2:4 recovery fine-tune: Sparsity24Config fields (method 'magnitude'); masks fixed from the initial weights
    prune: dict | None = None
    # or masks from a file (compression.sparsity24.save_masks: layer name -> bool [out, in]), e.g. Wanda's
    prune_masks: str | None = None
    # output
    log_every: int = 10
    preview_every: int = 500
    preview_steps: int = 20
    preview_classes: tuple[int, ...] = (0, 5, 10)
    checkpoint_every: int = 500
    export_dtype: str = "float16"

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "preview_classes", tuple(self.preview_classes))
        if self.dim % 128 or self.dim < 128:
            raise ValueError(f"dim must be a multiple of 128 (ComfyUI derives heads = dim / 128), got {self.dim}")
        for name, low in (("layers", 1), ("frames", 1), ("latent_size", 1), ("num_videos", 1), ("text_tokens", 1),
                          ("batch_size", 1), ("grad_accum", 1), ("max_steps", 1), ("log_every", 1),
                          ("preview_every", 1), ("preview_steps", 1), ("checkpoint_every", 1), ("warmup_steps", 0),
                          ("bsa_start_step", 0), ("bsa_ramp_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {self.ema_decay!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift!r}")
        if not abs(self.bsa_ramp_from_lambda) <= 10:  # the ramp's first stat_lambda (BSAConfig's range)
            raise ValueError(f"bsa_ramp_from_lambda must lie in [-10, 10], got {self.bsa_ramp_from_lambda!r}")
        if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes()
               for c in self.preview_classes):
            raise ValueError(f"preview_classes must be class numbers in 0..{num_classes() - 1}, "
                             f"got {self.preview_classes!r}")
        try:
            parse_block_ranges(self.bsa_dense_blocks)
        except ValueError as error:
            raise ValueError(f"bsa_dense_blocks: {error}") from None
        if self.latent_size % 2:
            raise ValueError(f"latent_size must be even (Wan's 2x2 patches), got {self.latent_size}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must lie in [0, lr ({self.lr})]")
        if self.distill_from == "":
            object.__setattr__(self, "distill_from", None)  # as init_from: empty is none
        if (isinstance(self.distill_weight, bool) or not isinstance(self.distill_weight, (int, float))
                or not 0.0 <= self.distill_weight <= 1.0):
            raise ValueError(f"distill_weight must be a number in [0, 1], got {self.distill_weight!r}")
        if (self.distill_from is None) != (self.distill_weight == 0.0):
            raise ValueError(f"distill_from and distill_weight go together: a teacher file and a weight > 0, or "
                             f"neither (got {self.distill_from!r} and {self.distill_weight!r})")
        if self.export_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"export_dtype must be float16, bfloat16 or float32, got {self.export_dtype!r}")
        self.bsa_config()  # a bad BSA setting fails here, before any step
        self.prune_config()
        if self.prune is not None and self.prune_masks is not None:
            raise ValueError("prune (magnitude masks from the initial weights) and prune_masks (masks from a file) "
                             "exclude each other: set one")

    def bsa_config(self) -> BSAConfig | None:
        """The target sparse setting as a BSAConfig (validated), or None for dense training."""
        return None if self.bsa is None else BSAConfig(**self.bsa)

    def prune_config(self) -> Sparsity24Config | None:
        """The 2:4 setting of a recovery fine-tune (validated; magnitude masks only), or None."""
        if self.prune is None:
            return None
        config = Sparsity24Config(**self.prune)
        if config.method != "magnitude":
            raise ValueError(f"prune.method must be 'magnitude' (the loop has no calibration run; other masks: "
                             f"prune_masks), got {config.method!r}")
        return config

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def save(self, path) -> None:
        pathlib.Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> TrainConfig:
        values = json.loads(pathlib.Path(path).read_text())
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        return cls(**values)
