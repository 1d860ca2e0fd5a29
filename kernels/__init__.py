"""Triton kernels, one op per file, each with a thin torch wrapper."""
