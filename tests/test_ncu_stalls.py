"""tools/ncu_stalls.py on a hand-made Nsight Compute source page: it finds the innermost loop by its backward
branch, cuts the body at MMA waits and barriers, and shares samples out by what was counted (the numbers below
follow from the rows, not from running the tool)."""
import csv
import importlib.util
import pathlib

TOOL = pathlib.Path(__file__).resolve().parents[1] / "tools" / "ncu_stalls.py"
HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_wait",
          "stall_barrier", "stall_selected", "stall_barrier (Not Issued)"]


def _tool():
    spec = importlib.util.spec_from_file_location("ncu_stalls", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Kernel Name", "k"])
        writer.writerow(HEADER)
        for address, source, wait, barrier, selected, executed in rows:
            writer.writerow([hex(address), source, wait + barrier + selected, executed, wait, barrier, selected,
                             barrier])


def test_loop_phases_and_shares(tmp_path, capsys, monkeypatch):
    rows = [  # a prologue, then a 5-instruction loop run 10 times whose body has one MMA wait in it
        (0x100, "MOV R1, R2", 10, 0, 0, 1),
        (0x110, "HGMMA.64x64x16.F32.BF16 R8, R24, gdesc[UR4]", 0, 0, 10, 10),
        (0x120, "WARPGROUP.DEPBAR.LE gsb0, 0x0", 0, 40, 0, 10),
        (0x130, "MUFU.EX2 R9, R9", 30, 0, 5, 10),
        (0x140, "FADD R10, R9, R10", 0, 0, 5, 10),
        (0x150, "@P0 BRA 0x110", 0, 0, 0, 10),
    ]
    page = tmp_path / "sass.csv"
    _page(page, rows)
    tool = _tool()
    header, instructions = tool.read(str(page))
    assert tool.loops(instructions) == [(1, 5)]
    monkeypatch.setattr("sys.argv", ["ncu_stalls.py", str(page), "--top", "1"])
    tool.main()
    out = capsys.readouterr().out
    assert "6 instructions, 100 samples" in out
    assert "loop [1, 5]: 90.0 % of samples, 10 warp passes, 5 instructions a pass" in out
    assert "[1, 3) HGMMA" in out and "50.0 %" in out  # the HGMMA issue and its wait: 10 + 40 of 100 samples
    assert "[3, 6) MUFU.EX2" in out and "40.0 %" in out  # after the wait: 35 + 5
    assert "wait 40 %, barrier 40 %, selected 20 %" in out  # the whole kernel's ("Not Issued" columns left out)
    assert "2  40.0 %  WARPGROUP.DEPBAR" in out  # --top 1: the instruction with the most samples
