"""Video-like Q/K/V for fidelity measurements (no real Wan weights are available to tests or benches).

Two properties reported for real video DiTs are built in and then measured, not assumed:
  (a) concentration: on average about 4 % of the keys carry 80 % of a query's attention mass;
  (b) spatio-temporal energy decay: mass falls with 3D distance; some heads are mostly spatial (same
      frame), some mostly temporal (same position across frames), as Radial Attention / Sparse VideoGen
      measured.
Construction per head: Wan's 3D RoPE (axes split d-4(d//6), 2(d//6), 2(d//6), theta 1e4) applied to a
per-head positional code whose energy per rotary pair sets the head's shape (sharp in time = spatial
head, sharp in space = temporal head), plus content similarity from smooth random 3D fields; a per-head
temperature is then calibrated by bisection so the head reaches its concentration target.
Uniform random Q/K is not video attention: use it only for speed.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

HEAD_KINDS = ("spatial", "temporal", "mixed")


def wan_rope_axes(head_dim: int) -> list[int]:
    return [head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)]


def _positions(grid, device):
    T, H, W = grid
    t, h, w = torch.meshgrid(torch.arange(T, device=device), torch.arange(H, device=device),
                             torch.arange(W, device=device), indexing="ij")
    return [t.reshape(-1).float(), h.reshape(-1).float(), w.reshape(-1).float()]


def _pair_energy(kind: str, axes: list[int], gen: torch.Generator, device) -> list[torch.Tensor]:
    """Energy of each rotary pair per axis. A pair of frequency w contributes cos(w * delta): energy on
    high frequencies makes the head sharp along that axis, on low frequencies broad."""
    sharp_axes = {"spatial": (0,), "temporal": (1, 2), "mixed": ()}[kind]
    energies = []
    for axis, dim in enumerate(axes):
        freq = 1.0 / (10000.0 ** (torch.arange(dim // 2, device=device).float() * 2 / dim))
        rand = 0.5 + torch.rand(dim // 2, generator=gen, device=device)
        if axis in sharp_axes:
            band = 3.0 * (freq > 0.5).float()  # decorrelates after one token along this axis; dominant
        else:
            band = ((freq > 0.08) & (freq <= 0.5)).float()  # decays over a few to ~10 tokens
        energies.append(band * rand)
    return energies


def _rope_code(grid, head_dim, kind, gen, device) -> torch.Tensor:
    """[L, D] positional code c with c_i . c_j = sum_p a_p^2 cos(w_p * delta_p)."""
    axes = wan_rope_axes(head_dim)
    pos = _positions(grid, device)
    parts = []
    for dim, p, energy in zip(axes, pos, _pair_energy(kind, axes, gen, device)):
        freq = 1.0 / (10000.0 ** (torch.arange(dim // 2, device=device).float() * 2 / dim))
        phase0 = torch.rand(dim // 2, generator=gen, device=device) * 2 * math.pi
        angle = p[:, None] * freq[None] + phase0
        amp = energy.sqrt()
        parts.append(torch.stack([amp * torch.cos(angle), amp * torch.sin(angle)], -1).reshape(len(p), dim))
    code = torch.cat(parts, -1)
    return code / code.norm(dim=-1).mean()


def _smooth_field(grid, channels, gen, device, coarse=4) -> torch.Tensor:
    """[L, C] random field, smooth over a few tokens in every axis (content that moves slowly)."""
    T, H, W = grid
    small = torch.randn(1, channels, max(1, T // coarse + 1), max(1, H // coarse + 1), max(1, W // coarse + 1),
                        generator=gen, device=device)
    field = F.interpolate(small, size=(T, H, W), mode="trilinear", align_corners=False)[0]
    field = field.reshape(channels, -1).t()
    return field / field.norm(dim=-1, keepdim=True).clamp(min=1e-6)


def _sample_rows(L, n, gen, device):
    return torch.randperm(L, generator=gen, device=device)[: min(n, L)]


def keys_for_mass(probs: torch.Tensor, mass: float = 0.8) -> torch.Tensor:
    """Fraction of keys needed to cover `mass` of each row's attention."""
    sorted_p = probs.sort(-1, descending=True).values
    return ((sorted_p.cumsum(-1) < mass).sum(-1) + 1).float() / probs.shape[-1]


