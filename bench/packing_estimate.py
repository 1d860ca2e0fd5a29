"""How many attention steps packing partial query cubes saves, and the speed-up no kernel can pass, counted on
the selection (no GPU needed):

    python bench/packing_estimate.py [--shape 480p] [--stat-lambdas 1,1.5,2.5]

Without packing, a partial cube (the last T slab of Wan's 21 frames holds one frame: 16 of 64 rows) costs a whole
64-row tile. The Gluon kernel packs up to four cubes of <= 32 valid rows from one (t, h) run along W into a tile
(`kernels/packed_tiles.py`), each row masked to its own cube's list, and runs the union of the members' lists. Steps =
selected cubes + ceil(N / 64) pooled blocks per tile (the kernel's count), summed over heads, on the pure-torch
reference selection of the bench's video-like Q/K (node defaults but the lambda). The ceiling: the work BSA must
do (valid query x valid key pairs of the selected cubes, plus one pooled key per unselected cube for each valid
query) as a share of dense attention's, i.e. the speed-up at cuDNN's own per-FLOP rate with zero overhead; then
where the packed kernel's executed steps go besides that work (K/V padding slots, the pooled blocks' tail, masked
rows). Then how many of those steps sharing K/V steps inside the packed groups would drop.
Then, for 128-row tiles (two neighbouring cubes along W, one per consumer warpgroup, sharing each K/V tile of the
union of their lists and each skipping the steps its cube did not select): how many warpgroups a K/V load serves.
Last, what a kernel on coarser blocks would execute for the same selection (64 x 128, and 128 x 128 as in
FlashAttention-4's CuTe block-sparse forward): blocks of consecutive cubes in cube order, run whole when any cube
pair inside is selected.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SHAPES, video_qkv  # noqa: E402  (also loads the pack as comfyui_bsa)

from comfyui_bsa.bsa_core import reference  # noqa: E402
from comfyui_bsa.bsa_core.config import RECOMMENDED  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.kernels.packed_tiles import tile_members  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="480p", choices=sorted(SHAPES))
    parser.add_argument("--stat-lambdas", default="1,1.5,2.5")
    args = parser.parse_args()
    grid, heads = SHAPES[args.shape]
    q, k, _ = video_qkv(grid, heads, device="cpu", dtype=torch.float32)
    layout = cube_layout(grid, (4, 4, 4), "cpu")
    qc, kc = layout.to_cubes(q), layout.to_cubes(k)
    tiles = tile_members(layout.n_valid.tolist(), layout.cubes_per_axis)
    pooled = -(-layout.num_cubes // 64)
    n = layout.n_valid.double()
    dense = float(layout.num_tokens) ** 2 * heads
    print(f"{args.shape}: {layout.num_cubes} cubes, {sum(layout.n_valid.tolist())} of {layout.num_cubes * 64} "
          f"query slots real; {len(tiles)} tiles when packed")
    for lam in (float(x) for x in args.stat_lambdas.split(",")):
        config = dataclasses.replace(RECOMMENDED, stat_lambda=lam)
        mask = reference.bsa_select(qc, kc, layout, config, 1 / math.sqrt(q.shape[-1])).to_dense()[0]  # [H, N, N]
        pooled_keys = float((n[:, None] * (1 - mask.double())).sum())  # one key per unselected cube, a real query
        pairs = float((n[:, None] * mask.double() * n[None, :]).sum()) + pooled_keys
        per_cube = int((mask.sum(-1) + pooled).sum())
        unions = [mask[:, tile].any(1).double() for tile in tiles]  # [H, N] each: the steps a tile runs
        packed = sum(int(union.sum()) for union in unions) + len(tiles) * heads * pooled
        print(f"  stat {lam}: {100 * float(mask.float().mean()):.1f} % kept; steps with a tile per cube {per_cube}, "
              f"packed {packed} ({100 * (1 - packed / per_cube):.1f} % fewer); work {100 * pairs / dense:.2f} % of "
              f"dense: at most x{dense / pairs:.2f} at cuDNN's per-FLOP rate", flush=True)
        _executed_breakdown(unions, n, pairs, packed, heads, layout.num_cubes, pooled)
        _kv_groups_sharing(unions, tiles, packed)
        left, right = _w_pairs(layout)
        own, loads = int(mask[:, left].sum() + mask[:, right].sum()), int((mask[:, left] | mask[:, right]).sum())
        print(f"    two cubes along W a program: {own} selected steps over {loads} K/V loads, {own / loads:.2f} "
              f"warpgroups a load", flush=True)
        _coarse_blocks(mask, pairs, pooled_keys, layout.num_tokens)


def _executed_breakdown(unions, n, pairs, steps, heads, N, pooled):
    """Where the packed kernel's executed 64 x 64 steps go: the work BSA must do, K/V padding slots (a selected
    partial cube still takes a whole 64-key step), the pooled blocks' tail past N, and rows a step masks (a packed
    tile's padding rows and members that did not select the step's cube). Last, how many selected steps a kernel
    that shared a step between partial K/V cubes could drop at most (any partial cubes of a union, 64 keys a step)."""
    partial = (n < 64).double()
    kv_padding = 64 * sum(float((union * (64 - n)).sum()) for union in unions)
    pooled_tail = 64 * len(unions) * heads * (pooled * 64 - N)
    slots = 4096.0 * steps
    shared = sum(float((union * (1 - partial)).sum(-1).add(torch.ceil((union * partial * n).sum(-1) / 64)).sum())
                 for union in unions)
    selected = steps - len(unions) * heads * pooled
    print(f"    of the executed slots: {100 * pairs / slots:.1f} % work BSA must do, {100 * kv_padding / slots:.1f} % "
          f"K/V padding, {100 * pooled_tail / slots:.1f} % the pooled blocks' tail, "
          f"{100 * (slots - pairs - kv_padding - pooled_tail) / slots:.1f} % masked rows; partial K/V cubes sharing "
          f"steps would drop at most {100 * (selected - shared) / steps:.1f} % of the steps", flush=True)


def _kv_groups_sharing(unions, tiles, steps):
    """The steps a kernel would drop if the packed tiles' groups of partial cubes also shared K/V steps (a step
    holding every selected member of a group: the query packing applied to the keys), in all tiles and in the
    cubes that run alone (the tiles whose steps all share one member mask, so only the key bias would change)."""
    groups = [tile for tile in tiles if len(tile) > 1]
    dropped = [sum(int((union[:, g].sum(-1) - union[:, g].any(-1).int()).sum()) for g in groups) for union in unions]
    alone = sum(d for d, tile in zip(dropped, tiles) if len(tile) == 1)
    print(f"    K/V steps shared by the packed groups would drop {100 * sum(dropped) / steps:.1f} % of the steps "
          f"({100 * alone / steps:.1f} % in the cubes that run alone)", flush=True)


def _w_pairs(layout):
    """(left, right) cube ids of the neighbouring pairs along W (an odd last cube of a row left out)."""
    NT, NH, NW = layout.cubes_per_axis
    ids = torch.arange(layout.num_cubes).view(NT, NH, NW)[:, :, :NW - NW % 2]
    return ids[:, :, 0::2].reshape(-1), ids[:, :, 1::2].reshape(-1)


def _coarse_blocks(mask, pairs, pooled_keys, num_tokens):
    """The work a block-sparse kernel on blocks of whole cubes would execute for this per-cube selection: a
    query block of `rows` consecutive cubes of cube order and a key block of `cols` (64 slots each, padding
    included) run whole when any cube pair inside is selected (a per-token mask only hides the rest), plus
    one pooled key per skipped cube for each real query, as BSA's own kernel. The ceiling is that work at
    cuDNN's per-FLOP rate. 2 x 2: FlashAttention-4's CuTe block-sparse forward (128 x 128 blocks)."""
    H, N, _ = mask.shape
    dense = float(num_tokens) ** 2 * H
    for rows, cols in ((1, 2), (2, 2)):
        padded = torch.zeros(H, -(-N // rows) * rows, -(-N // cols) * cols, dtype=torch.bool)
        padded[:, :N, :N] = mask
        blocks = padded.view(H, padded.shape[1] // rows, rows, padded.shape[2] // cols, cols).any(4).any(2)
        executed = 64 * rows * 64 * cols * float(blocks.sum()) + pooled_keys
        print(f"    {64 * rows} x {64 * cols} blocks ({rows} x {cols} cubes): "
              f"{100 * float(blocks.float().mean()):.1f} % of the blocks run, {100 * pairs / executed:.1f} % of "
              f"their work BSA must do; at most "
              f"x{dense / executed:.2f} at cuDNN's per-FLOP rate", flush=True)


if __name__ == "__main__":
    main()
