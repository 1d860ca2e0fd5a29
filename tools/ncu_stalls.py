"""Where a kernel's warps spend their time, per loop and per phase of a loop body, from Nsight Compute's warp-state
samples: reads the source page of a report (`ncu -i REPORT --page source --csv --print-source sass > sass.csv`,
the report taken with `--section SourceCounters`) and prints, for the whole kernel, each innermost loop and the
phases between a loop's MMA waits, the share of samples and the top stall reasons; with --top, the instructions
with the most samples. E.g., on `bench/one_launch.py`'s launch of the Gluon kernel:

    ncu -k regex:_hopper_block_sparse -s 2 -c 1 --section SourceCounters --section WarpStateStats \\
        --import-source no -o report python3 bench/one_launch.py --setting stat1
    ncu -i report.ncu-rep --page source --csv --print-source sass > sass.csv
    python3 tools/ncu_stalls.py sass.csv [--top 20]

A phase's share of the samples is its share of the warps' time; a loop's instructions a pass over the share of
them its warps issue (stall reason "selected") is roughly the clocks one warp spends in one pass (one attention step).
"""
from __future__ import annotations

import argparse
import collections
import csv
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sass_loops import innermost_loops  # noqa: E402

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def read(path: str) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[1]  # rows[0] names the kernel
    return header, [dict(zip(header, row)) for row in rows[2:]]


def number(text: str) -> int:
    return int(text.replace(",", "")) if text and text not in "-" else 0


def reasons(instructions: list[dict], stall_columns: list[str], top: int = 4) -> str:
    total = collections.Counter()
    for row in instructions:
        for column in stall_columns:
            total[column[len("stall_"):]] += number(row[column])
    count = sum(total.values()) or 1
    return ", ".join(f"{name} {100 * n / count:.0f} %" for name, n in total.most_common(top) if n)


def loops(instructions: list[dict]) -> list[tuple[int, int]]:
    """(first, last index) of each innermost loop's body."""
    index = {int(row["Address"], 16): i for i, row in enumerate(instructions)}
    code = [(int(row["Address"], 16), row["Source"]) for row in instructions]
    return [(index[first], index[last]) for first, last in innermost_loops(code)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=0, help="also list the N instructions with the most samples")
    parser.add_argument("--min-share", type=float, default=2.0, help="loops under this %% of the samples are left out")
    args = parser.parse_args()
    header, instructions = read(args.csv)
    stall_columns = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    samples = [number(row[SAMPLES]) for row in instructions]
    total = sum(samples) or 1
    print(f"{len(instructions)} instructions, {total} samples: {reasons(instructions, stall_columns, 6)}")
    for first, last in loops(instructions):
        body = instructions[first:last + 1]
        share = 100 * sum(samples[first:last + 1]) / total
        if share < args.min_share:
            continue
        passes = number(instructions[last][EXECUTED])
        issued = sum(number(row[EXECUTED]) for row in body)
        print(f"\nloop [{first}, {last}]: {share:.1f} % of samples, {passes} warp passes, "
              f"{issued / max(passes, 1):.0f} instructions a pass; {reasons(body, stall_columns)}")
        # phases: cut the body after each MMA wait and each barrier, where a warp's timeline changes what it waits on
        cuts = [first] + [i + 1 for i in range(first, last) if re.search(r"DEPBAR|BAR\.SYNC|TRYWAIT",
                                                                            instructions[i]["Source"])] + [last + 1]
        for a, b in zip(cuts, cuts[1:]):
            if b > a:
                part = sum(samples[a:b])
                print(f"  [{a}, {b}) {instructions[a]['Source'].strip()[:44]:44s} {100 * part / total:5.1f} %  "
                      f"{reasons(instructions[a:b], stall_columns, 3)}")
    if args.top:
        print(f"\ntop {args.top} instructions by samples:")
        for i in sorted(range(len(instructions)), key=lambda i: -samples[i])[:args.top]:
            row = instructions[i]
            print(f"  {i:5d} {100 * samples[i] / total:5.1f} %  {row['Source'].strip()[:60]:60s} "
                  f"{reasons([row], stall_columns, 2)}")


if __name__ == "__main__":
    main()