def _calibrate(logits_raw: torch.Tensor, target: float, mass: float = 0.8) -> float:
    """Temperature s such that softmax(s * logits) needs `target` of the keys for `mass` (bisection in log s)."""
    lo, hi = math.log(0.05), math.log(5000.0)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        frac = keys_for_mass(torch.softmax(logits_raw * math.exp(mid), -1), mass).mean().item()
        lo, hi = (mid, hi) if frac > target else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def video_qkv(grid, heads: int, head_dim: int = 128, batch: int = 1, target_keys_for_80: float = 0.04,
              seed: int = 0, device="cpu", dtype=torch.bfloat16, sample_queries: int = 256):
    """q, k, v [B, H, L, D] (raster order over grid) that behave like video self-attention."""
    gen = torch.Generator(device=device).manual_seed(seed)
    L = math.prod(grid)
    D = head_dim
    scale = 1.0 / math.sqrt(D)
    qs, ks, vs = [], [], []
    for b in range(batch):
        content = _smooth_field(grid, D, gen, device)
        values = _smooth_field(grid, D, gen, device, coarse=2)
        qh, kh, vh = [], [], []
        for h in range(heads):
            kind = HEAD_KINDS[h % len(HEAD_KINDS)]
            pos = _rope_code(grid, D, kind, gen, device)
            rot = torch.linalg.qr(torch.randn(D, D, generator=gen, device=device))[0]
            mix = 0.35 + 0.3 * torch.rand((), generator=gen, device=device)
            noise_q = 0.15 * torch.randn(L, D, generator=gen, device=device) / math.sqrt(D)
            base = (1 - mix) * pos + mix * content @ rot
            q = base + noise_q
            k = base.clone()
            # per-head concentration around the mean target (heads differ in the field too)
            target = target_keys_for_80 * float(torch.exp(0.5 * torch.randn((), generator=gen, device=device)))
            rows = _sample_rows(L, sample_queries, gen, device)
            temperature = _calibrate((q[rows] @ k.t()) * scale, min(max(target, 2.0 / L), 0.5))
            qh.append(q * temperature)
            kh.append(k)
            vh.append(values @ rot + 0.1 * torch.randn(L, D, generator=gen, device=device))
        qs.append(torch.stack(qh))
        ks.append(torch.stack(kh))
        vs.append(torch.stack(vh))
    return tuple(torch.stack(x).to(dtype) for x in (qs, ks, vs))


@torch.no_grad()
def attention_statistics(q, k, grid, cube=(4, 4, 4), sample_queries=256, seed=0) -> dict:
    """What the data achieved: keys for 80 % mass, mass in the own cube and its 26 neighbours, and
    the mass share in the same frame vs the same spatial position across frames, per head kind."""
    B, H, L, D = q.shape
    T, Hh, W = grid
    gen = torch.Generator(device=q.device).manual_seed(seed)
    rows = _sample_rows(L, sample_queries, gen, q.device)
    t, h, w = (x.long() for x in _positions(grid, q.device))
    ct, ch, cw = cube
    out = {"keys_for_80": [], "own_cube": [], "cube_and_neighbours": [], "same_frame": [], "same_position": []}
    for head in range(H):
        probs = torch.softmax((q[0, head, rows].float() @ k[0, head].float().t()) / math.sqrt(D), -1)
        dt = (t[None] // ct - t[rows, None] // ct).abs()
        dh = (h[None] // ch - h[rows, None] // ch).abs()
        dw = (w[None] // cw - w[rows, None] // cw).abs()
        out["keys_for_80"].append(keys_for_mass(probs).mean().item())
        out["own_cube"].append((probs * ((dt == 0) & (dh == 0) & (dw == 0))).sum(-1).mean().item())
        out["cube_and_neighbours"].append((probs * ((dt <= 1) & (dh <= 1) & (dw <= 1))).sum(-1).mean().item())
        out["same_frame"].append((probs * (t[None] == t[rows, None])).sum(-1).mean().item())
        out["same_position"].append((probs * ((h[None] == h[rows, None]) & (w[None] == w[rows, None]))).sum(-1).mean().item())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default="21x30x52", help="latent grid T x H x W after patchify")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    grid = tuple(int(x) for x in args.grid.split("x"))
    q, k, _ = video_qkv(grid, args.heads, device=args.device)
    stats = attention_statistics(q, k, grid)
    print(f"grid {grid}, {args.heads} heads, L={math.prod(grid)}, device {args.device}")
    print("head kind      keys@80%  own cube  cube+26nb  same frame  same pos")
    for h in range(args.heads):
        print(f"{h:4d} {HEAD_KINDS[h % 3]:9s} {100 * stats['keys_for_80'][h]:7.2f}% {100 * stats['own_cube'][h]:8.1f}% "
              f"{100 * stats['cube_and_neighbours'][h]:9.1f}% {100 * stats['same_frame'][h]:10.1f}% {100 * stats['same_position'][h]:8.1f}%")
    mean = {key: sum(v) / len(v) for key, v in stats.items()}
    print(f"mean           {100 * mean['keys_for_80']:7.2f}% {100 * mean['own_cube']:8.1f}% {100 * mean['cube_and_neighbours']:9.1f}% "
          f"{100 * mean['same_frame']:10.1f}% {100 * mean['same_position']:8.1f}%")


if __name__ == "__main__":
    main()
