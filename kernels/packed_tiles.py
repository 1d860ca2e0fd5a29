"""Partial query cubes packed into shared 64-row tiles (the Gluon kernel's tiles; `block_sparse_attention_hopper`).

Why: a 64-token cube at the grid's far edge holds fewer rows (Wan 480p's last T slab is one frame: 16 of 64), yet
a program per cube runs every step on 64 rows: 18 % of the 480p query slots are padding. Up to four such cubes of
one W run share a tile instead; the tile runs the union of its members' KV lists, and each step tells which
members selected that cube (rows of the others see -inf). `bench/packing_estimate.py` counts the steps it saves.

Two parts: the tiles of a layout (fixed per grid, built once), and per call the union lists from the selection's
dense mask (one Triton launch, no host sync).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_MEMBERS = 4  # cubes a tile takes: a member's bit in a step's code (low 4 mantissa bits of its bias)
NO_MEMBER = 15  # the member of a padding row: bit 15 of a code is never set, so the row sees no key
PACKED_ROWS = 64  # rows of a tile, and the cube volume packing applies to
_MEMBER_BITS_SHIFT = 24  # union entries: cube id | member bits << 24 (N < 2^24 cubes)


def tile_members(n_valid: list[int], cubes_per_axis) -> list[list[int]]:
    """Cube ids per tile, in cube order: a cube of more than 32 valid rows alone; runs of smaller cubes along W
    share a tile, up to 64 rows and four members."""
    nt, nh, nw = cubes_per_axis
    tiles = []
    for row in range(nt * nh):
        run = []
        for c in range(row * nw, (row + 1) * nw):
            if n_valid[c] > PACKED_ROWS // 2:
                tiles.append([c])
                continue
            if run and (sum(n_valid[x] for x in run) + n_valid[c] > PACKED_ROWS or len(run) == MAX_MEMBERS):
                tiles.append(run)
                run = []
            run.append(c)
        if run:
            tiles.append(run)
    return tiles


class PackedTiles(NamedTuple):
    """A layout's tiles on one device. Cubes alone run the kernel's one-cube path; packed tiles its packed one."""
    singles: torch.Tensor     # [NS] int32 ids of the cubes that run alone
    members: torch.Tensor     # [P, 4] int32 cube ids of each packed tile (-1 pad)
    row_token: torch.Tensor   # [P, 64] int32 raster token of each row (-1: padding row)
    row_slot: torch.Tensor    # [P, 64] int32 cube * 64 + slot of each row: where its LSE goes (-1: padding row)
    row_member: torch.Tensor  # [P, 64] int32 the row's member (NO_MEMBER on padding rows)

    @property
    def num_packed(self) -> int:
        return self.members.shape[0]


_tiles_cache: dict = {}


def packed_tiles(layout) -> PackedTiles:
    """The tiles of a layout of 64-token cubes, built once per (grid, cube size, device)."""
    if layout.cube_volume != PACKED_ROWS:
        raise ValueError(f"packed tiles need {PACKED_ROWS}-token cubes, got {layout.cube_volume}")
    device = layout.slot_valid.device
    key = (layout.grid, layout.cube_size, str(device))
    if key not in _tiles_cache:
        if len(_tiles_cache) >= 32:
            _tiles_cache.clear()
        _tiles_cache[key] = _build_tiles(layout, device)
    return _tiles_cache[key]


def _build_tiles(layout, device) -> PackedTiles:
    valid = layout.slot_valid.cpu()
    token_of_slot = layout.token_of_slot.cpu().view(-1, PACKED_ROWS)
    tiles = tile_members(layout.n_valid.tolist(), layout.cubes_per_axis)
    packed = [t for t in tiles if len(t) > 1]
    members = torch.full((len(packed), MAX_MEMBERS), -1, dtype=torch.int32)
    row_token = torch.full((len(packed), PACKED_ROWS), -1, dtype=torch.int32)
    row_slot = torch.full((len(packed), PACKED_ROWS), -1, dtype=torch.int32)
    row_member = torch.full((len(packed), PACKED_ROWS), NO_MEMBER, dtype=torch.int32)
    for p, cubes in enumerate(packed):
        members[p, :len(cubes)] = torch.tensor(cubes, dtype=torch.int32)
        row = 0
        for g, c in enumerate(cubes):
            slots = valid[c].nonzero().view(-1)
            rows = slice(row, row + slots.numel())
            row_token[p, rows] = token_of_slot[c, slots].int()
            row_slot[p, rows] = (c * PACKED_ROWS + slots).int()
            row_member[p, rows] = g
            row += slots.numel()
    singles = torch.tensor([t[0] for t in tiles if len(t) == 1], dtype=torch.int32)
    return PackedTiles(*(x.to(device) for x in (singles, members, row_token, row_slot, row_member)))


@triton.jit
def _union_kernel(Attended, Members, Count, Index, N, P, capacity, BLOCK: tl.constexpr, MEMBERS: tl.constexpr,
                  BITS_SHIFT: tl.constexpr):
    """One program per (batch * head, packed tile): the ascending union of its members' selected cubes, each entry
    `cube | bits << BITS_SHIFT` with bit g set where member g selected the cube."""
    pid = tl.program_id(0)
    bh = pid // P
    p = pid % P
    total = 0
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < N
        bits = tl.zeros([BLOCK], dtype=tl.int32)
        for g in tl.static_range(MEMBERS):
            member = tl.load(Members + p * MEMBERS + g)
            row = Attended + (bh * N + tl.maximum(member, 0)).to(tl.int64) * N
            hit = tl.load(row + cols, mask=ok & (member >= 0), other=0)
            bits |= (hit != 0).to(tl.int32) << g
        keep = bits != 0
        pos = total + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(Index + pid.to(tl.int64) * capacity + pos, cols | (bits << BITS_SHIFT), mask=keep & (pos < capacity))
        total += tl.sum(keep.to(tl.int32), 0)
    tl.store(Count + pid, tl.minimum(total, capacity))


def packed_union(attended: torch.Tensor, members: torch.Tensor, capacity: int):
    """attended [B, H, N, N] uint8 (the selection as a dense mask), members [P, 4] int32 -> count [B, H, P] int32,
    index [B, H, P, capacity] int32 (`cube | bits << 24`, ascending; entries past count unset). capacity bounds a
    union: min(N, 4 x the longest list) fits every one."""
    B, H, N, _ = attended.shape
    P = members.shape[0]
    count = torch.empty(B, H, P, dtype=torch.int32, device=attended.device)
    index = torch.empty(B, H, P, capacity, dtype=torch.int32, device=attended.device)
    if B * H * P:
        _union_kernel[(B * H * P,)](attended, members, count, index, N, P, capacity,
                                    BLOCK=min(1024, triton.next_power_of_2(N)), MEMBERS=MAX_MEMBERS,
                                    BITS_SHIFT=_MEMBER_BITS_SHIFT)
    return count, index
