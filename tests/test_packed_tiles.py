"""The Gluon kernel's packed tiles (`kernels/packed_tiles.py`): a layout's tiles cover every cube once with row tables
that agree with the cube map, and the per-call union lists (Triton; the interpreter on the CPU) are exactly the
members' selections merged, with the right member bits."""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.kernels.packed_tiles import MAX_MEMBERS, NO_MEMBER, packed_tiles, packed_union, tile_members  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_tile_members_cover_every_cube_once():
    """Wan 480p (partial cubes on T and H): every cube once, a tile never over 64 rows or four cubes, only cubes of
    <= 32 valid rows share one, along one W run, and the tile count of a greedy run packing."""
    layout = cube_layout((21, 30, 52), (4, 4, 4), "cpu")
    valid = layout.n_valid.tolist()
    tiles = tile_members(valid, layout.cubes_per_axis)
    assert sorted(c for tile in tiles for c in tile) == list(range(layout.num_cubes))
    for tile in tiles:
        assert sum(valid[c] for c in tile) <= 64 and len(tile) <= MAX_MEMBERS
        assert len(tile) == 1 or max(valid[c] for c in tile) <= 32
        assert len({divmod(c, layout.cubes_per_axis[2])[0] for c in tile}) == 1  # one (t, h) run along W
        assert tile == list(range(tile[0], tile[0] + len(tile)))  # neighbours
    nw = layout.cubes_per_axis[2]
    runs = [valid[r * nw:(r + 1) * nw] for r in range(layout.num_cubes // nw)]  # equal sizes along a W run here
    expected = sum(nw if run[0] > 32 else math.ceil(nw / min(MAX_MEMBERS, 64 // run[0])) for run in runs)
    assert len(tiles) == expected < layout.num_cubes


@pytest.mark.parametrize("grid", [(9, 14, 22), (1, 6, 40), (8, 8, 12)], ids=["mixed", "all-packed", "none-packed"])
def test_packed_tiles_row_tables_follow_the_cube_map(grid):
    """Each packed row is a valid slot of its own member cube, in member order, once; padding rows see nothing;
    the cubes that run alone are exactly the rest."""
    layout = cube_layout(grid, (4, 4, 4), "cpu")
    tiles = packed_tiles(layout)
    members, row_slot = tiles.members.long(), tiles.row_slot.long()
    covered = torch.cat([tiles.singles.long(), members[members >= 0]]).sort().values
    assert torch.equal(covered, torch.arange(layout.num_cubes))
    real = row_slot >= 0
    assert torch.equal(real, tiles.row_token >= 0) and torch.equal(~real, tiles.row_member == NO_MEMBER)
    assert torch.equal(layout.token_of_slot[row_slot[real]], tiles.row_token[real].long())
    assert torch.equal(members.gather(1, tiles.row_member.long().clamp(max=MAX_MEMBERS - 1))[real],
                       row_slot[real] // 64)
    assert layout.slot_valid.view(-1)[row_slot[real]].all()
    assert int(real.sum()) == int(layout.n_valid[members[members >= 0]].sum())  # every valid slot of a member
    assert (tiles.row_member.diff(dim=1)[real[:, 1:]] >= 0).all()  # members' rows in member order


@pytest.mark.parametrize("N, density", [(40, 0.3), (1100, 0.05)], ids=["small", "two-blocks"])
def test_packed_union_merges_the_members_selections(N, density):
    """Union entries `cube | bits << 24` ascending, bit g where member g selected the cube; a capacity caps the
    count (never written past it); absent members (-1) add nothing."""
    B, H = 2, 2
    g = torch.Generator().manual_seed(N)
    attended = (torch.rand(B, H, N, N, generator=g) < density).to(torch.uint8)
    members = torch.tensor([[0, 1, 2, 3], [5, 6, -1, -1], [N - 1, -1, -1, -1]], dtype=torch.int32)
    count, index = packed_union(attended.to(DEVICE), members.to(DEVICE), N)
    count, index = count.cpu(), index.cpu()
    for b in range(B):
        for h in range(H):
            for p, row in enumerate(members.tolist()):
                live = [m for m in row if m >= 0]
                sel = attended[b, h, live].bool()  # [members, N]
                cubes = sel.any(0).nonzero().view(-1)
                bits = (sel[:, cubes].long() << torch.arange(len(live))[:, None]).sum(0)
                assert int(count[b, h, p]) == cubes.numel()
                got = index[b, h, p, :cubes.numel()].long()
                assert torch.equal(got & 0xFFFFFF, cubes) and torch.equal(got >> 24, bits)
    capped_count, capped = packed_union(attended.to(DEVICE), members.to(DEVICE), 3)
    assert torch.equal(capped_count.cpu(), count.clamp(max=3)) and capped.shape[-1] == 3
    for (b, h, p), n in zip(torch.cartesian_prod(*map(torch.arange, count.shape)).tolist(), capped_count.view(-1)):
        assert torch.equal(capped[b, h, p, :n].cpu(), index[b, h, p, :n])
