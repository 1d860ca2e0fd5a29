"""What 2:4 pruning, activation sparsity and TDQ share: which linear layers of a video model they touch, how a
layer's forward is patched on a ModelPatcher clone (so that the methods compose, in any order), and the
calibration run that shows the layers' inputs while ComfyUI's sampler samples a few seeds.

A layer is patched through an object patch of its `forward` ("diffusion_model.<name>.forward"): the module,
its weights and any LoRA weight patches stay as they are, and the patch lives on the clone only.
Importable without ComfyUI: comfy.* is imported inside functions only.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import weakref
from typing import Callable

import torch

log = logging.getLogger(__name__)
LOG_PREFIX = "[BSA compression]"

# Wan 2.1 / 2.2 blocks: attention projections and the two FFN linears (ffn.1 is the GELU)
WAN_LINEARS = re.compile(r"(^|\.)blocks\.\d+\.((self_attn|cross_attn)\.(q|k|v|o)|ffn\.(0|2))$")


def target_linears(diffusion_model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """name -> module of the linears both methods may touch, in model order (names relative to the
    diffusion model, e.g. 'blocks.0.ffn.0'). Empty for a model that is not Wan-shaped."""
    return {name: m for name, m in diffusion_model.named_modules()
            if isinstance(m, torch.nn.Linear) and WAN_LINEARS.search(name)}


FP8_STORED = "weights stored in 8 bits (an fp8 / fp8_scaled checkpoint): left as loaded"


def stored_in_fp8(module: torch.nn.Linear) -> bool:
    """Whether the layer's weight is stored in 8 bits (ComfyUI's fp8 and fp8_scaled checkpoints, whose layers
    multiply it by their `scale_weight` when they cast it): pruning and TDQ read the raw weight, so they leave
    such layers as loaded."""
    return module.weight.element_size() == 1 or getattr(module, "scale_weight", None) is not None


def _patch_key(name: str) -> str:
    return f"diffusion_model.{name}.forward"


class TensorIdentity:
    """Which tensors a cached value was made from: the same objects (held weakly: ComfyUI swaps a weight for a
    new tensor when a LoRA patch changes, and a freed tensor's id and address are soon reused) at the same
    addresses, with any other key parts (device, dtype)."""

    def __init__(self, tensors, *extra):
        self.refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self.addresses = tuple(None if t is None else t.data_ptr() for t in tensors)
        self.extra = extra

    def matches(self, tensors, *extra) -> bool:
        return extra == self.extra and len(tensors) == len(self.refs) and all(
            (r is None and t is None) or (r is not None and r() is t and t.data_ptr() == a)
            for t, r, a in zip(tensors, self.refs, self.addresses))


@dataclasses.dataclass(frozen=True, eq=False)
class LinearPatch:
    """The forward of one patched linear: the input goes through `sparsify` (activation sparsity) when set,
    then through the layer in FP8 (`fp8`, TDQ; of the 2:4-masked weight when `weight24` is set too), or with
    `weight24` (a 2:4-pruned weight), else through the layer's own forward (ComfyUI's weight casting included)."""

    module: torch.nn.Linear
    weight24: object | None = None  # compression.sparsity24.Sparse24Weight
    sparsify: Callable[[torch.Tensor], torch.Tensor] | None = None
    fp8: object | None = None  # compression.tdq.FP8Weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparsify is not None:
            x = self.sparsify(x)
        if self.fp8 is not None:
            return self.fp8.linear(self.module, x, None if self.weight24 is None else self.weight24.mask)
        if self.weight24 is not None:
            return self.weight24.linear(self.module, x)
        return type(self.module).forward(self.module, x)


def patch_linears(model, names, **fields) -> None:
    """Sets LinearPatch `fields` (weight24= / sparsify= / fp8=) of the layers `names` on the ModelPatcher `model`
    (a clone), keeping the other methods' fields where the layer was patched before."""
    diffusion_model = model.get_model_object("diffusion_model")
    for name in names:
        current = model.object_patches.get(_patch_key(name))
        if not isinstance(current, LinearPatch):
            current = LinearPatch(diffusion_model.get_submodule(name))
        model.add_object_patch(_patch_key(name), dataclasses.replace(current, **fields))


def current_patch(model, name: str) -> LinearPatch | None:
    patch = model.object_patches.get(_patch_key(name))
    return patch if isinstance(patch, LinearPatch) else None


