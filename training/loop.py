"""The training loop: batch -> forward -> loss / accumulation -> clip -> step -> EMA -> log -> preview ->
checkpoint, in that order, in `train`. Everything the loop reads lives in state.pt, so a run stopped at any
checkpoint and resumed continues the uninterrupted run's loss curve exactly (bit for bit on the CPU).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import pathlib

import torch
from safetensors.torch import load, load_file
from tqdm import tqdm

from ..compression.sparsity24 import apply_masks_, load_masks, magnitude_masks
from .config import CONFIG_FILE, TrainConfig
from .data import BatchStream, SyntheticVideos, caption, decode
from .model import (export_comfyui, flow_matching_loss, initial_state_dict, latent_shape, sample_euler,
                    sampling_sigmas, shifted_sigma, wan_from_state_dict)
from .sparsity import SparsityRamp, attention_options

STATE_FILE = "state.pt"
EXPORT_FILE = "model_ema.safetensors"
LOG_FILE = "log.jsonl"


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` over config.lr: linear warm-up to 1 over warmup_steps, then a
    cosine down to min_lr / lr at max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    floor = config.min_lr / config.lr if config.lr else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Float32 exponential moving average of a model's parameters, with the usual warm-up of the decay
    (min(decay, (1 + step) / (10 + step))) so that the first steps' weights do not linger."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.weights = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for name, p in model.named_parameters():
            self.weights[name].lerp_(p.detach().float(), 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, w in state.items():
            self.weights[name].copy_(w)


def pick_device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; the CPU computes in float32 (exact and reproducible)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def draw_noise(generator: torch.Generator, batch: int, shape, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise [B, *shape], sigma [B]) drawn one sample at a time on the CPU: k micro-batches of b take the
    same draws as one batch of k*b, on any device."""
    draws = [(torch.randn(shape, generator=generator), torch.rand(1, generator=generator)) for _ in range(batch)]
    return torch.stack([noise for noise, _ in draws]), shifted_sigma(torch.cat([u for _, u in draws]), shift)


@torch.no_grad()
def write_preview(model: torch.nn.Module, videos: SyntheticVideos, config: TrainConfig, device, path) -> pathlib.Path:
    """Samples one video per class in config.preview_classes (fixed noise) and writes a PNG strip: one row
    per caption, the frames left to right, decoded with the set's exact decoder."""
    from PIL import Image

    classes = torch.tensor(config.preview_classes)
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(len(classes), *latent_shape(config.frames, config.latent_size), generator=generator)
    with autocast(device):
        latents = sample_euler(model, noise.to(device), videos.embeddings[classes].to(device),
                               sampling_sigmas(config.preview_steps, config.shift, device))
    frames = decode(latents.float().cpu()).clamp(-1, 1)  # [B, 3, T, H, W]
    b, _, t, h, w = frames.shape
    strip = frames.permute(0, 3, 2, 4, 1).reshape(b * h, t * w, 3)
    image = Image.fromarray(((strip + 1) * 127.5).round().to(torch.uint8).numpy())
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=_png_text({"captions": " | ".join(caption(c) for c in config.preview_classes)}))
    return path


def _png_text(fields: dict[str, str]):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    for key, value in fields.items():
        info.add_text(key, value)
    return info


def initial_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    """Step 0's weights: the file config.init_from (fine-tuning), else seeded random ones."""
    if config.init_from:
        return load_file(config.init_from)
    return initial_state_dict(config.dim, config.layers, config.ffn_dim, config.seed)


def prune_masks(config: TrainConfig, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The 2:4 masks the run keeps (none without prune / prune_masks): the file's, or magnitude masks of
    the initial weights (so the same on resume)."""
    if config.prune_masks is not None:
        return load_masks(config.prune_masks, model)
    prune = config.prune_config()
    return {} if prune is None else magnitude_masks(model, prune)


def _save_atomic(obj, path: pathlib.Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _log_step(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line torn by a crash mid-write
        return None


def _truncate_log(path: pathlib.Path, step: int) -> None:
    """Drops the log rows past `step` (all of them for a run that had no checkpoint yet) and any torn line: a run
    killed after its last checkpoint logged steps that the resumed run takes again, and the log holds each step
    once. Rewritten through a temporary file."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines()
                if (logged := _log_step(line)) is not None and logged <= step]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in rows))
        os.replace(tmp, path)


def load_teacher(config: TrainConfig, device) -> tuple[torch.nn.Module | None, str | None]:
    """(the frozen distillation teacher, the sha256 of its file), or (None, None) without distill_from."""
    if config.distill_from is None:
        return None, None
    path = pathlib.Path(config.distill_from)
    if not path.is_file():
        raise FileNotFoundError(f"distill_from {path}: no such file")
    data = path.read_bytes()  # read once: hashed and loaded
    teacher = wan_from_state_dict(load(data)).to(device).eval().requires_grad_(False)
    return teacher, hashlib.sha256(data).hexdigest()


def _start_run(config: TrainConfig, run_dir: pathlib.Path) -> None:
    """A new run writes config.json; a resumed one must have been started with the same config."""
    path = run_dir / CONFIG_FILE
    if path.exists():
        saved = TrainConfig.load(path)
        # a moved run folder (or one given by --run-dir) still resumes
        if dataclasses.replace(saved, run_dir=config.run_dir).to_json() != config.to_json():
            raise ValueError(f"{path} differs from the given config: a run folder holds one run "
                             "(use a new run_dir, or the config.json that is there)")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(path)


