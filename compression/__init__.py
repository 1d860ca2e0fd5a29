"""Compression of a video model's linear layers: FP8 quantization (TDQ) and 2:4 / activation sparsity."""
