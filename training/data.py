"""A synthetic video set made in code, defined in a latent space with an exact decoder of its own.

Each video is one object (a disc, square or triangle in one of a few colours) moving in a straight line,
bouncing off the frame's edges and, unless it is a disc, rotating, over a striped background that scrolls.
Its caption is the class "<colour> <shape>", given to the model as a fixed [tokens, 4096] embedding (the
width of umT5-XXL, so the model is an ordinary Wan 2.1 T2V).

No video VAE can be had here, so the latent space is made to be exact: pixels in [-1, 1] are
pixel-unshuffled 2x2 (3 -> 12 channels, half the resolution) and mapped to Wan's 16 latent channels by a
fixed matrix with orthonormal columns, times LATENT_SCALE; `decode` is the inverse on the encoder's range.
Latent frames are video frames (no temporal compression). These latents are what the Wan model itself
sees: in ComfyUI that is the LATENT after the Wan21 latent format's process_in.

Every video is a function of (seed, index) alone; BatchStream walks them in a seeded order per epoch and
its position is part of a training checkpoint.
"""
from __future__ import annotations

import math

import torch

SHAPES = ("disc", "square", "triangle")
SIDES = {"disc": 0, "square": 4, "triangle": 3}  # regular polygons; 0 = a circle
COLOURS = {  # RGB in [-1, 1]
    "red": (0.9, -0.8, -0.7),
    "green": (-0.7, 0.8, -0.6),
    "blue": (-0.6, -0.4, 0.9),
    "yellow": (0.9, 0.8, -0.8),
}
LATENT_CHANNELS = 16
UNSHUFFLE = 2  # pixels per latent along height and width
LATENT_SCALE = 2.0  # latents of the set have a standard deviation near 1 (see tests/test_training.py)
_BASIS_SEED = 20250901  # part of the latent format: never a setting


def num_classes() -> int:
    return len(SHAPES) * len(COLOURS)


def caption(class_id: int) -> str:
    shape, colour = divmod(int(class_id), len(COLOURS))
    return f"{list(COLOURS)[colour]} {SHAPES[shape]}"


def _basis() -> torch.Tensor:
    """[16, 12] with orthonormal columns: pixel-unshuffled channels -> latent channels."""
    generator = torch.Generator().manual_seed(_BASIS_SEED)
    q, _ = torch.linalg.qr(torch.randn(LATENT_CHANNELS, 3 * UNSHUFFLE ** 2, generator=generator, dtype=torch.float64))
    return q.float()


BASIS = _basis()


def encode(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] pixels -> [B, 16, T, H/2, W/2] latents."""
    b, c, t, h, w = video.shape
    x = video.reshape(b, c, t, h // UNSHUFFLE, UNSHUFFLE, w // UNSHUFFLE, UNSHUFFLE)
    x = x.permute(0, 1, 4, 6, 2, 3, 5).reshape(b, c * UNSHUFFLE ** 2, t, h // UNSHUFFLE, w // UNSHUFFLE)
    return LATENT_SCALE * torch.einsum("lc,bcthw->blthw", BASIS.to(video), x)


def decode(latent: torch.Tensor) -> torch.Tensor:
    """[B, 16, T, h, w] latents -> [B, 3, T, 2h, 2w] pixels: encode's inverse (a projection on its range)."""
    b, _, t, h, w = latent.shape
    x = torch.einsum("lc,blthw->bcthw", BASIS.to(latent), latent) / LATENT_SCALE
    x = x.reshape(b, 3, UNSHUFFLE, UNSHUFFLE, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, 3, t, h * UNSHUFFLE, w * UNSHUFFLE)


