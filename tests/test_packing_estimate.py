"""bench/packing_estimate.py's tiles: every cube once, a tile never over 64 rows or four cubes, only cubes of
<= 32 valid rows share one (Wan 480p's grid: partial cubes on T and H)."""
import math
import pathlib
import sys

from comfyui_bsa.bsa_core.cubes import cube_layout


def test_packed_tiles_cover_every_cube_once(monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    monkeypatch.delitem(sys.modules, "packing_estimate", raising=False)
    from packing_estimate import MAX_MEMBERS, packed_tiles

    layout = cube_layout((21, 30, 52), (4, 4, 4), "cpu")
    valid = layout.n_valid.tolist()
    tiles = packed_tiles(layout)
    assert sorted(c for tile in tiles for c in tile) == list(range(layout.num_cubes))
    for tile in tiles:
        assert sum(valid[c] for c in tile) <= 64 and len(tile) <= MAX_MEMBERS
        assert len(tile) == 1 or max(valid[c] for c in tile) <= 32
        assert len({divmod(c, layout.cubes_per_axis[2])[0] for c in tile}) == 1  # one (t, h) run along W
    nw = layout.cubes_per_axis[2]
    runs = [valid[r * nw:(r + 1) * nw] for r in range(layout.num_cubes // nw)]  # equal sizes along a W run here
    expected = sum(nw if run[0] > 32 else math.ceil(nw / min(MAX_MEMBERS, 64 // run[0])) for run in runs)
    assert len(tiles) == expected < layout.num_cubes
