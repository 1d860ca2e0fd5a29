"""Raster <-> cube-contiguous token order for a (T, H, W) grid cut into (ct, ch, cw) cubes.

Partial cubes at the grid's far edges are padded to the full cube volume; padding slots are
marked invalid and never used as queries or keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class CubeLayout:
    """Index tables of one grid / cube size, on one device.

    token_of_slot: [N * S] int64, raster index of each cube slot, -1 for padding.
    slot_of_token: [L] int64, cube slot (n * S + s) of each raster token: the inverse map.
    slot_valid:    [N, S] bool.
    n_valid:       [N] int64, real tokens per cube.
    centre_slot:   [N] int64, slot of the geometric centre of the cube's valid extent.
    """

    grid: tuple[int, int, int]
    cube_size: tuple[int, int, int]
    cubes_per_axis: tuple[int, int, int]
    token_of_slot: torch.Tensor
    slot_of_token: torch.Tensor
    slot_valid: torch.Tensor
    n_valid: torch.Tensor
    centre_slot: torch.Tensor

    @property
    def num_cubes(self) -> int:
        return self.slot_valid.shape[0]

    @property
    def cube_volume(self) -> int:
        return self.slot_valid.shape[1]

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def to_cubes(self, x: torch.Tensor) -> torch.Tensor:
        """[..., L, D] raster -> [..., N, S, D] cube order, padding slots zero."""
        idx = self.token_of_slot.clamp(min=0)
        out = x.index_select(-2, idx) * self.slot_valid.reshape(-1, 1).to(x.dtype)
        return out.reshape(*x.shape[:-2], self.num_cubes, self.cube_volume, x.shape[-1])

    def to_raster(self, x: torch.Tensor) -> torch.Tensor:
        """[..., N, S, D] cube order -> [..., L, D] raster (padding slots dropped): one gather, no host sync."""
        return x.reshape(*x.shape[:-3], -1, x.shape[-1]).index_select(-2, self.slot_of_token)


def cube_layout(grid, cube_size, device="cpu") -> CubeLayout:
    return _cube_layout(tuple(int(g) for g in grid), tuple(int(c) for c in cube_size), str(torch.device(device)))


@lru_cache(maxsize=32)
def _cube_layout(grid, cube_size, device) -> CubeLayout:
    T, H, W = grid
    ct, ch, cw = cube_size
    nt, nh, nw = -(-T // ct), -(-H // ch), -(-W // cw)
    # coordinates of every (cube, slot) pair: cube index is raster over (nt, nh, nw), slot raster over (ct, ch, cw)
    ci = torch.arange(nt * nh * nw)
    si = torch.arange(ct * ch * cw)
    cube_t, cube_h, cube_w = ci // (nh * nw), (ci // nw) % nh, ci % nw
    slot_t, slot_h, slot_w = si // (ch * cw), (si // cw) % ch, si % cw
    t = cube_t[:, None] * ct + slot_t[None]
    h = cube_h[:, None] * ch + slot_h[None]
    w = cube_w[:, None] * cw + slot_w[None]
    valid = (t < T) & (h < H) & (w < W)
    token = torch.where(valid, (t * H + h) * W + w, torch.full_like(t, -1))
    slot_of_token = torch.empty(T * H * W, dtype=torch.int64)
    slot_of_token[token[valid]] = torch.arange(token.numel()).reshape(token.shape)[valid]
    # the centre of a partial cube is the centre of its valid extent
    ext_t = (T - cube_t * ct).clamp(max=ct)
    ext_h = (H - cube_h * ch).clamp(max=ch)
    ext_w = (W - cube_w * cw).clamp(max=cw)
    centre = ((ext_t // 2) * ch + ext_h // 2) * cw + ext_w // 2
    return CubeLayout(
        grid=grid,
        cube_size=cube_size,
        cubes_per_axis=(nt, nh, nw),
        token_of_slot=token.reshape(-1).to(device),
        slot_of_token=slot_of_token.to(device),
        slot_valid=valid.to(device),
        n_valid=valid.sum(1).to(device),
        centre_slot=centre.to(device),
    )