def _bounce(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """x folded into [low, high] as a ball bouncing between two walls."""
    span = high - low
    y = torch.remainder(x - low, 2 * span)
    return low + span - (y - span).abs()


class SyntheticVideos:
    """`num_videos` videos of `frames` frames at `latent_size`^2 latents (2x that in pixels); video i is
    drawn from a generator seeded with (seed, i). Caption embeddings are N(0, 1), fixed by `seed` too."""

    def __init__(self, frames: int, latent_size: int, num_videos: int, text_tokens: int, seed: int = 0):
        self.frames, self.latent_size, self.num_videos, self.seed = frames, latent_size, num_videos, seed
        generator = torch.Generator().manual_seed(seed)
        self.embeddings = torch.randn(num_classes(), text_tokens, 4096, generator=generator)

    def __len__(self) -> int:
        return self.num_videos

    def params(self, index: int) -> dict[str, torch.Tensor]:
        """The random choices of video `index`: class, size, start position, velocity, angle and spin,
        background stripes (frequency, direction, phase, drift, two colours)."""
        if not 0 <= index < self.num_videos:
            raise IndexError(f"video index {index} outside 0..{self.num_videos - 1}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)

        def uniform(low, high, n=()):
            return low + (high - low) * torch.rand(n, generator=g)

        class_id = int(torch.randint(num_classes(), (), generator=g))
        speed, heading = uniform(0.03, 0.08), uniform(0, 2 * math.pi)
        return {
            "class_id": torch.tensor(class_id),
            "radius": uniform(0.14, 0.24),
            "start": uniform(0.0, 1.0, (2,)),
            "velocity": speed * torch.stack([heading.cos(), heading.sin()]),
            "angle": uniform(0, 2 * math.pi),
            "spin": uniform(-0.25, 0.25),
            "stripe_freq": uniform(2.0, 6.0),
            "stripe_dir": uniform(0, math.pi),
            "stripe_phase": uniform(0, 2 * math.pi),
            "stripe_drift": uniform(-0.4, 0.4),
            "background": uniform(-0.9, -0.1, (2, 3)),
        }

    def _stacked_params(self, indices) -> dict[str, torch.Tensor]:
        drawn = [self.params(int(i)) for i in indices]
        return {name: torch.stack([d[name] for d in drawn]) for name in drawn[0]}

    def render(self, indices) -> torch.Tensor:
        """[B, 3, T, H, W] pixels in [-1, 1] of the videos `indices` (anti-aliased edges)."""
        return self._render(self._stacked_params(indices))

    def _render(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        size = self.latent_size * UNSHUFFLE
        device = p["radius"].device
        coords = (torch.arange(size, device=device) + 0.5) / size
        y, x = coords.view(1, 1, -1, 1), coords.view(1, 1, 1, -1)  # [1, 1, H, 1], [1, 1, 1, W]
        t = torch.arange(self.frames, dtype=torch.float32, device=device).view(1, -1, 1, 1)  # [1, T, 1, 1]

        def per_video(name):  # [B] -> [B, 1, 1, 1]
            return p[name].view(-1, 1, 1, 1)

        along = per_video("stripe_dir").cos() * x + per_video("stripe_dir").sin() * y
        stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * per_video("stripe_freq") * along
                                        + per_video("stripe_phase") + per_video("stripe_drift") * t)
        bg = p["background"].view(-1, 2, 3, 1, 1, 1)
        background = bg[:, 0] + (bg[:, 1] - bg[:, 0]) * stripes.unsqueeze(1)  # [B, 3, T, H, W]

        radius = per_video("radius")
        centre = [_bounce(p["start"][:, a].view(-1, 1, 1, 1) + p["velocity"][:, a].view(-1, 1, 1, 1) * t,
                          radius, 1 - radius) for a in (0, 1)]
        dx, dy = x - centre[0], y - centre[1]
        angle = per_video("angle") + per_video("spin") * t
        sides = torch.tensor([SIDES[SHAPES[int(c) // len(COLOURS)]] for c in p["class_id"]], device=device).view(-1, 1, 1, 1)
        distance = torch.sqrt(dx ** 2 + dy ** 2) - radius  # disc
        for n in (3, 4):  # a regular n-gon of inradius 0.75 r: the largest projection onto its edge normals
            normals = [angle + 2 * math.pi * k / n for k in range(n)]
            polygon = torch.stack([dx * a.cos() + dy * a.sin() for a in normals]).amax(0) - 0.75 * radius
            distance = torch.where(sides == n, polygon, distance)
        coverage = (0.5 - distance * size).clamp(0, 1).unsqueeze(1)  # one pixel of soft edge
        colour = torch.tensor([COLOURS[caption(c).split()[0]] for c in p["class_id"]], device=device).view(-1, 3, 1, 1, 1)
        return background * (1 - coverage) + colour * coverage

    def batch(self, indices, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents [B, 16, T, h, w], caption embeddings [B, tokens, 4096], class ids [B]), rendered on
        `device` (the choices are drawn on the CPU: the same videos on every device)."""
        p = {name: value.to(device) for name, value in self._stacked_params(indices).items()}
        return encode(self._render(p)), self.embeddings.to(device)[p["class_id"]], p["class_id"]


class BatchStream:
    """Endless batches of a SyntheticVideos in a new seeded order every epoch; `state_dict` is the position,
    so a resumed run draws the batches the uninterrupted one would have drawn."""

    def __init__(self, videos: SyntheticVideos, batch_size: int, seed: int = 0, device="cpu"):
        self.videos, self.batch_size, self.seed, self.device = videos, batch_size, seed, device
        self.epoch, self.position = 0, 0

    def _order(self) -> torch.Tensor:
        return torch.randperm(len(self.videos), generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def next_indices(self) -> list[int]:
        indices = []
        while len(indices) < self.batch_size:
            order = self._order()
            take = order[self.position:self.position + self.batch_size - len(indices)].tolist()
            indices += take
            self.position += len(take)
            if self.position == len(self.videos):
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def __next__(self):
        return self.videos.batch(self.next_indices(), self.device)

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
