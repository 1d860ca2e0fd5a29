"""2:4 linears vs dense at Wan shapes (torch.sparse.to_sparse_semi_structured vs the same masked weights
dense, bf16), printing median ms, TFLOP/s and the error against the masked dense result, and the GPU name.

    python bench/bench_prune.py                 # GPU: Wan 1.3B 480p and 14B 720p linear shapes
    python bench/bench_prune.py --cpu-smoke     # CPU: the masked-dense path and the mask checks, tiny shapes

Not yet here (the GPU session adds them): end-to-end sampling time and PSNR vs the unpruned model before /
after a recovery fine-tune (tools/train.py with a config carrying "prune").
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
from pack import load_pack  # noqa: E402

load_pack()
from comfyui_bsa.compression.sparsity24 import Sparse24Weight, mask_24, semi_structured_unsupported  # noqa: E402

# (tokens, [(out, in)] of attention q/k/v/o, ffn.0, ffn.2): 81 frames at 480p = 21x30x52 tokens, 720p 21x45x80
SHAPES = {
    "wan1.3B-480p": (21 * 30 * 52, [(1536, 1536), (8960, 1536), (1536, 8960)]),
    "wan14B-720p": (21 * 45 * 80, [(5120, 5120), (13824, 5120), (5120, 13824)]),
    "cpu-smoke": (256, [(256, 256), (512, 256), (256, 512)]),
}


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def bench(name: str, device: str, dtype, repeats: int) -> None:
    tokens, shapes = SHAPES[name]
    for out_features, in_features in shapes:
        layer = torch.nn.Linear(in_features, out_features, device=device, dtype=dtype)
        mask = mask_24(layer.weight.abs())
        x = torch.randn(tokens, in_features, device=device, dtype=dtype)
        dense_weight = layer.weight.detach() * mask.to(device)
        sparse = Sparse24Weight(mask)
        reason = semi_structured_unsupported(dense_weight)
        dense_ms = median_ms(lambda: torch.nn.functional.linear(x, dense_weight, layer.bias), repeats)
        sparse_ms = median_ms(lambda: sparse.linear(layer, x), repeats)
        error = float((sparse.linear(layer, x).float() - torch.nn.functional.linear(x, dense_weight, layer.bias).float())
                      .abs().max())
        flops = 2 * tokens * in_features * out_features
        print(f"{name:14s} {tokens:6d}x{in_features:<5d}->{out_features:<5d} dense {dense_ms:8.3f} ms "
              f"({flops / dense_ms / 1e9:6.1f} TFLOP/s)  2:4 {sparse_ms:8.3f} ms  x{dense_ms / sparse_ms:4.2f}  "
              f"max|err| {error:.2e}  {'semi-structured' if reason is None else 'masked dense: ' + reason}")


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU in float32")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        print("device: CPU (masked dense path only)")
        bench("cpu-smoke", "cpu", torch.float32, 3)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu-smoke)")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in ("wan1.3B-480p", "wan14B-720p"):
        bench(name, "cuda", torch.bfloat16, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
