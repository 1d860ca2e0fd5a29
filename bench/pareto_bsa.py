"""Pareto sweep on video-like attention: speed-up over cuDNN SDPA vs error against dense, for BSA
(keep_ratio x kv_threshold / stat_lambda x threshold mode x pooled remainder x cube), comfy-kitchen's
sol_attn (tau; topk_ratio) and FlexAttention on BSA's own tables. A script, not a test:

    PYTHONPATH=.ck python bench/pareto_bsa.py [--shapes 480p,720p] [--out DIR] [--quick] [--stat-lambdas 1,1.25]
    python bench/pareto_bsa.py --plot-only bench/results/pareto_h100_480p.csv bench/results/pareto_h100_720p.csv

Every time is the median of triton.testing.do_bench on the same card in the same run, end to end (BSA:
permute + select + attention + scatter; sol_attn: its whole call on raster-order tensors). Errors are
relative L2 and cosine of the whole output against cuDNN SDPA on the same inputs. Writes
pareto_<shape>.csv per shape and pareto.png (needs matplotlib) into --out, and prints per provider
the best speed-up at rel L2 <= 0.05 and <= 0.10 and whether BSA's curve is at or above sol_attn's.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import SHAPES, errors, flex_on_table, ms, video_inputs  # noqa: E402  (also loads the pack)

from comfyui_bsa.bsa_core.attention import bsa_attention  # noqa: E402
from comfyui_bsa.bsa_core.config import BSAConfig  # noqa: E402
from comfyui_bsa.bsa_core.cubes import cube_layout  # noqa: E402
from comfyui_bsa.kernels.cube_permute import cube_permute  # noqa: E402

CUBES = ((4, 4, 4), (4, 4, 8))
KEEP_RATIOS = (1.0, 0.5)  # a first sweep with 0.75 too: dropping queries never reached rel L2 < 0.28
THRESHOLDS = (("cumulative", 0.5), ("cumulative", 0.7), ("cumulative", 0.85), ("cumulative", 0.95),
              ("statistical", 0.5), ("statistical", 1.0), ("statistical", 1.5), ("statistical", 2.0),
              ("statistical", 2.5))
SOL_SETTINGS = ({"tau": 0.5}, {"tau": 1.0}, {"tau": 2.0}, {"tau": 3.0}, {"tau": 4.0}, {"topk_ratio": 0.03},
                {"topk_ratio": 0.05}, {"topk_ratio": 0.10}, {"topk_ratio": 0.20}, {"topk_ratio": 0.30})
FIELDS = ("shape", "provider", "cube", "keep_ratio", "mode", "value", "pooled", "kv_pct", "q_pct", "ms", "speedup",
          "rel_l2", "cos")
ERROR_LEVELS = (0.05, 0.10)


def bsa_settings(quick: bool, stat_lambdas=None):
    thresholds = THRESHOLDS if stat_lambdas is None else (
        tuple(t for t in THRESHOLDS if t[0] != "statistical") + tuple(("statistical", x) for x in stat_lambdas))
    cubes, keeps = (CUBES[:1], (1.0,)) if quick else (CUBES, KEEP_RATIOS)
    for cube, keep, (mode, value), pooled in itertools.product(cubes, keeps, thresholds, (False, True)):
        if keep < 1.0 and cube != cubes[0]:
            continue  # query dropping is far off the front (first sweep); one cube size shows it
        extra = {"stat_lambda": value, "kv_threshold": 1.0} if mode == "statistical" else {"kv_threshold": value}
        yield BSAConfig(cube, keep_ratio=keep, threshold_mode=mode, pooled_remainder=pooled, **extra), mode, value


def bsa_rows(shape, q, k, v, grid, dense_out, dense_ms, quick, stat_lambdas=None):
    for config, mode, value in bsa_settings(quick, stat_lambdas):
        fn = lambda: bsa_attention(q, k, v, grid, config, backend="triton")  # noqa: E731
        out, sel = fn()
        t = ms(fn)
        rel, cos = errors(out, dense_out)
        layout = cube_layout(grid, config.cube_size, q.device)
        row = dict(shape=shape, provider="bsa", cube="x".join(map(str, config.cube_size)),
                   keep_ratio=config.keep_ratio, mode=mode, value=value, pooled=int(config.pooled_remainder),
                   kv_pct=100 * float(sel.kept_kv_fraction()), q_pct=100 * float(sel.kept_query_fraction(layout.n_valid)),
                   ms=t, speedup=dense_ms / t, rel_l2=rel, cos=cos)
        yield row
        if (not config.pooled_remainder and config.cube_size == CUBES[0] and config.keep_ratio in (1.0, 0.5)
                and mode == "cumulative"):
            yield flex_row(row, q, k, v, layout, sel, dense_out, dense_ms)
        del out, sel


def flex_row(bsa_row, q, k, v, layout, sel, dense_out, dense_ms):
    """FlexAttention on the very table BSA chose (attention only: BSA's selection cost is not charged)."""
    qc, kc, vc = (cube_permute(x, layout) for x in (q, k, v))
    run = flex_on_table(layout, sel.q_index, sel.kv_count, sel.kv_index, qc, kc, vc)
    run()
    t = ms(run)
    return dict(bsa_row, provider="flex_same_table", ms=t, speedup=dense_ms / t)


def sol_rows(shape, q, k, v, dense_out, dense_ms):
    try:
        import comfy_kitchen as ck
        if not ck.sol_attn_is_available(q.device):
            print("sol_attn: not available on this device")
            return
    except Exception as e:  # noqa: BLE001 - a failed import only drops this provider
        print(f"sol_attn: comfy_kitchen import failed: {type(e).__name__}: {e}")
        return
    qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # raster order, as ComfyUI hands it over
    for kwargs in SOL_SETTINGS:
        fn = lambda: ck.sol_attn(qs, ks, vs, **kwargs)  # noqa: E731
        t = ms(fn)
        rel, cos = errors(fn().transpose(1, 2), dense_out)
        (mode, value), = kwargs.items()
        yield dict(shape=shape, provider="sol_attn", cube="-", keep_ratio=1.0, mode=mode, value=value, pooled=1,
                   kv_pct=float("nan"), q_pct=100.0, ms=t, speedup=dense_ms / t, rel_l2=rel, cos=cos)


def _typed(row: dict) -> dict:
    """A CSV row with its numbers back as numbers."""
    out = dict(row)
    for key in ("keep_ratio", "value", "kv_pct", "q_pct", "ms", "speedup", "rel_l2", "cos"):
        out[key] = float(row[key])
    out["pooled"] = int(row["pooled"])
    return out


def series(row) -> str:
    if row["provider"] != "bsa":
        return row["provider"]
    return f"bsa{' +pooled' if row['pooled'] else ''}"


def pareto_front(rows):
    """Points no other point beats on both speed-up and error, sorted by error."""
    front, best = [], 0.0
    for row in sorted(rows, key=lambda r: (r["rel_l2"], -r["speedup"])):
        if row["speedup"] > best:
            front.append(row)
            best = row["speedup"]
    return front


def best_at(rows, level):
    ok = [r for r in rows if r["rel_l2"] <= level]
    return max(ok, key=lambda r: r["speedup"]) if ok else None


def describe(row) -> str:
    if row is None:
        return "none"
    setting = f"{row['mode']} {row['value']}" + (f", r {row['keep_ratio']}, {row['cube']}" if row["cube"] != "-" else "")
    return f"x{row['speedup']:.2f} (rel L2 {row['rel_l2']:.3f}, {setting})"


def summarize(shape, rows):
    print(f"\n{shape} summary")
    groups = {}
    for row in rows:
        groups.setdefault(series(row), []).append(row)
    ours = [r for r in rows if r["provider"] == "bsa"]
    for name, group in [("bsa (all)", ours), *sorted(groups.items())]:
        print(f"  {name:16s} " + "  ".join(f"best at rel L2 <= {lvl:.2f}: {describe(best_at(group, lvl))}"
                                         for lvl in ERROR_LEVELS))
    sol = groups.get("sol_attn", [])
    beaten = [s for s in sol if any(r["speedup"] >= s["speedup"] and r["rel_l2"] <= s["rel_l2"] for r in ours)]
    if sol:
        print(f"  sol_attn points matched or beaten by a BSA point (>= speed-up at <= error): {len(beaten)}/{len(sol)}")
        for s in sol:
            if s not in beaten:
                ours_at = best_at(ours, s["rel_l2"])
                print(f"    not matched: sol_attn {s['mode']}={s['value']} x{s['speedup']:.2f} at rel L2 {s['rel_l2']:.3f};"
                      f" best BSA at that error: {describe(ours_at)}")


def plot(all_rows, path, device_name):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    shapes = sorted({r["shape"] for r in all_rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 5.5), squeeze=False)
    styles = {"bsa": ("tab:blue", "o"), "bsa +pooled": ("tab:green", "s"), "sol_attn": ("tab:red", "^"),
              "flex_same_table": ("tab:gray", "x")}
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in all_rows if r["shape"] == shape]
        for name, (color, marker) in styles.items():
            group = [r for r in rows if series(r) == name]
            if not group:
                continue
            ax.scatter([r["rel_l2"] for r in group], [r["speedup"] for r in group], c=color, marker=marker,
                       s=18, alpha=0.45)
            front = pareto_front(group)
            ax.plot([r["rel_l2"] for r in front], [r["speedup"] for r in front], color=color, marker=marker,
                    label=f"{name} (Pareto front)")
        for level in ERROR_LEVELS:
            ax.axvline(level, color="k", lw=0.6, ls=":")
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
        ax.set_xlabel("relative L2 error vs dense (log)")
        ax.set_ylabel("speed-up over cuDNN SDPA")
        grid, heads = SHAPES[shape]
        ax.set_title(f"{shape}: grid {grid}, {heads} heads, L={math.prod(grid)}, "
                     f"cuDNN {rows[0]['ms'] * rows[0]['speedup']:.2f} ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Sparse attention on video-like Q/K/V, {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="480p,720p")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true",
                        help="4x4x4 cubes and keep_ratio 1 only (the front: other cubes and query dropping are behind it)")
    parser.add_argument("--stat-lambdas", type=lambda text: tuple(float(x) for x in text.split(",")),
                        help="statistical lambdas swept instead of 0.5,1,1.5,2,2.5 (a finer front), e.g. 0.9,1.25,1.75")
    parser.add_argument("--plot-only", nargs="+", metavar="CSV",
                        help="summaries and the plot again from saved CSVs (no GPU): X_480p.csv X_720p.csv -> X.png")
    parser.add_argument("--device-name", default="NVIDIA H100 80GB HBM3", help="plot title with --plot-only")
    args = parser.parse_args()
    if args.plot_only:
        rows = [_typed(r) for path in args.plot_only for r in csv.DictReader(open(path))]
        for shape in dict.fromkeys(r["shape"] for r in rows):
            summarize(shape, [r for r in rows if r["shape"] == shape])
        first = pathlib.Path(args.plot_only[0])
        plot(rows, first.with_name(first.stem.rsplit("_", 1)[0] + ".png"), args.device_name)
        return
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    all_rows = []
    for shape in args.shapes.split(","):
        grid, heads, (q, k, v), dense_out, dense_ms = video_inputs(shape)
        title = f"grid {grid}, {heads} heads, L={math.prod(grid)}, cuDNN {dense_ms:.2f} ms"
        print(f"\n{shape}: {title}")
        print("  " + " ".join(f"{f:>9s}" for f in FIELDS[1:]))
        rows = []
        for row in itertools.chain(bsa_rows(shape, q, k, v, grid, dense_out, dense_ms, args.quick, args.stat_lambdas),
                                   sol_rows(shape, q, k, v, dense_out, dense_ms)):
            rows.append(row)
            print("  " + " ".join(f"{row[f]:9.3f}" if isinstance(row[f], float) else f"{row[f]!s:>9s}"
                                  for f in FIELDS[1:]), flush=True)
        with open(out_dir / f"pareto_{shape}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        summarize(shape, rows)
        all_rows += rows
        del q, k, v, dense_out
        torch.cuda.empty_cache()
    plot(all_rows, out_dir / "pareto.png", torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
