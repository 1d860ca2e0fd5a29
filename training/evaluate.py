"""Measures of a trained model that every model and setting gets on the same footing: the flow-matching loss on
a fixed validation set, PSNR of decoded samples against a reference, and a side-by-side strip of frames.

The validation set is drawn from another SyntheticVideos seed than training's (video i of seed s is seeded
with s * 1_000_003 + i, so another seed gives other videos for any set size below 1_000_003), with the
training set's caption embeddings (those are what the model learnt), one fixed noise per (video, sigma) and
sigmas on a fixed grid: the midpoints of `num_sigmas` equal bins of u in (0, 1), shifted as in training, so
the mean over the grid estimates the loss training minimises. Same set, same model, same setting: same
number (bit for bit on the CPU).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..bsa_core.config import BSAConfig
from .config import TrainConfig
from .data import SyntheticVideos
from .loop import autocast
from .model import shifted_sigma, velocity
from .sparsity import attention_options


@dataclasses.dataclass(frozen=True)
class ValidationSet:
    """x0 [N, 16, T, h, w] latents, context [N, tokens, 4096], class_ids [N], sigmas [S] (the grid), noise
    [N, S, 16, T, h, w] (one draw per video and sigma). Every item is a (video, sigma) pair."""

    x0: torch.Tensor
    context: torch.Tensor
    class_ids: torch.Tensor
    sigmas: torch.Tensor
    noise: torch.Tensor

    def __len__(self) -> int:
        return self.x0.shape[0] * self.sigmas.shape[0]


def validation_set(config: TrainConfig, num_videos: int = 16, num_sigmas: int = 8, seed: int | None = None
                   ) -> ValidationSet:
    """`num_videos` videos of SyntheticVideos(seed) (default config.seed + 1, never the training seed) at the
    config's frames and latent size, captioned with the training set's embeddings (config.seed)."""
    seed = config.seed + 1 if seed is None else seed
    if seed == config.seed:
        raise ValueError(f"seed must differ from the training seed {config.seed}: those are the training videos")
    if num_videos < 1 or num_sigmas < 1:
        raise ValueError(f"num_videos and num_sigmas must be >= 1, got {num_videos} and {num_sigmas}")
    training = SyntheticVideos(config.frames, config.latent_size, 1, config.text_tokens, config.seed)
    videos = SyntheticVideos(config.frames, config.latent_size, num_videos, config.text_tokens, seed)
    x0, _, class_ids = videos.batch(range(num_videos))
    u = (torch.arange(num_sigmas, dtype=torch.float32) + 0.5) / num_sigmas
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_videos, num_sigmas, *x0.shape[1:], generator=generator)
    return ValidationSet(x0, training.embeddings[class_ids], class_ids, shifted_sigma(u, config.shift), noise)


@dataclasses.dataclass(frozen=True)
class ValidationResult:
    """loss: mean over all (video, sigma) pairs; per_sigma [S]: mean over the videos at each grid sigma;
    kept_kv_pct: mean kept KV cubes % over the sparse forwards (None: dense)."""

    loss: float
    per_sigma: torch.Tensor
    kept_kv_pct: float | None


@torch.no_grad()
def validation_loss(model, vset: ValidationSet, bsa: BSAConfig | None = None, dense_blocks: str = "",
                    batch_size: int = 16, device=None) -> ValidationResult:
    """The flow-matching loss of `model` on `vset`, with BSA at `bsa` on every forward (as training runs it:
    every sigma, every block but `dense_blocks`) or dense. Each pair's loss is its own mean squared error, so
    the result does not depend on batch_size; bf16 autocast on CUDA, as the training loop."""
    device = torch.device(device or next(model.parameters()).device)
    n, s = vset.x0.shape[0], vset.sigmas.shape[0]
    losses = torch.empty(n, s)
    kept_kv = []
    pairs = [(i, j) for i in range(n) for j in range(s)]
    for start in range(0, len(pairs), batch_size):
        videos, levels = (torch.tensor(t) for t in zip(*pairs[start:start + batch_size]))
        x0 = vset.x0[videos].to(device)
        noise = vset.noise[videos, levels].to(device)
        sigma = vset.sigmas[levels].to(device)
        context = vset.context[videos].to(device)
        options, run = attention_options(bsa, model, x0.shape, context.shape[1], dense_blocks)
        x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
        with autocast(device):
            prediction = velocity(model, x_t, sigma, context, options)
        losses[videos, levels] = (prediction.float() - (noise - x0)).square().flatten(1).mean(1).cpu()
        if run is not None and run.stats.sparse_calls:  # weighed by the batch's pairs: independent of batch_size
            kept_kv.append((run.stats.as_dict()["kept_kv_pct"], len(videos)))
    kept = sum(pct * pairs for pct, pairs in kept_kv) / sum(pairs for _, pairs in kept_kv) if kept_kv else None
    return ValidationResult(float(losses.mean()), losses.mean(0), kept)


def psnr(video: torch.Tensor, reference: torch.Tensor, peak: float = 2.0) -> float:
    """PSNR in dB of decoded pixels in [-1, 1] (peak 2) against `reference`, over the whole tensor; both are
    clipped to [-1, 1] first, as they are shown. inf when they are equal."""
    error = (video.float().clamp(-1, 1) - reference.float().clamp(-1, 1)).square().mean()
    return math.inf if error == 0 else float(10 * torch.log10(peak ** 2 / error))


def psnr_per_video(video: torch.Tensor, reference: torch.Tensor, peak: float = 2.0) -> torch.Tensor:
    """[B] PSNR in dB of each video's decoded pixels against its reference (clipped to [-1, 1] as `psnr`);
    inf where they are equal. Computed in float64."""
    error = (video.double().clamp(-1, 1) - reference.double().clamp(-1, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(peak ** 2 / error)


def strip_image(rows: list[tuple[str, torch.Tensor]]):
    """A PIL image of labelled rows of frames: each row (label, pixels [3, T, H, W] in [-1, 1]) shows its T
    frames left to right, its label in a column on the left (PIL's default font: ASCII labels)."""
    from PIL import Image, ImageDraw

    _, t, h, w = rows[0][1].shape
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = 8 + max(int(draw.textlength(label)) for label, _ in rows)
    image = Image.new("RGB", (label_width + t * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(image)
    for index, (label, frames) in enumerate(rows):
        if frames.shape != rows[0][1].shape:
            raise ValueError(f"row {label!r}: frames {tuple(frames.shape)}, first row {tuple(rows[0][1].shape)}")
        pixels = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, T, H, W]
        image.paste(Image.fromarray(pixels.permute(2, 1, 3, 0).reshape(h, t * w, 3).numpy()), (label_width, index * h))
        draw.text((4, index * h + h // 2 - 6), label, fill="black")
    return image