def train(config: TrainConfig, stop_at: int | None = None, progress: bool = True) -> list[dict]:
    """Trains (or resumes, when run_dir holds state.pt) up to config.max_steps, or pauses after step
    `stop_at` with a checkpoint. Returns one log row per step run here: step, loss, lr, grad_norm, the
    kept KV percentage on sparse steps and, when distilling, the flow-matching term alone (flow_loss)."""
    run_dir = pathlib.Path(config.run_dir)
    device = pick_device(config)
    teacher, teacher_hash = load_teacher(config, device)  # a missing file fails before the run folder is made
    _start_run(config, run_dir)
    last_step = config.max_steps if stop_at is None else min(stop_at, config.max_steps)

    model = wan_from_state_dict(initial_weights(config)).to(device)
    masks = prune_masks(config, model)
    apply_masks_(model, masks)
    ema = EMA(model, config.ema_decay)
    preview_model = copy.deepcopy(model).requires_grad_(False)  # holds the EMA weights while it samples
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    videos = SyntheticVideos(config.frames, config.latent_size, config.num_videos, config.text_tokens, config.seed)
    stream = BatchStream(videos, config.batch_size, config.seed, device)
    generator = torch.Generator().manual_seed(config.seed)  # noise and sigmas
    ramp = SparsityRamp(config.bsa_config(), config.bsa_start_step, config.bsa_ramp_steps, config.bsa_ramp_from_lambda)
    step = 0

    if (run_dir / STATE_FILE).exists():
        state = torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=False)
        if state.get("teacher") != teacher_hash:
            raise ValueError(f"distill_from {config.distill_from} is not the file this run started with (its "
                             "contents changed): resuming would train against another target")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        generator.set_state(state["rng"]["noise"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        step = state["step"]
    _truncate_log(run_dir / LOG_FILE, step)

    rows = []
    bar = tqdm(total=config.max_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    while step < last_step:
        bsa = ramp.at(step)
        loss_sum, flow_sum, kept_kv = 0.0, 0.0, []  # kept KV cubes, % per sparse forward
        for _ in range(config.grad_accum):
            # batch
            x0, context, _ = next(stream)
            noise, sigma = draw_noise(generator, x0.shape[0], x0.shape[1:], config.shift)
            noise, sigma = noise.to(device), sigma.to(device)
            # forward (the step's sparse setting on this forward's attention) and loss
            options, run = attention_options(bsa, model, x0.shape, context.shape[1], config.bsa_dense_blocks)
            parts = {}
            with autocast(device):
                loss = flow_matching_loss(model, x0, context, noise, sigma, options, teacher,
                                          config.distill_weight, parts) / config.grad_accum
            loss.backward()
            loss_sum += loss.detach()
            if teacher is not None:
                flow_sum += parts["flow"] / config.grad_accum
            if run is not None and run.stats.sparse_calls:
                kept_kv.append(run.stats.as_dict()["kept_kv_pct"])
        # clip (the norm is measured either way, for the log)
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if not (math.isfinite(float(loss_sum)) and math.isfinite(float(grad_norm))):
            bar.close()  # stop before the weights take it: the last checkpoint stays the last good state
            raise FloatingPointError(f"step {step + 1}: loss {float(loss_sum)}, gradient norm {float(grad_norm)}; "
                                     f"nothing of this step was applied or saved (lower lr, or set grad_clip)")
        # step
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        apply_masks_(model, masks)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        # EMA
        ema.update(model, step)
        step += 1
        # log
        row = {"step": step, "loss": float(loss_sum), "lr": lr, "grad_norm": float(grad_norm)}
        if teacher is not None:
            row["flow_loss"] = float(flow_sum)  # loss blends in the teacher's term: this one compares with runs
        if kept_kv:
            row["kept_kv_pct"] = sum(kept_kv) / len(kept_kv)
        rows.append(row)
        with open(run_dir / LOG_FILE, "a") as log:
            log.write(json.dumps(row) + "\n")
        bar.update(1)
        if step % config.log_every == 0 or step == last_step:
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}",
                            **({"kept_kv": f"{row['kept_kv_pct']:.0f}%"} if kept_kv else {}))
        # preview (EMA weights, dense)
        if step % config.preview_every == 0 or step == config.max_steps:
            preview_model.load_state_dict(ema.state_dict())
            write_preview(preview_model, videos, config, device, run_dir / "previews" / f"step_{step:07d}.png")
        # checkpoint
        if step % config.checkpoint_every == 0 or step == last_step:
            # the export first: state.pt is what a resume trusts, so it never runs ahead of the export
            export_comfyui(ema.state_dict(), run_dir / EXPORT_FILE, getattr(torch, config.export_dtype))
            _save_atomic({
                "step": step, "model": model.state_dict(), "ema": ema.state_dict(), "teacher": teacher_hash,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "data": stream.state_dict(),
                "rng": {"noise": generator.get_state(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            }, run_dir / STATE_FILE)
    bar.close()
    return rows