def linear_patches(model) -> dict[str, LinearPatch]:
    """name -> LinearPatch of every layer patched on the ModelPatcher `model`."""
    return {key.removeprefix("diffusion_model.").removesuffix(".forward"): patch
            for key, patch in model.object_patches.items() if isinstance(patch, LinearPatch)}


@dataclasses.dataclass(frozen=True)
class CalibrationSampling:
    """How the calibration run samples: `samples` seeds from `seed` on, each a full run of the sampler with
    these settings on `latent` (its first batch entry, or all of it with `whole_batch`), `positive` /
    `negative` conditioning."""

    positive: list
    negative: list
    latent: dict
    samples: int = 2
    steps: int = 10
    cfg: float = 5.0
    sampler_name: str = "euler"
    scheduler: str = "simple"
    seed: int = 0
    whole_batch: bool = False

    def __post_init__(self):
        for name in ("samples", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"calibration {name} must be an integer >= 1, got {getattr(self, name)!r}")


Observer = Callable[[str, torch.Tensor, float], None]  # (layer name, input [..., in_features], sigma)


def observe_linear_inputs(model, names, observe: Observer, sampling: CalibrationSampling,
                          on_call: Callable[[float], None] | None = None,
                          progress: Callable[[int, int], None] | None = None) -> None:
    """Samples with ComfyUI's sampler on a throw-away clone of `model` and calls observe(name, input, sigma)
    on every forward of the layers `names` (forward pre-hooks, removed afterwards); sigma is the largest
    sigma of the model call (cond and uncond share it), and on_call(sigma) runs at the start of each model
    call, before its layers. progress(done, total) follows the sampling steps; without it a ComfyUI
    progress bar counts them."""
    import comfy.patcher_extension
    import comfy.sample
    import comfy.utils

    current = {"sigma": None}

    def remember_sigma(executor, x, t, *args, **kwargs):
        current["sigma"] = float(t.max())
        if on_call is not None:
            on_call(current["sigma"])
        return executor(x, t, *args, **kwargs)

    total = sampling.samples * sampling.steps
    if progress is None:
        bar = comfy.utils.ProgressBar(total)
        progress = lambda done, total: bar.update_absolute(done, total)  # noqa: E731
    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bsa_calibration", remember_sigma)
    diffusion_model = clone.get_model_object("diffusion_model")
    handles = [diffusion_model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: observe(name, args[0].detach(), current["sigma"])) for name in names]
    samples = sampling.latent["samples"] if sampling.whole_batch else sampling.latent["samples"][:1]
    latent = comfy.sample.fix_empty_latent_channels(clone, samples)
    try:
        for i in range(sampling.samples):
            noise = comfy.sample.prepare_noise(latent, sampling.seed + i)
            comfy.sample.sample(clone, noise, sampling.steps, sampling.cfg, sampling.sampler_name, sampling.scheduler,
                                sampling.positive, sampling.negative, latent, seed=sampling.seed + i,
                                callback=lambda step, *_, i=i: progress(i * sampling.steps + step + 1, total),
                                disable_pbar=True)
    finally:
        for handle in handles:
            handle.remove()


class RowSample:
    """A bounded uniform sample of the rows seen across calls (bottom-k of seeded random keys), on the CPU in
    float32. At most `per_call` random rows of each call are considered, which bounds the copy per call; a
    call of more than 4 x per_call rows gives them drawn with replacement (a permutation of all its rows
    would cost O(rows) on the CPU: 1 s per call for the 32M input entries of one TEAL layer at Wan 480p)."""

    def __init__(self, capacity: int, per_call: int, seed: int = 0):
        self.capacity, self.per_call = capacity, per_call
        self._rows = torch.empty(0)
        self._keys = torch.empty(0)
        self._generator = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        """rows [N, D]"""
        n = rows.shape[0]
        pick = (torch.randperm(n, generator=self._generator)[:self.per_call] if n <= 4 * self.per_call
                else torch.randint(n, (self.per_call,), generator=self._generator))
        new = rows[pick.to(rows.device)].float().cpu()
        keys = torch.cat([self._keys, torch.rand(len(new), generator=self._generator)])
        rows = torch.cat([self._rows.reshape(-1, new.shape[1]), new])
        if len(keys) > self.capacity:
            keep = keys.topk(self.capacity, largest=False).indices
            keys, rows = keys[keep], rows[keep]
        self._keys, self._rows = keys, rows

    def tensor(self) -> torch.Tensor:
        return self._rows
